"""``liveupdate_workload_running``: whether published workloads run, at each scrape."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from orchestrator.observe._metrics import WorkloadsCollector

from .test_metrics import samples, value


def _publish(registry: Path, name: str, pid: object) -> None:
    (registry / f"{name}.json").write_text(json.dumps({"name": name, "pid": pid}))


def _wait_state(pid: int, state: str) -> None:
    """Signals arrive asynchronously: wait for /proc to show *state*."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != state:
        assert time.monotonic() < deadline, f"pid {pid} never in state {state}"
        time.sleep(0.01)


def _scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_running_stopped_and_gone_workloads(tmp_path: Path) -> None:
    workloads = tmp_path / "workloads"
    workloads.mkdir()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkloadsCollector(workloads))
    found = samples(_scrape(registry))
    assert value(found, "liveupdate_workloads_not_running") == 0

    serving = subprocess.Popen(["sleep", "300"])
    stopped = subprocess.Popen(["sleep", "300"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        stopped.send_signal(signal.SIGSTOP)
        _wait_state(stopped.pid, "T")
        _publish(workloads, "serving", serving.pid)
        _publish(workloads, "stopped", stopped.pid)
        _publish(workloads, "gone", gone.pid)
        _publish(workloads, "nopid", None)
        (workloads / "broken.json").write_text("{not json")
        (workloads / "serving.spec.json").write_text('{"pid": 1}')  # not a workload
        found = samples(_scrape(registry))
        running = {
            dict(labels)["workload"]: v
            for (name, labels), v in found.items()
            if name == "liveupdate_workload_running"
        }
        assert running == {
            "serving": 1.0,
            "stopped": 0.0,
            "gone": 0.0,
            "nopid": 0.0,
            "broken": 0.0,
        }
        assert value(found, "liveupdate_workloads_not_running") == 4
        # Computed at each scrape: the stopped one goes on, it runs again.
        stopped.send_signal(signal.SIGCONT)
        _wait_state(stopped.pid, "S")
        for name in ("gone", "nopid", "broken"):
            (workloads / f"{name}.json").unlink()
        found = samples(_scrape(registry))
        assert value(found, "liveupdate_workloads_not_running") == 0
        assert value(found, "liveupdate_workload_running", workload="stopped") == 1
    finally:
        for proc in (serving, stopped):
            proc.kill()
            proc.wait()


def test_no_registry_knows_no_workload(tmp_path: Path) -> None:
    for where in (None, tmp_path / "missing"):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkloadsCollector(where))
        found = samples(_scrape(registry))
        assert value(found, "liveupdate_workloads_not_running") == 0
        assert not [k for k in found if k[0] == "liveupdate_workload_running"]
