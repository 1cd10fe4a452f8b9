"""Whole updates on the simulated kernel, with faults injected in every phase.

Each test starts real workload processes (the demo key-value stores, data in
memfds), runs ``liveupdate run`` as a separate process -- the simulated kexec
ends it, as a real one would -- and checks how the host ends: updated, or
back in NORMAL with the workloads running and their data intact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.restore._journal import Journal, read_journal
from tests.engine.conftest import ROOT, Host, events


def test_complete_update(host: Host) -> None:
    book = host.playbook()
    boot = host.kernel.boot_id()
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL, run.stderr  # ended by the kexec
    assert host.kernel.boot_id() != boot
    resume = host.liveupdate("resume", str(book))
    assert resume.returncode == 0, resume.stdout + resume.stderr
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "completed")
    assert status["blackout_s"] > 0
    assert len(status["boots"]) == 2
    host.assert_workloads_intact()
    assert host.liveupdate("resume", str(book)).stdout.startswith("nothing to resume")


@pytest.mark.parametrize("phase", ["quiesce", "preserve", "prepare", "freeze"])
def test_hook_raises_cancels(host: Host, phase: str) -> None:
    trace = host.state / "trace"
    book = host.playbook(
        {phase: [{"plugin": "faults", "with": {"fail": "boom", "trace": str(trace)}}]}
    )
    boot = host.kernel.boot_id()
    run = host.liveupdate("run", str(book))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "boom" in run.stdout
    assert host.kernel.boot_id() == boot, "no kexec may happen"
    assert not host.kernel.kexec_loaded(), "the next kernel must be unloaded"
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled")
    rolled = [r["phase"] for r in events(host, "rollback_end")]
    order = ["quiesce", "preserve", "prepare", "freeze"]
    assert rolled == sorted(rolled, key=order.index, reverse=True), (
        "undo in reverse order"
    )
    host.assert_workloads_intact()


@pytest.mark.parametrize("phase", ["quiesce", "preserve", "prepare", "freeze"])
def test_hook_timeout_cancels(host: Host, phase: str) -> None:
    step = {"plugin": "faults", "timeout": "300ms", "with": {"hang": 30}}
    book = host.playbook({phase: [step]})
    run = host.liveupdate("run", str(book))
    assert run.returncode == 5
    assert "timed out after 0.3 s" in run.stdout
    assert host.status()["outcome"] == "cancelled"
    assert not host.kernel.kexec_loaded()
    host.assert_workloads_intact()


def test_transient_error_succeeds_on_attempt_3(host: Host) -> None:
    step = {
        "plugin": "faults",
        "retry": {"attempts": 3, "backoff": "10ms"},
        "with": {"transient_failures": 2},
    }
    book = host.playbook({"prepare": [step]})
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert "attempt 1 failed" in run.stdout
    assert "attempt 2 failed" in run.stdout
    retries = events(host, "retry")
    assert [r["attempt"] for r in retries] == [1, 2]
    (end,) = [r for r in events(host, "step_end") if r["plugin"] == "faults"]
    assert end["attempts"] == 3
    assert host.liveupdate("resume", str(book)).returncode == 0
    assert host.status()["outcome"] == "completed"
    host.assert_workloads_intact()


@pytest.mark.parametrize("phase", ["quiesce", "preserve", "prepare", "freeze"])
def test_orchestrator_killed_then_resume_cancels(host: Host, phase: str) -> None:
    book = host.playbook({phase: [{"plugin": "faults", "with": {"kill_self": True}}]})
    boot = host.kernel.boot_id()
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL
    assert host.kernel.boot_id() == boot, "killed before the kexec"
    assert host.status()["outcome"] is None, "the run is unfinished"
    resume = host.liveupdate("resume", str(book))
    assert resume.returncode == 5, resume.stdout + resume.stderr
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled")
    assert not host.kernel.kexec_loaded()
    host.assert_workloads_intact()  # SIGCONT'd if the freeze had paused them


@pytest.mark.parametrize("phase", ["quiesce", "preserve", "prepare"])
def test_workload_dies_cancels_and_restarts_it(host: Host, phase: str) -> None:
    book = host.playbook(
        {phase: [{"plugin": "faults", "with": {"kill_workload": "kv1"}}]}
    )
    run = host.liveupdate("run", str(book))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "died before the freeze" in run.stdout
    assert host.status()["outcome"] == "cancelled"
    host.assert_workloads_intact()  # kv1 restarted from the memfd the plugin held
    kv0 = json.loads((host.registry / "kv0.json").read_text())["pid"]
    assert kv0 == host.pids["kv0"], "kv0 kept running: not restarted"
    state = Path(f"/proc/{kv0}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state in ("R", "S"), f"kv0 must run, not be left paused ({state})"


def test_workload_dies_after_the_freeze_is_restored_from_preserved_memory(
    host: Host,
) -> None:
    """Killed while paused in the blackout: its memory was preserved, so the
    update completes and the workload comes back with its data."""
    book = host.playbook(
        {"freeze": [{"plugin": "faults", "with": {"kill_workload": "kv1"}}]}
    )
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL  # the kexec happened
    assert host.liveupdate("resume", str(book)).returncode == 0
    assert host.status()["outcome"] == "completed"
    host.assert_workloads_intact()


def test_kernel_refuses_freeze_cancels(host: Host) -> None:
    host.kernel.inject_fault("freeze", "EIO")
    book = host.playbook()
    run = host.liveupdate("run", str(book))
    assert run.returncode == 5
    assert "refused to freeze" in run.stdout
    assert not host.kernel.kexec_loaded()
    host.assert_workloads_intact()


def test_blackout_budget_exceeded_cancels(host: Host) -> None:
    book = host.playbook(
        {"freeze": [{"plugin": "faults", "with": {"hang": 10}}]}, budget="300ms"
    )
    run = host.liveupdate("run", str(book))
    assert run.returncode == 5
    assert "exceeded the blackout budget of 0.3 s" in run.stdout
    host.assert_workloads_intact()


def test_second_orchestrator_is_refused(host: Host) -> None:
    book = host.playbook()
    with Journal(host.state, host.kernel.boot_id()).locked("test"):
        run = host.liveupdate("run", str(book))
    assert run.returncode == 1
    assert "another orchestrator is running on this host" in run.stderr
    host.assert_workloads_intact()


def test_plan_shows_steps_and_does_nothing(host: Host) -> None:
    book = host.playbook()
    done = host.liveupdate("plan", str(book))
    assert done.returncode == 0, done.stderr
    assert "1. workloads [workloads] timeout 20 s" in done.stdout
    assert "kexec (the engine" in done.stdout
    assert not (host.state / "journal.jsonl").exists()


def test_malformed_playbook_is_one_clear_error(host: Host) -> None:
    bad = host.state / "bad.yaml"
    bad.write_text("name: x\nphases:\n  quiesce:\n    steps:\n      - plugin: nosuch\n")
    done = host.liveupdate("plan", str(bad))
    assert done.returncode == 2
    assert f"{bad}:5:" in done.stderr
    assert "unknown plugin 'nosuch'" in done.stderr


def test_resume_retrieves_sessions_before_heavy_imports(host: Host) -> None:
    """The restore path's first kernel call happens with only the stdlib and the
    kernel layer loaded: no anyio, pluggy, tenacity, YAML or metrics stack --
    and what it retrieved outlives the process that asked for it."""
    book = host.playbook()
    assert host.liveupdate("run", str(book)).returncode == -signal.SIGKILL
    probe = (
        "import sys\n"
        "from orchestrator.restore import _resume\n"
        f"r = _resume.prefetch(['--state-dir', {str(host.state)!r}])\n"
        "heavy = {'anyio', 'pluggy', 'tenacity', 'yaml', 'prometheus_client', 'httpx'}\n"
        "print(r[1].missing, sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[] []"
    # That process ended; the keeper it started still holds the retrieved
    # session, so the next resume restores every byte.
    resume = host.liveupdate("resume", str(book), "--state-dir", str(host.state))
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert host.status()["outcome"] == "completed"
    host.assert_workloads_intact()


def test_resume_fast_path_completes_the_update(host: Host) -> None:
    book = host.playbook()
    assert host.liveupdate("run", str(book)).returncode == -signal.SIGKILL
    resume = host.liveupdate("resume", str(book), "--state-dir", str(host.state))
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert host.status()["outcome"] == "completed"
    host.assert_workloads_intact()


def test_cancel_command_stops_a_running_update(host: Host) -> None:
    book = host.playbook({"prepare": [{"plugin": "faults", "with": {"hang": 120}}]})
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(book)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(
        r["event"] == "step_start" and r.get("plugin") == "faults"
        for r in read_journal(host.state)
    ):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the update never reached the hanging step"
        time.sleep(0.05)
    cancel = host.liveupdate("cancel", "--state-dir", str(host.state))
    assert cancel.returncode == 0
    assert f"asked the orchestrator (pid {proc.pid}) to cancel" in cancel.stdout
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, out + err
    assert "cancelled by SIGTERM" in out
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled")
    assert not host.kernel.kexec_loaded()
    host.assert_workloads_intact()
    idle = host.liveupdate("cancel", "--state-dir", str(host.state))
    assert "no orchestrator is running" in idle.stdout
