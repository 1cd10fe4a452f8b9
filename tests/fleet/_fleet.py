"""A fleet of simulated hosts on this machine, reached by Ansible over real SSH.

Each host has its own network namespace (``eth0`` on a bridge the fleet
creates and removes: traffic goes only to these hosts and the bridge), its own
mount namespace (``/run`` and a disk at ``/media``) and its own PID namespace,
whose init (:mod:`tests.fleet._host`) ends every process at a simulated kexec
and boots sshd, the resume command, the agent and the metrics endpoint again.
Needs root (namespaces, ``ip``) and Debian's openssh-server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.agent_client import AgentClient
from orchestrator.luo.sim import SimKernel
from tests.metrics._servers import free_port, running

from ._host import METRICS_PORT

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.metrics._servers import Server

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "deploy" / "ansible"
DEADLINE = 60.0
DATA_SIZE = 1 << 20


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def wait_until(what: str, check: Any, deadline: float = DEADLINE) -> Any:
    """Poll *check* until it returns something true; raise after *deadline* s."""
    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        try:
            result = check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not so after {deadline:g} s (last: {last!r})")


@dataclass
class Host:
    """One simulated host: its directories as the test sees them."""

    name: str
    address: str
    root: Path
    veth: str
    netns: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    @property
    def kernel(self) -> SimKernel:
        return SimKernel(self.disk / "kernel")

    @property
    def agent_socket(self) -> Path:
        return self.root / "run" / "liveupdate" / "agent.sock"

    def kernel_info(self) -> dict[str, Any]:
        return self.kernel.info()

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [
                str(Path(sys.executable).parent / "liveupdate"),
                "status",
                "--json",
                "--state-dir",
                str(self.disk / "state"),
            ],
            check=True,
            capture_output=True,
        ).stdout
        data: dict[str, Any] = json.loads(out)
        return data

    def booted(self) -> str:
        """The boot the host's init last booted (the kernel's ``current``)."""
        return (self.disk / "booted").read_text().strip()

    def up(self) -> bool:
        """Booted on the current kernel boot, with its agent answering."""
        if not (self.disk / "booted").exists():
            return False
        if self.booted() != os.readlink(self.disk / "kernel" / "current"):
            return False
        with AgentClient(self.agent_socket, timeout=5) as agent:
            agent.list()
        return True

    def registrations(self) -> dict[str, dict[str, Any]]:
        with AgentClient(self.agent_socket, timeout=10) as agent:
            return {r["name"]: r for r in agent.list()}

    def data_digest(self) -> str:
        """SHA-256 of the workload data the agent holds, read through a reclaimed
        fd and registered again, so that it goes through later updates too."""
        with AgentClient(self.agent_socket, timeout=10) as agent:
            fd = agent.reclaim("data")
            try:
                digest = hashlib.sha256(os.pread(fd, DATA_SIZE + 1, 0)).hexdigest()
                agent.register("data", fd)
            finally:
                os.close(fd)
        return digest

    def set_link(self, up: bool) -> None:
        _ip("link", "set", self.veth, "up" if up else "down")


class Fleet:
    """The bridge, the hosts, an SSH key and an inventory for Ansible."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        tag = f"{os.getpid() % 0xFFFF:04x}"
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.bridge = f"lufbr{tag}"
        self.hosts = [
            Host(
                name=f"host{i}",
                address=f"{self.subnet}.{10 + i}",
                root=root / f"host{i}",
                veth=f"lufv{tag}{i}",
                netns=f"luf{tag}h{i}",
            )
            for i in range(count)
        ]
        self.key = root / "id_ed25519"
        self.digests: dict[str, str] = {}

    def start(self) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
            check=True,
        )
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            self._make(host)
        for host in self.hosts:
            wait_until(f"{host.name} booted", host.up)
            self.digests[host.name] = self.register_data(host)

    def _make(self, host: Host) -> None:
        (host.root / "run").mkdir(parents=True)
        disk = host.disk
        (disk / "boot").mkdir(parents=True)
        (disk / "state").mkdir()
        SimKernel(disk / "kernel")
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                str(disk / "host_key"),
            ],
            check=True,
        )
        shutil.copy(f"{self.key}.pub", disk / "authorized_keys")
        (disk / "sshd_config").write_text(
            f"ListenAddress {host.address}\n"
            "Port 22\n"
            "HostKey /media/host_key\n"
            "AuthorizedKeysFile /media/authorized_keys\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile /run/sshd.pid\n"
            "Subsystem sftp internal-sftp\n"
            "SetEnv LIVEUPDATE_KERNEL=sim:/media/kernel\n"
        )
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}p")
        _ip("link", "set", f"{host.veth}p", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        inside = ("netns", "exec", host.netns, "ip")
        _ip(*inside, "link", "set", f"{host.veth}p", "name", "eth0")
        _ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "link", "set", "lo", "up")
        with open(host.root / "init.log", "wb") as log:
            host.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.netns,
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--propagation",
                    "private",
                    "--mount-proc",
                    "--kill-child=SIGTERM",
                    sys.executable,
                    "-m",
                    "tests.fleet._host",
                    str(host.root),
                    host.address,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )

    def register_data(self, host: Host) -> str:
        """Hand the host's agent 1 MiB of random bytes as a memfd named
        ``data``; their SHA-256."""
        data = os.urandom(DATA_SIZE)
        fd = os.memfd_create("data", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            with AgentClient(host.agent_socket, timeout=10) as agent:
                agent.register("data", fd)
        finally:
            os.close(fd)
        return hashlib.sha256(data).hexdigest()

    def stop(self) -> None:
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                # unshare ignores SIGTERM while it waits: end the host's init.
                children = Path(f"/proc/{host.proc.pid}/task/{host.proc.pid}/children")
                with contextlib.suppress(OSError, ValueError):
                    for pid in children.read_text().split():
                        os.kill(int(pid), signal.SIGTERM)
        for host in self.hosts:
            if host.proc is not None:
                try:
                    host.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
                    host.proc.wait(timeout=30)
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    # --- what a test asks of the fleet ------------------------------------------

    def target(self, release: str, *, budget: str = "5s") -> str:
        """Make *release* installable on every host: an image and a playbook."""
        for host in self.hosts:
            (host.disk / "boot" / f"vmlinuz-{release}").write_bytes(b"simulated\n")
            (host.disk / "playbook.yaml").write_text(
                "name: fleet-host\n"
                "kernel: sim:/media/kernel\n"
                "state_dir: /media/state\n"
                f"next_kernel: {{image: /media/boot/vmlinuz-{release}, "
                'cmdline: "console=ttyS0 liveupdate=on"}\n'
                f"blackout_budget: {budget}\n"
                "phases:\n"
                "  prepare:\n"
                "    steps:\n"
                "      - plugin: kexec\n"
            )
        return release

    def inventory(self, path: Path, **group_vars: Any) -> Path:
        hosts = {
            h.name: {
                "ansible_host": h.address,
                "liveupdate_metrics_instance": f"{h.address}:{METRICS_PORT}",
            }
            for h in self.hosts
        }
        return write_inventory(path, hosts, self.key, self.root, **group_vars)

    def playbook(
        self, path: Path, inventory: Path, *extra: str, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ansible-playbook`` (through this venv) and return its result."""
        argv, env = self._ansible_playbook(path, inventory, *extra, check=check)
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, cwd=self.root
        )

    def start_playbook(
        self, path: Path, inventory: Path, *extra: str
    ) -> subprocess.Popen[str]:
        """Start ``ansible-playbook`` as :meth:`playbook` runs it, without waiting."""
        argv, env = self._ansible_playbook(path, inventory, *extra)
        return subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
        )

    def _ansible_playbook(
        self, path: Path, inventory: Path, *extra: str, check: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        return ansible_playbook_command(self.root, path, inventory, *extra, check=check)


def write_inventory(
    path: Path,
    hosts: dict[str, dict[str, Any]],
    key: Path,
    control_dir: Path,
    *,
    connect_timeout: int = 5,
    alive_interval: int = 2,
    **group_vars: Any,
) -> Path:
    """Write a JSON inventory of *hosts* (name: their variables), group ``fleet``,
    reached as root with *key*, by this venv's Python and ``liveupdate``.

    SSH gives up on a host that does not answer within *connect_timeout*
    seconds, or that misses three keep-alives *alive_interval* seconds apart.
    """
    common = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(key),
        "ansible_python_interpreter": sys.executable,
        # One SSH connection per host, kept between tasks; live_update
        # resets it after the kexec, as ansible.builtin.reboot does.
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o ControlMaster=auto "
        f"-o ControlPersist=60s -o ControlPath={control_dir}/cp-%C "
        f"-o ConnectTimeout={connect_timeout} -o ServerAliveInterval={alive_interval} "
        "-o ServerAliveCountMax=3",
        "liveupdate_command": str(Path(sys.executable).parent / "liveupdate"),
        **group_vars,
    }
    path.write_text(json.dumps({"fleet": {"hosts": hosts, "vars": common}}, indent=1))
    return path


def ansible_playbook_command(
    root: Path, path: Path, inventory: Path, *extra: str, check: bool = False
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``ansible-playbook`` (this venv's) with the
    collection of this checkout; *root* holds its home and local temp."""
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_LOCAL_TEMP=str(root / "ansible-tmp"),
        ANSIBLE_REMOTE_TEMP="/run/ansible-tmp",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_PIPELINING="True",
        ANSIBLE_FORKS="8",
        ANSIBLE_STDOUT_CALLBACK="default",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_TIMEOUT="5",
        HOME=str(root),
    )
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        str(path),
        *extra,
    ]
    if check:
        argv.append("--check")
    return argv, env


