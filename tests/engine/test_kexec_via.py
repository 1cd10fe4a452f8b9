"""``next_kernel.via``: the kexec started by the reboot syscall, or by systemd.

``via: systemd`` hands the kexec to ``systemctl kexec``, whose shutdown stops
the agent before the kernel changes: the update's sessions must be parked
(the agent's fd store) first, and nothing may cancel once systemd has it.
systemd cannot run as PID 1 on this host, so the in-process tests stand a
recording object in for the fd store and a script in for ``systemctl``; the
``systemd`` VM scenario (``python -m tests.vm.e2e --only systemd``) runs the
real ones through a real kexec.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from orchestrator.engine import _engine
from orchestrator.engine._engine import Engine
from orchestrator.engine._playbook import load_playbook
from orchestrator.errors import PlaybookError
from orchestrator.restore._journal import read_journal
from tests.engine.conftest import ROOT, events

if TYPE_CHECKING:
    from pathlib import Path

    from tests.engine.conftest import Host


class Parking:
    """Records what the engine parks; holds a duplicate, as a store would."""

    def __init__(self, refusal: str | None = None, *, refuse_at: int = 1) -> None:
        self.stored: dict[str, int] = {}
        self.asked: list[list[str]] = []  # what was parked at each check
        self.refuse_at = refuse_at  # the check that says *refusal*
        self.parked: dict[str, int] = {}
        self.unparked: list[str] = []
        self.refusal = refusal

    def park(self, name: str, fd: int) -> bool:
        self.parked[name] = os.dup(fd)
        return True

    def unpark(self, name: str) -> None:
        self.unparked.append(name)
        os.close(self.parked.pop(name))

    def kexec_via_systemd_refusal(self) -> str | None:
        self.asked.append(sorted(self.parked))
        return self.refusal if len(self.asked) >= self.refuse_at else None


def via_systemd(host: Host) -> Path:
    book = host.playbook()
    doc = json.loads(book.read_text())
    doc["next_kernel"]["via"] = "systemd"
    book.write_text(json.dumps(doc))
    return book


def systemctl(tmp_path: Path, rc: int, then: str = "") -> tuple[str, ...]:
    """A stand-in for ``systemctl --no-block kexec`` that records its call
    (and runs *then*, a shell command, before it returns)."""
    script = tmp_path / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n{then}\n'
        f"{'echo refused >&2' if rc else ''}\nexit {rc}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return (str(script), "--no-block", "kexec")


def test_via_is_read_and_checked(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"k")
    text = (
        "name: t\nnext_kernel:\n  image: vmlinuz\n  via: {}\n"
        "phases:\n  prepare:\n    steps: [{{plugin: kexec}}]\n"
    )
    book = tmp_path / "p.yaml"
    book.write_text(text.format("systemd"))
    assert load_playbook(book).next_kernel.via == "systemd"  # type: ignore[union-attr]
    book.write_text(text.format("reboot"))
    with pytest.raises(PlaybookError) as err:
        load_playbook(book)
    assert err.value.line == 4
    assert "expected one of syscall, systemd, got 'reboot'" in str(err.value)


def test_only_the_agent_may_kexec_through_systemd(host: Host) -> None:
    """``liveupdate run`` alone would die in the shutdown with its sessions."""
    book = via_systemd(host)
    run = host.liveupdate("run", str(book))
    assert run.returncode != 0
    assert "only the agent can" in run.stdout + run.stderr
    assert (host.status()["state"], host.status()["outcome"]) == ("NORMAL", "cancelled")
    host.assert_workloads_intact()
    assert not [e for e in events(host, "step_start") if e["phase"] == "quiesce"]


async def _run(host: Host, book: Path, parking: Parking) -> tuple[Any, bool]:
    engine = Engine(
        load_playbook(book), host.kernel, host.state, owner="agent", parking=parking
    )
    outcome: Any = None
    with anyio.move_on_after(60) as scope:
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                nonlocal outcome
                outcome = await engine.run()
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            while not engine._handed_off:  # noqa: ASYNC110  (the engine's own flag)
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught, "neither handed off nor ended in 60 s"
    return outcome, engine._handed_off


async def test_a_refusal_cancels_before_anything_is_touched(host: Host) -> None:
    parking = Parking(refusal="liveupdate-agent.service does not set it")
    outcome, handed_off = await _run(host, via_systemd(host), parking)
    assert (outcome.value, handed_off) == ("cancelled", False)
    ends = [r for r in read_journal(host.state) if r["event"] == "run_end"]
    assert "does not set it; use next_kernel.via: syscall" in ends[-1]["error"]
    assert parking.parked == {}
    host.assert_workloads_intact()


async def test_the_sessions_are_parked_then_the_kexec_is_systemds(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "SYSTEMCTL_KEXEC", systemctl(tmp_path, 0))
    parking = Parking()
    outcome, handed_off = await _run(host, via_systemd(host), parking)
    assert (outcome, handed_off) == (None, True)
    assert (tmp_path / "calls").read_text() == "--no-block kexec\n"
    records = read_journal(host.state)
    kexec = [r for r in records if r["event"] == "kexec"]
    assert [k["via"] for k in kexec] == ["systemd"]
    assert not [r for r in records if r["event"] == "run_end"]  # not cancelled
    assert set(parking.parked) == {"lu-workloads"}  # every session, at its creation
    assert parking.unparked == []


async def test_a_store_found_full_once_the_sessions_are_parked_cancels(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd drops what a full store cannot take, saying nothing to the
    sender: the store is checked again with every session parked, before
    the blackout, and a refusal then cancels as any failure would."""
    monkeypatch.setattr(_engine, "SYSTEMCTL_KEXEC", systemctl(tmp_path, 0))
    parking = Parking(
        "the fd store is full (4 of FileDescriptorStoreMax=4)", refuse_at=2
    )
    outcome, handed_off = await _run(host, via_systemd(host), parking)
    assert (outcome.value, handed_off) == ("cancelled", False)
    assert parking.asked == [[], ["lu-workloads"]]
    assert not (tmp_path / "calls").exists()  # systemctl kexec never asked
    records = read_journal(host.state)
    assert "(4 of FileDescriptorStoreMax=4)" in records[-1]["error"]
    assert not [r for r in records if r["event"] in ("blackout_start", "kexec")]
    assert parking.unparked == ["lu-workloads"]
    assert parking.parked == {}
    host.assert_workloads_intact()


