"""The journal: an append-only, fsync'd record of an update that survives the kexec.

One JSON object a line in ``STATE_DIR/journal.jsonl``. Each record is written
with a single ``write(2)`` on an ``O_APPEND`` fd and fsync'd before the step it
describes goes on, so after a crash or a kexec the journal says exactly how
far the update got; a torn last line (a crash mid-write) is ignored. Every
record carries wall-clock time, monotonic time and the boot id, which is how
the blackout is measured across two kernels (the monotonic clock restarts).

Kept free of heavy imports: ``liveupdate resume`` reads it inside the blackout.
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import json
import os
import time

from orchestrator._compat import TYPE_CHECKING

from ._errors import OrchestratorError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any


_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


class JournalError(OrchestratorError):
    """The journal cannot be read or written, or another orchestrator holds it."""


class LockedError(JournalError):
    """Another orchestrator is running on this host."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"another orchestrator is running on this host ({holder}); "
            f"lock {path}. Use 'liveupdate status' to see it, 'liveupdate cancel' to stop it"
        )


class Journal:
    """Append-only journal in *state_dir*, written by one orchestrator at a time."""

    __slots__ = ("_fd", "_lock_fd", "boot_id", "state_dir")

    def __init__(self, state_dir: Path, boot_id: str) -> None:
        self.state_dir = state_dir
        self.boot_id = boot_id
        self._fd: int | None = None
        self._lock_fd: int | None = None

    @property
    def path(self) -> Path:
        return self.state_dir / "journal.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    @contextlib.contextmanager
    def locked(self, command: str) -> Iterator[Journal]:
        """Hold the host-wide orchestrator lock and the journal open for appending."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (
                os.pread(lock, 256, 0).decode(errors="replace").strip() or "unknown"
            )
            os.close(lock)
            raise LockedError(self.lock_path, holder) from None
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"pid {os.getpid()} ({command})\n".encode(), 0)
        self._lock_fd = lock
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            yield self
        finally:
            os.close(self._fd)
            self._fd = None
            os.ftruncate(lock, 0)
            os.close(lock)
            self._lock_fd = None

    def append(
        self, event: str, *, durable: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """Write one record; with *durable*, fsync it (and all before it) first."""
        if self._fd is None:
            raise JournalError("the journal is not open for writing (no lock held)")
        record = {
            "event": event,
            "wall": time.time(),
            "mono": time.monotonic(),
            "boot_id": self.boot_id,
            **fields,
        }
        line = (_ENCODE(record) + "\n").encode()
        os.write(self._fd, line)
        if durable:
            os.fdatasync(self._fd)
        return record


def read_journal(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of the journal in *state_dir* (oldest first)."""
    try:
        with open(os.path.join(state_dir, "journal.jsonl"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JournalError(f"cannot read the journal in {state_dir}: {exc}") from exc
    records = []
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn write from a crash: the step did not happen
    return records


def last_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the most recent run."""
    for i in range(len(records) - 1, -1, -1):
        if records[i]["event"] == "run_start":
            return records[i:]
    return []


def lock_holder(state_dir: str | os.PathLike[str]) -> str | None:
    """Who holds the orchestrator lock, or None."""
    try:
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
    except OSError as exc:
        if exc.errno == E.EWOULDBLOCK:
            return "unknown"
        raise
    finally:
        os.close(fd)
    return None