def prometheus_config(
    targets: list[str], *, gateway: str | None = None, interval: str = "1s"
) -> str:
    """prometheus.yml scraping each of *targets* (HOST:PORT) as job
    ``liveupdate``, and the Pushgateway at *gateway* (HOST:PORT) if any."""
    quoted = ", ".join(f'"{t}"' for t in targets)
    text = (
        f"global: {{scrape_interval: {interval}, evaluation_interval: {interval}}}\n"
        "scrape_configs:\n"
        "  - job_name: liveupdate\n"
        f"    static_configs: [{{targets: [{quoted}]}}]\n"
    )
    if gateway is not None:
        text += (
            "  - job_name: pushgateway\n"
            "    honor_labels: true\n"
            f'    static_configs: [{{targets: ["{gateway}"]}}]\n'
        )
    return text


@contextlib.contextmanager
def running_prometheus(
    binary: str,
    root: Path,
    targets: list[str],
    *,
    gateway: str | None = None,
    interval: str = "1s",
) -> Iterator[Server]:
    """A real Prometheus on a free loopback port, scraping *targets*; its
    configuration, data and log in *root*."""
    (root / "prometheus.yml").write_text(
        prometheus_config(targets, gateway=gateway, interval=interval)
    )
    port = free_port()
    with running(
        "prometheus",
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}",
        "/-/ready",
        root / "prometheus.log",
    ) as server:
        yield server


@contextlib.contextmanager
def running_fleet(root: Path, count: int) -> Iterator[Fleet]:
    fleet = Fleet(root, count)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