async def test_systemctl_refusing_cancels_and_unparks(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_engine, "SYSTEMCTL_KEXEC", systemctl(tmp_path, 1))
    parking = Parking()
    outcome, handed_off = await _run(host, via_systemd(host), parking)
    assert (outcome.value, handed_off) == ("cancelled", False)
    ends = [r for r in read_journal(host.state) if r["event"] == "run_end"]
    assert "refused" in ends[-1]["error"]
    assert parking.unparked == ["lu-workloads"]  # the store would keep it alive
    assert parking.parked == {}
    host.assert_workloads_intact()


ENGINE_PROCESS = """
import sys
from pathlib import Path

import anyio

from orchestrator.engine import _engine
from orchestrator.engine._engine import Engine
from orchestrator.engine._playbook import load_playbook
from orchestrator.luo.sim import SimKernel
from tests.engine.test_kexec_via import Parking

book, kernel, state, systemctl, unparked = sys.argv[1:]
_engine.SYSTEMCTL_KEXEC = (systemctl, "--no-block", "kexec")


class Logged(Parking):
    def unpark(self, name: str) -> None:
        Path(unparked).write_text(name)
        super().unpark(name)


engine = Engine(
    load_playbook(Path(book)), SimKernel(Path(kernel)), Path(state),
    owner="agent", parking=Logged(),
)
anyio.run(engine.run)
"""


def test_the_shutdowns_sigterm_ends_the_engine_without_a_cancel(
    host: Host, tmp_path: Path
) -> None:
    """systemd stops the agent as soon as its shutdown reaches it, which can be
    before ``systemctl`` has returned: that SIGTERM must not cancel (the
    cancel would unpark and close the sessions of a host that is going down)."""
    fake = systemctl(tmp_path, 0, then="kill -TERM $PPID; sleep 0.5")
    unparked = tmp_path / "unparked"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            ENGINE_PROCESS,
            str(via_systemd(host)),
            str(host.kernel.root),
            str(host.state),
            fake[0],
            str(unparked),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    records = read_journal(host.state)
    assert [r["signal"] for r in records if r["event"] == "signal"] == ["SIGTERM"]
    assert [r["via"] for r in records if r["event"] == "kexec"] == ["systemd"]
    assert not [r for r in records if r["event"] in ("cancel_start", "run_end")]
    assert not unparked.exists()
