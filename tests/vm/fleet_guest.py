"""Guest side of the ``fleet`` scenario: one host of the fleet (runs inside the VM).

Each boot brings the host up as its service manager would: the NIC on QEMU's
user network, sshd, the boot-time resume (when an update waits for it), the
agent, ``liveupdate metrics serve`` and a workload that publishes its pid.
Everything the host keeps across the kexec -- the agent's state directory,
the playbook, sshd's keys and configuration (written by the host side,
:mod:`tests.vm.e2e_fleet`) -- lives on the out share; the logs go there too
(``log/<name>-boot<N>.log``).

``pre`` (boot 1): once the host is up, a workload fills a memfd of ``--mib``
MiB, hands it to the agent and closes its own copy; ``fleet-pre.json`` records
its SHA-256, the boot id, the release and the liveupdate number. Then it waits:
Ansible's rollout (over SSH) makes the agent kexec the host into ``post``.

``post`` (boot 2, the target kernel): the host comes up again (the resume
before the agent) and reads its boot id, release, liveupdate number and
``liveupdate status``; then it waits until the host side, its rollout done,
writes ``finish`` to the out share, reclaims the workload's memfd from the
agent and writes all of it, with the memfd's SHA-256, to ``fleet-post.json``.

Run as ``python -m tests.vm.fleet_guest pre|post [--mib N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.vm.guest import boot_index, mark, out_dir, write_json

OUT = out_dir()
STATE = OUT / "state"
PLAYBOOK = OUT / "playbook.yaml"
LOGS = OUT / "log"
BIN = Path(sys.executable).parent
WORKLOAD = "data"
GUEST_ADDRESS = "10.0.2.15/24"
GATEWAY = "10.0.2.2"
METRICS_PORT = 9731
CONTROL = Path("/run/liveupdate/control.sock")
#: How long a stage waits for what the host side does (its rollout).
WAIT_S = 2400.0


def say(msg: str) -> None:
    print(f"fleet-guest: {msg}", flush=True)


def run(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False
    )


def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """A service of this boot, its output in ``log/<name>-boot<N>.log``."""
    with open(LOGS / f"{name}-boot{boot_index()}.log", "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def wait_for(what: str, check: Any, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not so after {deadline:g} s")


def network() -> None:
    """eth0 (virtio-net) on QEMU's user network, the address QEMU's
    forwards go to; the host is 10.0.2.2."""
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "addr", "add", GUEST_ADDRESS, "dev", "eth0"],
        ["ip", "route", "add", "default", "via", GATEWAY],
    ):
        done = run(argv)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def boot_services() -> None:
    """What the host's service manager starts at each boot, in its order."""
    LOGS.mkdir(exist_ok=True)
    for d in ("/run/sshd", "/run/liveupdate", "/run/workloads"):
        os.makedirs(d, mode=0o755, exist_ok=True)
    network()
    mark("fleet.network")
    start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(OUT / "sshd_config")])
    liveupdate = str(BIN / "liveupdate")
    # The metrics endpoint first, as an exporter independent of the update
    # would be: Prometheus sees the host up again while its update resumes,
    # so the gate that follows does not read the blackout's up == 0.
    start(
        "metrics",
        [
            liveupdate,
            "metrics",
            "serve",
            "--state-dir",
            str(STATE),
            "--listen",
            f"0.0.0.0:{METRICS_PORT}",
            "--workloads",
            "/run/workloads",
        ],
    )
    if (STATE / "restore-plan").exists():
        # Its output to a file, not a pipe: the keeper it leaves behind for
        # the agent inherits it, and would hold a pipe open.
        resume = start(
            "resume", [liveupdate, "resume", str(PLAYBOOK), "--state-dir", str(STATE)]
        )
        mark("fleet.resume", rc=resume.wait(timeout=600))
    start("agent", [liveupdate, "agent", "--state-dir", str(STATE)])
    wait_for("the agent's control socket", CONTROL.exists, 300)
    mark("fleet.agent")
    # The workload's process, published for the metrics endpoint (the gate
    # checks that it runs), as each boot's service manager would start it.
    start(
        "app",
        [
            "/bin/sh",
            "-c",
            'printf \'{"name": "app", "pid": %d}\' $$ > /run/workloads/app.json; '
            "exec sleep infinity",
        ],
    )


