"""The ``systemd`` plugin: services whose fd stores systemd keeps across the kexec.

systemd cannot run as PID 1 on this host: a ``systemctl`` script on ``PATH``
stands in for it here, answering from a JSON file the test writes. The
``systemd`` VM scenario (``python -m tests.vm.e2e --only systemd``) runs the
plugin against systemd 262 through a real ``systemctl kexec``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from orchestrator.engine._engine import Engine
from orchestrator.engine._playbook import load_playbook
from orchestrator.restore._journal import read_journal
from plugins.systemd import SystemdPlugin
from tests.engine.conftest import events
from tests.engine.test_kexec_via import Parking, _run

if TYPE_CHECKING:
    from pathlib import Path

    from tests.engine.conftest import Host

FAKE_SYSTEMCTL = """#!{python}
import json, sys
state = json.load(open({state!r}))
args = sys.argv[1:]
if args == ["--version"]:
    print(f"systemd {{state['version']}} (fake)")
elif args[:1] == ["show"]:
    unit = args[-1]
    calls = state.setdefault("calls", {{}})
    calls[unit] = calls.get(unit, 0) + 1
    json.dump(state, open({state!r}, "w"))
    props = state["units"][unit]
    later = props.get("after_calls")
    if later and calls[unit] > later[0]:
        props = {{**props, **later[1]}}
    for p in args[1:-1]:
        key = p.split("=", 1)[1]
        print(f"{{key}}={{props.get(key, '')}}")
elif args == ["--no-block", "kexec"]:
    state["kexec"] = True
    json.dump(state, open({state!r}, "w"))
"""

GOOD = {
    "ActiveState": "active",
    "FileDescriptorStorePreserve": "yes",
    "NFileDescriptorStore": "2",
}


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake systemctl's state file: {"version": N, "units": {unit: props}}."""
    import sys

    state = tmp_path / "systemd.json"
    state.write_text(json.dumps({"version": 262, "units": {"db.service": GOOD}}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(FAKE_SYSTEMCTL.format(python=sys.executable, state=str(state)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state


def load(state: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(state.read_text())
    return loaded


def save(state: Path, value: dict[str, Any]) -> None:
    state.write_text(json.dumps(value))


def book(host: Host, via: str = "systemd") -> Path:
    path = host.playbook(
        {"quiesce": [{"plugin": "systemd", "with": {"services": ["db.service"]}}]}
    )
    doc = json.loads(path.read_text())
    doc["next_kernel"]["via"] = via
    path.write_text(json.dumps(doc))
    return path


def cancel_reason(host: Host) -> str:
    ends = [r for r in read_journal(host.state) if r["event"] == "run_end"]
    return str(ends[-1]["error"])


async def test_the_stores_are_checked_and_counted_then_the_kexec_is_systemds(
    host: Host, systemd: Path
) -> None:
    outcome, handed_off = await _run(host, book(host), Parking())
    assert (outcome, handed_off) == (None, True)
    assert load(systemd)["kexec"] is True
    [end] = [e for e in events(host, "step_end") if e["plugin"] == "systemd"]
    assert end["records"]["stores"] == {"db.service": 2}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"version": 257}, "systemd 257 does not preserve fd stores across a kexec"),
        (
            {"units": {"db.service": {**GOOD, "FileDescriptorStorePreserve": "no"}}},
            "db.service does not set FileDescriptorStorePreserve=yes",
        ),
        (
            {"units": {"db.service": {**GOOD, "ActiveState": "inactive"}}},
            "db.service is inactive, not active",
        ),
    ],
)
async def test_a_store_systemd_would_not_keep_cancels_before_anything_changes(
    host: Host, systemd: Path, change: dict[str, Any], reason: str
) -> None:
    save(systemd, {**load(systemd), **change})
    outcome, handed_off = await _run(host, book(host), Parking())
    assert (outcome.value, handed_off) == ("cancelled", False)
    assert reason in cancel_reason(host)
    assert "kexec" not in load(systemd)
    host.assert_workloads_intact()


async def test_the_reboot_syscall_keeps_no_store(host: Host, systemd: Path) -> None:
    path = book(host, via="syscall")
    engine = Engine(load_playbook(path), host.kernel, host.state)
    outcome = await engine.run()  # cancelled at the quiesce: no kexec
    assert outcome.value == "cancelled"
    assert "set next_kernel.via: systemd" in cancel_reason(host)


def restore_ctx(stores: dict[str, int]) -> Any:
    return SimpleNamespace(
        recorded=lambda key, default=None: stores if key == "stores" else default,
        log=logging.getLogger("test"),
        options={"services": list(stores)},
    )


async def test_the_restore_waits_for_the_service_and_its_fds(systemd: Path) -> None:
    starting = {"ActiveState": "activating", "NFileDescriptorStore": "2"}
    state = load(systemd)
    state["units"]["db.service"] = {**starting, "after_calls": [3, GOOD]}
    save(systemd, state)
    with anyio.fail_after(30):
        await SystemdPlugin().lu_restore(restore_ctx({"db.service": 2}))
    assert load(systemd)["calls"]["db.service"] == 4


async def test_a_service_back_without_its_fds_fails_the_restore(systemd: Path) -> None:
    state = load(systemd)
    state["units"]["db.service"] = {**GOOD, "NFileDescriptorStore": "1"}
    save(systemd, state)
    with pytest.raises(RuntimeError, match="runs with 1 of its 2 stored fd"):
        await SystemdPlugin().lu_restore(restore_ctx({"db.service": 2}))
