"""The boot path through the shipped units' own commands, in their order.

An update runs through the agent and the (simulated) kexec ends it; then, as
systemd would at boot, the resume unit's ``ExecStart`` runs (it is ordered
before the agent), then the agent unit's. The commands are taken from the
unit files in ``deploy/systemd/`` -- only the paths are moved into the test's
directory and the kernel is the simulated one -- so a change to the units is
a change to what is tested here. What must hold: the workload reclaims every
byte it handed to the agent, whatever crashes on the way.

systemd itself is not run here (it cannot be PID 1 in this test); the VM
harness boots the units under real systemd.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.agent_client import AgentClient
from orchestrator.luo.sim import SimKernel
from tests.cli._util import listening_line

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"


def exec_start(unit: str) -> list[str]:
    """The unit's ExecStart, as argv."""
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise AssertionError(f"{unit} has no ExecStart")


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("workload", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


class Boot:
    """One host: its paths, the units' commands rewritten to them."""

    def __init__(self, tmp: Path) -> None:
        self.kernel = SimKernel(tmp / "kernel")
        self.state = tmp / "var-lib-liveupdate"
        self.run_dir = tmp / "run-liveupdate"
        self.playbook = tmp / "etc-liveupdate-playbook.yaml"
        image = tmp / "vmlinuz-next"
        image.write_bytes(b"simulated kernel image\n")
        self.playbook.write_text(
            json.dumps(
                {
                    "name": "host",
                    "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
                    "phases": {"prepare": {"steps": [{"plugin": "kexec"}]}},
                }
            )
        )
        self.paths = {
            "/var/lib/liveupdate": str(self.state),
            "/run/liveupdate": str(self.run_dir),
            "/etc/liveupdate/playbook.yaml": str(self.playbook),
        }
        self.env = {**os.environ, "LIVEUPDATE_KERNEL": self.kernel.spec}

    def command(self, unit: str) -> list[str]:
        argv = exec_start(unit)
        assert argv[0].endswith("/liveupdate"), argv
        out = [sys.executable, "-m", "orchestrator.cli"]
        for word in argv[1:]:
            for old, new in self.paths.items():
                word = word.replace(old, new)
            out.append(word)
        return out

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"

    def start_agent(self, crash_at: str | None = None) -> subprocess.Popen[str]:
        env = dict(self.env)
        if crash_at:
            env["LIVEUPDATE_TEST_CRASH_AT"] = crash_at
        proc = subprocess.Popen(
            self.command("liveupdate-agent.service"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        line = listening_line(proc.stdout)
        if crash_at is None:
            assert "agent listening" in line, line
        return proc

    def resume_unit(self) -> subprocess.CompletedProcess[str]:
        """The resume unit, if its condition holds (as systemd checks it)."""
        assert (self.state / "restore-plan").exists()  # ConditionPathExists=
        return subprocess.run(
            self.command("liveupdate-resume.service"),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def status(self) -> dict[str, object]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "status",
                "--state-dir",
                str(self.state),
                "--json",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Boot]:
    host = Boot(tmp_path)
    yield host
    for pid in host.kernel.participants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def update_through_the_agent(boot: Boot) -> dict[str, bytes]:
    """Workloads hand memfds to the agent and let go; the agent runs the
    update; the simulated kexec ends it."""
    first = boot.start_agent()
    payloads = {f"vm{i}-ram": os.urandom(1 << 20) for i in range(2)}
    before = boot.kernel.boot_id()
    with AgentClient(boot.socket) as client:
        for name, data in payloads.items():
            fd = memfd_with(data)
            client.register(name, fd)
            os.close(fd)
        client.run(boot.playbook)
    assert first.wait(timeout=120) == -signal.SIGKILL
    stop(first)
    assert boot.kernel.boot_id() != before
    return payloads


def reclaim_all(boot: Boot, payloads: dict[str, bytes]) -> None:
    with AgentClient(boot.socket) as client:
        for name, data in payloads.items():
            fd = client.reclaim(name)
            assert os.pread(fd, len(data) + 1, 0) == data  # every byte
            os.close(fd)


def test_units_in_boot_order_bring_the_agents_fds_back(boot: Boot) -> None:
    payloads = update_through_the_agent(boot)
    resume = boot.resume_unit()
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert "belongs to the agent" in resume.stdout
    agent = boot.start_agent()
    try:
        reclaim_all(boot, payloads)
    finally:
        stop(agent)
    status = boot.status()
    assert status["outcome"] == "completed", status
    assert not (boot.state / "restore-plan").exists()


@pytest.mark.parametrize("crash_at", ["record:2", "record:6", "keeper:2"])
def test_agent_killed_while_it_resumes_is_restarted_and_loses_nothing(
    boot: Boot, crash_at: str
) -> None:
    """Restart=on-failure: the agent dies in the middle of its resume; started
    again, it finishes the update from the keeper's fds."""
    payloads = update_through_the_agent(boot)
    assert boot.resume_unit().returncode == 0
    crashed = boot.start_agent(crash_at=crash_at)
    assert crashed.wait(timeout=120) == -signal.SIGKILL
    stop(crashed)
    agent = boot.start_agent()
    try:
        reclaim_all(boot, payloads)
    finally:
        stop(agent)
    assert boot.status()["outcome"] == "completed"


def test_resume_unit_killed_then_the_agent_restores(boot: Boot) -> None:
    payloads = update_through_the_agent(boot)
    env = {**boot.env, "LIVEUPDATE_TEST_CRASH_AT": "keeper:1"}
    killed = subprocess.run(
        boot.command("liveupdate-resume.service"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    agent = boot.start_agent()
    try:
        reclaim_all(boot, payloads)
    finally:
        stop(agent)
    assert boot.status()["outcome"] == "completed"
