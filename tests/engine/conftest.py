"""The simulated host the engine's tests update: a sim kernel, demo workloads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from orchestrator.demo import launch, wait_published
from orchestrator.demo.kv import ask
from orchestrator.luo.sim import SimKernel
from orchestrator.restore._journal import read_journal

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Host:
    state: Path
    kernel: SimKernel
    registry: Path
    sums: dict[str, str]
    pids: dict[str, int]

    def playbook(
        self, extra: dict[str, list[dict[str, Any]]] | None = None, budget: str = "5s"
    ) -> Path:
        phases: dict[str, list[dict[str, Any]]] = {
            "quiesce": [{"plugin": "workloads"}],
            "preserve": [{"plugin": "workloads"}],
            "prepare": [{"plugin": "kexec"}],
            "freeze": [{"plugin": "workloads"}],
            "restore": [{"plugin": "workloads"}],
            "finish": [{"plugin": "workloads"}],
        }
        for phase, steps in (extra or {}).items():
            phases[phase] = phases.get(phase, []) + steps
        image = self.state / "vmlinuz-next"
        image.write_bytes(b"simulated kernel image\n")
        doc = {
            "name": "test",
            "kernel": self.kernel.spec,
            "state_dir": str(self.state),
            "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
            "blackout_budget": budget,
            "defaults": {"timeout": "20s"},
            "phases": {p: {"steps": s} for p, s in phases.items()},
        }
        path = self.state / "playbook.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    def liveupdate(
        self, *args: str, crash_at: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``liveupdate`` command; *crash_at* (``record:N``,
        ``keeper:N``) SIGKILLs it at that point (``orchestrator.restore._crashpoint``)."""
        env = {**os.environ}
        if crash_at is not None:
            env["LIVEUPDATE_TEST_CRASH_AT"] = crash_at
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=240,
            env=env,
        )

    def resume(
        self, book: Path, crash_at: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``liveupdate resume`` as the boot unit runs it (with --state-dir)."""
        return self.liveupdate(
            "resume", str(book), "--state-dir", str(self.state), crash_at=crash_at
        )

    def assert_running(self) -> None:
        """Every workload runs (not stopped, not dead) and answers."""
        for name in self.sums:
            info = json.loads((self.registry / f"{name}.json").read_text())
            stat = Path(f"/proc/{info['pid']}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] not in ("T", "Z", "X"), name
            assert ask(info["socket"], "PING", timeout=10) == "PONG"

    def status(self) -> dict[str, Any]:
        done = self.liveupdate("status", "--state-dir", str(self.state), "--json")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def assert_workloads_intact(self) -> None:
        for name, checksum in self.sums.items():
            info = json.loads((self.registry / f"{name}.json").read_text())
            assert ask(info["socket"], "SUM", timeout=60) == checksum, (
                f"{name} lost data"
            )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    state = tmp_path / "state"
    kernel = SimKernel(state / "kernel")
    registry = state / "workloads"
    sums, pids = {}, {}
    for i in range(2):
        pid = pids[f"kv{i}"] = launch(registry, f"kv{i}", 4, kernel.spec)
        sums[f"kv{i}"] = wait_published(registry, f"kv{i}", pid)["sha256"]
    yield Host(state, kernel, registry, sums, pids)
    for entry in registry.glob("*.json"):
        try:
            os.kill(json.loads(entry.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for pid in kernel.participants():  # keepers left holding a failed restore
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def events(host: Host, name: str) -> list[dict[str, Any]]:
    return [r for r in read_journal(host.state) if r["event"] == name]
