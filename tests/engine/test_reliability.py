"""The fault matrix: every way an update can be interrupted, then the recovery
the docs give an operator, ending with every byte and a clear state.

Each cell runs real processes on the simulated kernel: demo workloads with
their data in memfds, ``liveupdate run`` ended by the simulated kexec,
``liveupdate resume`` in the "new kernel". Crashes are placed exactly with
``LIVEUPDATE_TEST_CRASH_AT`` (``orchestrator.restore._crashpoint``): after the N-th
journal record, or before the N-th request to the keeper -- between two
kernel calls of the restore. The assertions are on what an operator cares
about: each workload's SHA-256, whether it runs, and the journal's state.
The matrix and its counts are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from orchestrator.restore._journal import read_journal
from orchestrator.restore._keeper import Keeper
from tests.engine.conftest import ROOT, events

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.engine.conftest import Host

# How many records and keeper requests a resume of the standard playbook makes
# (counted once below, then asserted, so the matrix cannot silently shrink).
RESUME_RECORDS = 15
RESUME_KEEPER_CALLS = 4
RUN_RECORDS = 23


def kexec(host: Host, book: Path) -> None:
    """Run the update up to the (simulated) kexec, which ends the run."""
    boot = host.kernel.boot_id()
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL, run.stdout + run.stderr
    assert host.kernel.boot_id() != boot


def assert_completed(host: Host) -> None:
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "completed"), status
    host.assert_workloads_intact()
    host.assert_running()
    assert not (host.state / "restore-plan").exists()
    assert Keeper.connect(host.state) is None  # it let go and exited


def assert_cancelled(host: Host) -> None:
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled"), status
    host.assert_workloads_intact()
    host.assert_running()


def test_resume_counts_are_what_the_matrix_assumes(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    before = len(read_journal(host.state))
    assert before == RUN_RECORDS
    assert host.resume(book).returncode == 0
    assert len(read_journal(host.state)) - before == RESUME_RECORDS
    assert_completed(host)


@pytest.mark.parametrize(
    "crash_at",
    [
        *(
            pytest.param(f"record:{n}", id=f"resume-record-{n}")
            for n in range(1, RESUME_RECORDS + 1)
        ),
        *(
            pytest.param(f"keeper:{n}", id=f"resume-keeper-{n}")
            for n in range(1, RESUME_KEEPER_CALLS + 1)
        ),
        *(
            pytest.param(f"keeper-sent:{n}", id=f"resume-keeper-sent-{n}")
            for n in range(1, RESUME_KEEPER_CALLS + 1)
        ),
    ],
)
def test_resume_killed_anywhere_is_run_again_to_completion(
    host: Host, crash_at: str
) -> None:
    book = host.playbook()
    kexec(host, book)
    first = host.resume(book, crash_at=crash_at)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    status = host.status()
    # Stopped short: status says so (and names the command) -- or it had ended.
    assert status["interrupted"] or status["outcome"] == "completed", status
    if status["interrupted"]:
        assert status["next_command"].startswith("liveupdate resume ")
    again = host.resume(book)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_completed(host)


@pytest.mark.parametrize("crash_at", [f"record:{n}" for n in (1, 4, 9)])
def test_resume_killed_then_run_again_without_state_dir(
    host: Host, crash_at: str
) -> None:
    """The slow path (no --state-dir: the playbook read first) finds the keeper."""
    book = host.playbook()
    kexec(host, book)
    assert host.resume(book, crash_at=crash_at).returncode == -signal.SIGKILL
    again = host.liveupdate("resume", str(book))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_completed(host)


def test_resume_killed_twice_in_a_row(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    assert host.resume(book, crash_at="keeper:2").returncode == -signal.SIGKILL
    assert host.resume(book, crash_at="record:3").returncode == -signal.SIGKILL
    assert host.resume(book).returncode == 0
    assert_completed(host)


@pytest.mark.parametrize("seed", range(int(os.environ.get("RK_SEEDS", "8"))))
def test_resume_killed_at_a_random_moment(host: Host, seed: int) -> None:
    """SIGKILL from outside at a random moment (seeded), then the documented
    recovery: run resume again. Nothing may be lost, whenever it lands."""
    rng = random.Random(seed)
    book = host.playbook()
    kexec(host, book)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "resume",
            str(book),
            "--state-dir",
            str(host.state),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(rng.uniform(0.0, 0.8))
    proc.kill()
    proc.wait(timeout=60)
    again = host.resume(book)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_completed(host)


@pytest.mark.parametrize("n", range(1, RUN_RECORDS + 1, 3))
def test_run_killed_at_any_record_is_cancelled_by_resume(host: Host, n: int) -> None:
    book = host.playbook()
    run = host.liveupdate("run", str(book), crash_at=f"record:{n}")
    assert run.returncode == -signal.SIGKILL
    boot = host.kernel.boot_id()
    if events(host, "kexec") and boot != events(host, "run_start")[0]["boot_id"]:
        pytest.fail("the crash point came after the kexec")  # matrix miscounted
    resume = host.resume(book)
    assert resume.returncode in (0, 5), resume.stdout + resume.stderr
    if resume.returncode == 0:  # killed before anything happened
        assert "nothing to resume" in resume.stdout or host.status()["outcome"]
    assert_cancelled(host) if host.status()["outcome"] else host.assert_running()
    again = host.liveupdate("run", str(book))
    assert again.returncode == -signal.SIGKILL, again.stderr  # a new update runs


def test_second_run_after_the_kexec_is_refused_and_loses_nothing(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    second = host.liveupdate("run", str(book))
    assert second.returncode == 6, second.stdout + second.stderr
    assert "liveupdate resume" in second.stderr
    assert (host.state / "restore-plan").exists()
    assert host.resume(book).returncode == 0
    assert_completed(host)


def test_second_run_after_a_run_killed_while_frozen(host: Host) -> None:
    book = host.playbook(
        {"freeze": [{"plugin": "faults", "with": {"kill_self": True}}]}
    )
    assert host.liveupdate("run", str(book)).returncode == -signal.SIGKILL
    second = host.liveupdate("run", str(book))
    assert second.returncode == 6
    assert "FROZEN" in second.stderr or "PREPARED" in second.stderr
    status = host.status()
    assert status["interrupted"]
    assert "liveupdate resume" in status["next_command"]
    assert interrupted_metric(host) == 1.0  # so an alert can fire
    assert host.resume(book).returncode == 5
    assert_cancelled(host)
    assert interrupted_metric(host) == 0.0


def interrupted_metric(host: Host) -> float | None:
    from prometheus_client import CollectorRegistry

    from orchestrator.observe._metrics import register_metrics

    registry = CollectorRegistry()
    register_metrics(registry, host.state, history=True)
    return registry.get_sample_value("liveupdate_update_interrupted")


def test_cancel_after_the_kexec_is_refused(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    cancel = host.liveupdate("cancel", "--state-dir", str(host.state), "--no-agent")
    assert cancel.returncode == 1
    assert "past the kexec" in cancel.stderr
    assert host.resume(book).returncode == 0
    assert_completed(host)


def test_second_sigterm_does_not_stop_the_rollback(host: Host, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    book = host.playbook(
        {
            "quiesce": [
                {
                    "plugin": "faults",
                    "with": {"rollback_hang": 1.5, "trace": str(trace)},
                }
            ],
            "prepare": [{"plugin": "faults", "with": {"hang": 60}}],
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(book)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(
            lambda: any(
                r.get("phase") == "prepare" for r in events(host, "phase_start")
            )
        )
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: trace.exists() and "quiesce_rollback" in trace.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.communicate()
    assert proc.returncode == 5, err
    assert "quiesce_rollback_done" in trace.read_text()
    assert_cancelled(host)


def _wait_for(cond: object, timeout: float = 60.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# --- the journal and the disk ---------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b'{"event":"state","wall":1', id="torn"),
        pytest.param(b"\0" * 300, id="nul-padded"),
        pytest.param(b'{"event":"st\0\0\0\0\n\0\0', id="torn-then-nul"),
    ],
)
def test_damaged_tail_after_the_kexec_is_cut_and_resume_completes(
    host: Host, tail: bytes
) -> None:
    book = host.playbook()
    kexec(host, book)
    with open(host.state / "journal.jsonl", "ab") as f:
        f.write(tail)
    assert host.resume(book).returncode == 0
    assert_completed(host)
    raw = (host.state / "journal.jsonl").read_bytes()
    assert b"\0" not in raw
    assert raw.endswith(b"\n")


def test_torn_tail_before_a_run_is_not_glued_to_the_next_record(host: Host) -> None:
    book = host.playbook()
    (host.state / "journal.jsonl").write_bytes(b'{"event":"run_start","wa')
    kexec(host, book)
    assert host.resume(book).returncode == 0
    assert_completed(host)


@pytest.mark.parametrize(
    "garbage", [b"123\n", b"{}\n", b"[1,2]\n", b'{"event":"state"}\n', b"not json\n"]
)
def test_bad_record_is_refused_with_its_line_and_data_is_held(
    host: Host, garbage: bytes
) -> None:
    book = host.playbook()
    kexec(host, book)
    journal = host.state / "journal.jsonl"
    good = journal.read_bytes()
    lines = good.splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:3], garbage, *lines[3:]]))
    refused = host.resume(book)
    assert refused.returncode == 1
    assert "journal.jsonl:4: not a journal record" in refused.stderr
    assert "held by the keeper" in refused.stderr
    journal.write_bytes(good)  # the operator repairs the line
    assert host.resume(book).returncode == 0
    assert_completed(host)


@pytest.mark.parametrize("damage", ["emptied", "removed", "replaced"])
def test_lost_journal_is_refused_and_data_is_held(host: Host, damage: str) -> None:
    book = host.playbook()
    kexec(host, book)
    journal = host.state / "journal.jsonl"
    good = journal.read_bytes()
    if damage == "emptied":
        journal.write_bytes(b"")
    elif damage == "removed":
        journal.unlink()
    else:
        other = good.replace(events(host, "run_start")[0]["run"].encode(), b"0" * 12)
        journal.write_bytes(other)
    refused = host.resume(book)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "restore plan is for run" in refused.stderr
    journal.write_bytes(good)
    assert host.resume(book).returncode == 0
    assert_completed(host)


def test_edited_playbook_resumes_with_the_recorded_copy(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    doc = json.loads(book.read_text())
    # Steps reordered and a new one added: positions no longer match.
    doc["phases"]["restore"]["steps"].insert(
        0, {"plugin": "faults", "with": {"fail": "x"}}
    )
    book.write_text(json.dumps(doc))
    resume = host.resume(book)
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert events(host, "playbook_changed")
    assert_completed(host)


@contextlib.contextmanager
def _mounted(target: Path, *options: str) -> Iterator[None]:
    subprocess.run(["mount", *options, str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@needs_root
def test_read_only_state_dir_after_the_kexec(host: Host) -> None:
    """The journal and the lock on a read-only mount (EROFS): resume refuses
    before touching anything, the keeper holds the data, and once the mount is
    writable again the same command completes. (The simulated kernel keeps
    its own state in the same directory, so only the orchestrator's files are
    made read-only.)"""
    book = host.playbook()
    kexec(host, book)
    files = [host.state / "journal.jsonl", host.state / "lock"]
    try:
        for f in files:
            subprocess.run(["mount", "--bind", str(f), str(f)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(f)], check=True)
        refused = host.resume(book)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "Read-only file system" in refused.stderr
        assert "held by the keeper" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        for f in files:
            subprocess.run(["umount", "-l", str(f)], check=False)
    assert host.resume(book).returncode == 0
    assert_completed(host)


@needs_root
@pytest.mark.parametrize(
    "free_pages",
    [
        pytest.param(1, id="no-room-for-the-playbook-copy"),
        pytest.param(2, id="no-room-for-the-first-record"),
        pytest.param(3, id="full-in-the-middle-of-the-run"),
    ],
)
def test_full_disk_during_a_run_still_rolls_back(
    host: Host, tmp_path: Path, free_pages: int
) -> None:
    """ENOSPC in the middle of a run: the journal write fails, the update is
    undone all the same (workloads running, data intact), and once there is
    room again resume closes the run."""
    state = tmp_path / "small"
    state.mkdir()
    book = host.playbook()
    doc = json.loads(book.read_text())
    doc["state_dir"] = str(state)
    for phase in ("quiesce", "preserve", "freeze", "restore", "finish"):
        doc["phases"][phase]["steps"][0]["with"] = {"registry": str(host.registry)}
    book.write_text(json.dumps(doc))
    with _mounted(state, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        filler = state / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"x" * 512):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        # tmpfs counts pages: one for the lock, one for the copy of the
        # playbook, the rest for the journal (about 16 records a page; a run
        # writes 23 before the kexec).
        os.truncate(filler, (filler.stat().st_size // 4096 - free_pages) * 4096)
        run = host.liveupdate("run", str(book), "--state-dir", str(state))
        assert run.returncode in (1, 5), run.stdout + run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        if free_pages == 3:  # it failed mid-run, and was undone all the same
            assert run.returncode == 5, run.stdout + run.stderr
            # The journal or the restore plan (whichever needed a page first)
            # hit the full disk; the undo ran either way.
            assert "No space left on device" in run.stdout + run.stderr
        host.assert_workloads_intact()
        host.assert_running()
        filler.unlink()
        resume = host.liveupdate("resume", str(book), "--state-dir", str(state))
        assert resume.returncode in (0, 5), resume.stdout + resume.stderr
        status = json.loads(
            host.liveupdate("status", "--state-dir", str(state), "--json").stdout
        )
        assert status["state"] == "NORMAL", status
        assert not status["interrupted"], status
        host.assert_workloads_intact()
        host.assert_running()


# --- reboots that are not the kexec ------------------------------------------------


def test_cold_boot_after_a_crash_in_freeze_is_closed_once(host: Host) -> None:
    book = host.playbook(
        {"freeze": [{"plugin": "faults", "with": {"kill_self": True}}]}
    )
    assert host.liveupdate("run", str(book)).returncode == -signal.SIGKILL
    host.kernel.reboot_cold()  # the workloads die with the boot, as on a real host
    resume = host.resume(book)
    assert resume.returncode == 5, resume.stdout + resume.stderr
    assert "rebooted" in host.status()["error"]
    assert not (host.state / "restore-plan").exists()
    again = host.resume(book)
    assert again.returncode == 0
    assert "nothing to resume" in again.stdout


def test_cold_boot_after_the_kexec_record_reports_the_loss_once(host: Host) -> None:
    book = host.playbook()
    kexec(host, book)
    host.kernel.reboot_cold()  # the new kernel crashed before resume: data gone
    resume = host.resume(book)
    assert resume.returncode == 1, resume.stdout + resume.stderr
    status = host.status()
    assert status["outcome"] == "failed"
    assert "none of the preserved" in status["error"]
    assert host.resume(book).returncode == 0  # closed: the next boot is quiet


def test_the_kexec_syncs_what_was_written_during_the_freeze(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reboot(KEXEC) does not sync (``kexec -e`` does): the engine syncs right
    before it. A fake kernel stands in for the reboot syscall, which cannot
    run on this host; the VM scenarios run the real one."""
    from orchestrator.engine import _engine

    calls: list[str] = []

    class Kernel:
        def reboot_kexec(self) -> None:
            calls.append("kexec")

    monkeypatch.setattr("os.sync", lambda: calls.append("sync"))
    _engine._sync_and_kexec(Kernel())  # type: ignore[arg-type]
    assert calls == ["sync", "kexec"]