def fill(fd: int, mib: int) -> str:
    """Write *mib* MiB to *fd*, no 4 KiB page of which equals another (a
    random seed, then the page's index, repeated over the page), a MiB at a
    time (the guest has little memory to spare); their SHA-256."""
    seed = hashlib.sha256(os.urandom(32)).digest()
    page, per_mib = 4096, 256
    reps, pad = page // 40, bytes(page % 40)
    h = hashlib.sha256()
    for m in range(mib):
        chunk = b"".join(
            (seed + i.to_bytes(8, "little")) * reps + pad
            for i in range(m * per_mib, (m + 1) * per_mib)
        )
        os.write(fd, chunk)
        h.update(chunk)
    return h.hexdigest()


def host_facts() -> dict[str, Any]:
    """What this host says of itself: boot id, release, ``liveupdate probe``."""
    # --no-kinds, as the collection's facts: in the target kernel, probing
    # the preservable kinds did not answer within 120 s (three TCG guests
    # on two cores) while the agent held the device.
    probe = run([str(BIN / "liveupdate"), "probe", "--json", "--no-kinds"])
    try:
        report: dict[str, Any] = json.loads(probe.stdout)
    except ValueError:
        report = {"error": probe.stdout + probe.stderr}
    return {
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "release": os.uname().release,
        "liveupdate_number": report.get("liveupdate_number"),
        "probe": report,
    }


def digest(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest(), offset


def stage_pre(mib: int) -> int:
    from orchestrator.agent_client import AgentClient

    info: dict[str, Any] = {"stage": "pre", "ready": False}
    try:
        boot_services()
        fd = os.memfd_create(WORKLOAD, os.MFD_CLOEXEC)
        try:
            info["sha256"] = fill(fd, mib)
            info["size"] = os.fstat(fd).st_size
            with AgentClient(timeout=60) as agent:
                agent.register(WORKLOAD, fd)
        finally:
            os.close(fd)
        info.update(host_facts())
        info["ready"] = True
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    write_json(OUT / "fleet-pre.json", info)
    mark("fleet.ready", ok=info["ready"])
    say(f"pre: {json.dumps(info)}")
    if not info["ready"]:
        return 1
    # The rollout kexecs this host: the end of the rollout (or of the wait)
    # reached here is its failure.
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end and not (OUT / "finish").exists():
        time.sleep(1)
    say("the rollout is over (or the wait), and this host was not kexec'd")
    return 1


def stage_post() -> int:
    from orchestrator.agent_client import AgentClient, AgentError

    info: dict[str, Any] = {"stage": "post", "ok": False}
    try:
        boot_services()
        mark("fleet.up")
        # What the host says of itself is read now, while the rollout goes
        # on (the agent answers once it has resumed its update, and nothing
        # touches this host again); only the memfd waits for the end.
        info.update(host_facts())
        status = run(
            [str(BIN / "liveupdate"), "status", "--json", "--state-dir", str(STATE)]
        )
        with contextlib.suppress(ValueError):
            info["status"] = json.loads(status.stdout)
        wait_for("the host side's finish", (OUT / "finish").exists, WAIT_S)
        with AgentClient(timeout=60) as agent:
            fd = agent.reclaim(WORKLOAD)
        try:
            info["sha256"], info["size"] = digest(fd)
        finally:
            os.close(fd)
        info["ok"] = True
    except (OSError, RuntimeError, AgentError, subprocess.SubprocessError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    write_json(OUT / "fleet-post.json", info)
    mark("fleet.checked", ok=info["ok"])
    say(f"post: {json.dumps(info)}")
    return 0 if info["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet_guest")
    p.add_argument("stage", choices=("pre", "post"))
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args(argv)
    return stage_pre(args.mib) if args.stage == "pre" else stage_post()


if __name__ == "__main__":
    sys.exit(main())
