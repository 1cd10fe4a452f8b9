"""Whole updates of a host running a real QEMU VM, on the simulated kernel.

``liveupdate run`` runs in its own process; the simulated kexec SIGKILLs it and
every registered participant -- the QEMU included -- after copying the
preserved guest-RAM memfd into the next "boot". ``liveupdate resume`` then
starts a new QEMU on that memory and loads the saved device state: the guest
must go on from where it stopped, not boot again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.observe._metrics import register_metrics
from orchestrator.restore._journal import read_journal
from orchestrator.vmm import VmSpec, launch_vm, running

from .conftest import assert_pattern
from .guest_vm import COUNTER, PROBES, wait_counting, words
from .guest_vm import qmp_status as status

if TYPE_CHECKING:
    from .conftest import VmHost

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.kexec


def playbook(
    host: VmHost,
    extra_freeze: list[dict[str, Any]] | None = None,
    mode: str = "auto",
) -> Path:
    image = host.state / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    qemu: dict[str, Any] = {"plugin": "qemu"}
    quiesce = {"vms": ["vm0"], "probe": PROBES, "mode": mode}
    phases: dict[str, list[dict[str, Any]]] = {
        "quiesce": [{"plugin": "qemu", "with": quiesce}],
        "preserve": [qemu],
        "prepare": [{"plugin": "kexec"}],
        "freeze": [qemu, *(extra_freeze or [])],
        "restore": [qemu],
        "finish": [qemu],
    }
    doc = {
        "name": "qemu-test",
        "kernel": host.kernel.spec,
        "state_dir": str(host.state),
        "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
        "blackout_budget": "120s",  # a loaded 2-core host; nothing is timed here
        "defaults": {"timeout": "180s"},
        "phases": {p: {"steps": s} for p, s in phases.items()},
    }
    path = host.state / "playbook.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def liveupdate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def step_records(host: VmHost, phase: str) -> dict[str, Any]:
    (end,) = [
        r
        for r in read_journal(host.state)
        if r["event"] == "step_end"
        and r["phase"] == phase
        and r["plugin"] == "qemu"
        and r["ok"]
    ]
    records: dict[str, Any] = end["records"]
    return records


@pytest.mark.parametrize("restore_path", [False, True], ids=["engine", "restore-path"])
def test_vm_survives_the_kexec(vm_host: VmHost, restore_path: bool) -> None:
    """Without ``--state-dir`` the engine's restore phase brings the VM back;
    with it (as the boot unit runs it) the restore path does, before the
    engine is loaded, and the restore phase adopts that QEMU."""
    old = vm_host.vm
    book = playbook(vm_host)
    boot = vm_host.kernel.boot_id()

    run = liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert vm_host.kernel.boot_id() != boot
    assert _gone(old.pid), "the kexec ends the old QEMU"
    frozen = step_records(vm_host, "freeze")["frozen"]["vm0"]
    at_stop = frozen["probe"][str(COUNTER)]
    assert frozen["state_bytes"] > 0

    fast = ["--state-dir", str(vm_host.state)] if restore_path else []
    resume = liveupdate("resume", str(book), *fast)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    (end,) = [r for r in read_journal(vm_host.state) if r["event"] == "blackout_end"]
    assert end["ended_by"] == ("restore-path" if restore_path else "restore-phase")
    state = json.loads(
        liveupdate("status", "--state-dir", str(vm_host.state), "--json").stdout
    )
    assert (state["state"], state["outcome"]) == ("NORMAL", "completed")

    records = step_records(vm_host, "restore")
    assert records["blackout_s"] > 0
    assert set(records["vm_blackout_s"]) == {"vm0"}
    # Each VM's own pause, by name, in the status (the fleet's summary).
    assert state["vm_blackouts"] == pytest.approx(records["vm_blackout_s"])
    # ...and exported through the engine's metrics, equal to the journal's.
    registry = CollectorRegistry()
    register_metrics(registry, vm_host.state, history=False)
    assert registry.get_sample_value(
        "liveupdate_last_plugin_blackout_seconds", {"plugin": "qemu"}
    ) == pytest.approx(records["blackout_s"])
    assert registry.get_sample_value("liveupdate_vm_blackout_seconds_count") == 1
    assert registry.get_sample_value(
        "liveupdate_vm_blackout_seconds_sum"
    ) == pytest.approx(records["vm_blackout_s"]["vm0"])

    new = vm_host.current()
    assert new.pid != old.pid
    assert running(new.pid)
    assert status(new.qmp) == "running"
    # One QEMU for the VM: the restore phase adopted the restore path's.
    qemus = [
        p
        for p in Path("/proc").glob("[0-9]*")
        if _cmdline(p).startswith("qemu-system")
        and f"{vm_host.registry}" in _cmdline(p)
    ]
    assert [int(p.name) for p in qemus] == [new.pid]
    assert_pattern(new.qmp)
    counter, boots = words(new.qmp, COUNTER, 2)
    assert boots == 1, "the guest booted again instead of going on"
    assert counter >= at_stop, f"counter {counter:#x} < {at_stop:#x} at the stop"
    wait_counting(new.qmp, above=counter)  # and it keeps counting
    assert not Path(frozen["state_file"]).exists(), "finish removes the state file"
    assert liveupdate("resume", str(book)).stdout.startswith("nothing to resume")


@pytest.mark.parametrize("crash_at", ["spawn:1", "record:1"])
def test_a_resumed_guest_is_never_started_twice(vm_host: VmHost, crash_at: str) -> None:
    """``resume`` killed right after the restore path started the VM's
    restore (it may still be loading), or after the guest ran again: the next
    resume waits for that QEMU and adopts it. A second QEMU on the same RAM,
    restarted from the saved state, would corrupt a guest that ran on."""
    book = playbook(vm_host)
    assert liveupdate("run", str(book)).returncode == -signal.SIGKILL
    args = ["resume", str(book), "--state-dir", str(vm_host.state)]
    env = {**os.environ, "LIVEUPDATE_TEST_CRASH_AT": crash_at}
    killed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resume = liveupdate(*args)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    new = vm_host.current()
    qemus = [
        int(p.name)
        for p in Path("/proc").glob("[0-9]*")
        if _cmdline(p).startswith("qemu-system")
        and str(vm_host.registry) in _cmdline(p)
    ]
    assert qemus == [new.pid]
    assert status(new.qmp) == "running"
    counter, boots = words(new.qmp, COUNTER, 2)
    assert boots == 1, "the guest booted again instead of going on"
    wait_counting(new.qmp, above=counter)


def test_cancel_in_freeze_resumes_the_same_vm(vm_host: VmHost) -> None:
    vm = vm_host.vm
    book = playbook(vm_host, [{"plugin": "faults", "with": {"fail": "boom"}}])
    boot = vm_host.kernel.boot_id()

    run = liveupdate("run", str(book))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "boom" in run.stdout
    assert vm_host.kernel.boot_id() == boot, "no kexec may happen"
    state = json.loads(
        liveupdate("status", "--state-dir", str(vm_host.state), "--json").stdout
    )
    assert (state["state"], state["outcome"]) == ("NORMAL", "cancelled")

    assert vm_host.current().pid == vm.pid
    assert running(vm.pid)
    assert status(vm.qmp) == "running"
    assert_pattern(vm.qmp)
    counter, boots = words(vm.qmp, COUNTER, 2)
    assert boots == 1
    wait_counting(vm.qmp, above=counter)


def test_a_qemu_without_the_mode_asked_for_fails_the_quiesce_untouched(
    vm_host: VmHost,
) -> None:
    """Asking for cpr-reboot of a QEMU older than 8.2 cancels the update at
    the quiesce, naming the version, with the VM as it was."""
    vm = vm_host.vm
    if qmp_version(vm.qmp) >= (8, 2):
        pytest.skip("this QEMU has cpr-reboot")
    run = liveupdate("run", str(playbook(vm_host, mode="cpr-reboot")))
    assert run.returncode == 5, run.stdout + run.stderr
    version = ".".join(map(str, qmp_version(vm.qmp)))
    assert f"QEMU {version} has no cpr-reboot" in run.stdout
    state = json.loads(
        liveupdate("status", "--state-dir", str(vm_host.state), "--json").stdout
    )
    assert (state["state"], state["outcome"]) == ("NORMAL", "cancelled")
    assert status(vm.qmp) == "running"
    assert capabilities(vm.qmp)["x-ignore-shared"] is False


def test_every_vm_is_checked_before_any_is_changed(
    vm_host: VmHost, guest_image: Path
) -> None:
    """vm0 runs, vm1 is paused: the quiesce fails on vm1 and vm0's migration
    settings are as before (a later ordinary migration must carry its RAM)."""
    image = vm_host.state / "vm1.img"  # QEMU locks its disk for writing
    image.write_bytes(guest_image.read_bytes())
    spec = VmSpec(name="vm1", image=str(image), ram_mib=64)
    vm1 = launch_vm(vm_host.registry, spec, vm_host.kernel.spec)
    vm_host.pids.add(vm1.pid)
    wait_counting(vm1.qmp)
    qmp_execute(vm1.qmp, "stop")
    book = playbook(vm_host)
    doc = json.loads(book.read_text())
    doc["phases"]["quiesce"]["steps"][0]["with"]["vms"] = ["vm0", "vm1"]
    book.write_text(json.dumps(doc))

    run = liveupdate("run", str(book))
    assert run.returncode == 5, run.stdout + run.stderr
    assert "vm1" in run.stdout
    assert "not running" in run.stdout
    assert status(vm_host.vm.qmp) == "running"
    assert capabilities(vm_host.vm.qmp)["x-ignore-shared"] is False
    assert status(vm1.qmp) == "paused"


def test_a_mode_that_does_not_exist_is_refused_at_load(vm_host: VmHost) -> None:
    book = playbook(vm_host, mode="cpr-transfer")
    plan = liveupdate("plan", str(book))
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "mode" in plan.stderr
    assert "expected one of auto, cpr-reboot, x-ignore-shared" in plan.stderr


def qmp_execute(qmp_path: str, command: str) -> Any:
    import anyio

    from orchestrator.vmm import open_qmp

    async def execute() -> Any:
        async with open_qmp(qmp_path) as qmp:
            return await qmp.execute(command)

    return anyio.run(execute)


def qmp_version(qmp_path: str) -> tuple[int, int, int]:
    import anyio

    from orchestrator.vmm import open_qmp

    async def greet() -> tuple[int, int, int]:
        async with open_qmp(qmp_path) as qmp:
            return qmp.version

    return anyio.run(greet)


def capabilities(qmp_path: str) -> dict[str, bool]:
    reply = qmp_execute(qmp_path, "query-migrate-capabilities")
    return {c["capability"]: bool(c["state"]) for c in reply}


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _gone(pid: int, timeout: float = 30.0) -> bool:
    """Whether *pid* has ended within *timeout*: the simulated kexec sends
    SIGKILL, and a loaded host may take a moment to tear a QEMU down."""
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
