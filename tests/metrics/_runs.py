"""Real updates on the simulated kernel, for the metrics and report tests.

Each starts real workload processes (the demo key-value stores) and runs
``liveupdate`` as a separate process, as ``tests/engine/test_update.py`` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestrator.demo import launch, wait_published
from orchestrator.luo.sim import SimKernel

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def liveupdate(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )


def stop_workloads(state: Path) -> None:
    """SIGKILL every workload registered under *state* (test teardown)."""
    for entry in (state / "workloads").glob("*.json"):
        try:
            os.kill(json.loads(entry.read_text())["pid"], signal.SIGKILL)
        except (ProcessLookupError, ValueError, KeyError):
            pass


def cancelled_run(
    state: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """An update that retries a step twice in prepare, then fails in freeze and
    is cancelled: the rollback undoes every completed step in reverse order."""
    kernel = SimKernel(state / "kernel")
    registry = state / "workloads"
    for i in range(2):
        pid = launch(registry, f"kv{i}", 4, kernel.spec)
        wait_published(registry, f"kv{i}", pid)
    image = state / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    flaky = {
        "plugin": "faults",
        "retry": {"attempts": 3, "backoff": "20ms"},
        "with": {"transient_failures": 2},
    }
    phases: dict[str, list[dict[str, Any]]] = {
        "quiesce": [{"plugin": "workloads"}],
        "preserve": [{"plugin": "workloads"}],
        "prepare": [{"plugin": "kexec"}, flaky],
        "freeze": [
            {"plugin": "workloads"},
            {"plugin": "faults", "with": {"fail": "the disk is on fire"}},
        ],
        "restore": [{"plugin": "workloads"}],
        "finish": [{"plugin": "workloads"}],
    }
    doc = {
        "name": "cancelled",
        "kernel": kernel.spec,
        "state_dir": str(state),
        "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
        "blackout_budget": "5s",
        "defaults": {"timeout": "60s"},
        "phases": {p: {"steps": s} for p, s in phases.items()},
    }
    book = state / "playbook.yaml"
    book.write_text(json.dumps(doc))  # JSON is YAML
    return liveupdate("run", str(book), env=env)
