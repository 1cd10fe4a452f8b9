"""The journal: an append-only, fsync'd record of an update that survives the kexec.

One JSON object a line in ``STATE_DIR/journal.jsonl``. Each record is written
with whole ``write(2)`` calls on an ``O_APPEND`` fd and fsync'd before the
step it describes goes on, so after a crash or a kexec the journal says
exactly how far the update got. Every record carries wall-clock time,
monotonic time and the boot id, which is how the blackout is measured across
two kernels (the monotonic clock restarts).

Damage is never glossed over. A torn or NUL-padded tail -- a crash in the
middle of a write -- is cut back, durably, to the last whole record before
anything is appended (so the next record is never glued to a fragment). A
bad line anywhere else -- not JSON, not an object, a record without its
fields -- is a :class:`JournalCorruptError` naming the file and line: the
orchestrator refuses to act on a history it cannot read. Readers that only
report (``status``, metrics) may skip such lines; :func:`read_journal`
tells them where they were.

When a new run starts and the journal has grown past :data:`ROTATE_BYTES`,
it is renamed ``journal.1.jsonl`` (one generation kept), so that reading the
current run never means reading all of history.

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
from orchestrator.errors import JournalCorruptError, JournalError, LockedError

from ._crashpoint import crash_point

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

JOURNAL_FILE = "journal.jsonl"
ROTATED_FILE = "journal.1.jsonl"
ROTATE_BYTES = 4 << 20
"""A journal past this size is rotated when the next run starts."""

_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


# What every record carries, and what some events must carry besides: a
# record without them is damage, not history.
_COMMON: tuple[tuple[str, type[Any] | tuple[type[Any], ...]], ...] = (
    ("event", str),
    ("wall", (int, float)),
    ("mono", (int, float)),
)
_REQUIRED: dict[str, tuple[tuple[str, type[Any] | tuple[type[Any], ...]], ...]] = {
    "run_start": (("run", str),),
    "state": (("state", str),),
    "step_start": (("phase", str), ("step", str)),
    "step_end": (("phase", str), ("step", str), ("ok", bool)),
    "phase_start": (("phase", str),),
    "phase_end": (("phase", str), ("ok", bool)),
    "run_end": (("outcome", str),),
    "rollback_end": (("phase", str), ("step", str), ("ok", bool)),
}


def check_record(record: object) -> str | None:
    """What is wrong with *record*, or None when it is a journal record."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key, kind in (*_COMMON, *_REQUIRED.get(str(record.get("event")), ())):
        value = record.get(key)
        if value is None:
            return f"no {key!r}"
        if not isinstance(value, kind) or (
            kind is not bool and isinstance(value, bool)
        ):
            return f"{key!r} is {type(value).__name__}"
    if not isinstance(record.get("boot_id", ""), str):
        return "'boot_id' is not a string"
    return None


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail_start(raw: bytes) -> int:
    """Where the torn or NUL-padded tail of *raw* begins (``len(raw)``: none).

    The tail is what follows the last newline, and before it any last lines
    that hold NUL bytes or nothing but blanks: what a crash in mid-write
    leaves, never what a whole write does.
    """
    end = raw.rfind(b"\n") + 1
    while end > 0:
        start = raw.rfind(b"\n", 0, end - 1) + 1
        line = raw[start : end - 1]
        if line.strip(b"\0 \t\r") and b"\0" not in line:
            break
        end = start
    return end


def parse_records(
    raw: bytes, path: str, *, strict: bool = True
) -> tuple[list[dict[str, Any]], list[JournalCorruptError]]:
    """The records in *raw* (a journal's bytes, tail cut), and the bad lines.

    :param strict: raise the first bad line instead of collecting it.
    """
    records: list[dict[str, Any]] = []
    bad: list[JournalCorruptError] = []
    for number, line in enumerate(raw[: _tail_start(raw)].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = check_record(record)
        except ValueError as exc:
            problem = f"not JSON: {exc}"
        except RecursionError:
            problem = "nested too deep"
        if problem is None:
            records.append(record)
            continue
        error = JournalCorruptError(path, number, problem)
        if strict:
            raise error
        bad.append(error)
    return records, bad


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
        return self.state_dir / JOURNAL_FILE

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "lock"

    @contextlib.contextmanager
    def locked(self, command: str) -> Iterator[Journal]:
        """Hold the host-wide orchestrator lock and the journal open for appending.

        A torn tail is cut back first, durably.

        :raises LockedError: another orchestrator holds the lock.
        :raises JournalError: the state dir cannot be written.
        """
        try:
            lock = self._lock(command)
        except LockedError:
            raise
        except OSError as exc:
            raise JournalError(
                f"cannot use the state dir {self.state_dir}: "
                f"{exc.strerror or exc} [{E.errorcode.get(exc.errno or 0, '?')}]"
            ) from exc
        try:
            self._fd = self._open_for_append()
        except OSError as exc:
            _unlock(lock)
            raise JournalError(
                f"cannot write the journal {self.path}: {exc.strerror or exc}"
            ) from exc
        self._lock_fd = lock
        try:
            yield self
        finally:
            os.close(self._fd)
            self._fd = None
            _unlock(lock)
            self._lock_fd = None

    def _lock(self, command: str) -> int:
        created = not self.state_dir.exists()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if created:
            _fsync_dir(self.state_dir.parent)
        lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (
                os.pread(lock, 256, 0).decode(errors="replace").strip() or "unknown"
            )
            os.close(lock)
            raise LockedError(self.lock_path, holder) from None
        try:
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"pid {os.getpid()} ({command})\n".encode(), 0)
        except OSError:
            os.close(lock)
            raise
        return lock

    def _open_for_append(self) -> int:
        """The journal's fd for appending, its torn tail cut back first."""
        path = str(self.path)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _regular(fd, path)
            size = os.fstat(fd).st_size
            if size == 0:
                _fsync_dir(self.state_dir)  # the new file's name is durable too
                return fd
            raw = os.pread(fd, size, 0)
            keep = _tail_start(raw)
            if keep < size:
                os.ftruncate(fd, keep)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def rotate_if_large(self) -> bool:
        """Start a new journal file when this one is past :data:`ROTATE_BYTES`
        (only between runs: the caller checked the last run ended)."""
        if self._fd is None or os.fstat(self._fd).st_size < ROTATE_BYTES:
            return False
        os.replace(self.path, self.state_dir / ROTATED_FILE)
        os.close(self._fd)
        self._fd = self._open_for_append()
        _fsync_dir(self.state_dir)
        return True

    def records(self) -> list[dict[str, Any]]:
        """Every record of the journal, strictly: a bad line raises."""
        return read_journal(self.state_dir, strict=True)

    def append(
        self, event: str, *, durable: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """Write one record; with *durable*, fsync it (and all before it) first.

        :raises JournalError: the record could not be written whole (a full
            or read-only disk): nothing after it should be taken as done.
        """
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
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                # A short append is a torn record: cut it, or the next is glued on.
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(E.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            if durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise JournalError(
                f"cannot write the journal {self.path}: {exc.strerror or exc}"
            ) from exc
        crash_point("record")
        return record


def _unlock(lock: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(lock, 0)
    os.close(lock)


def read_journal(
    state_dir: str | os.PathLike[str], *, strict: bool = False
) -> list[dict[str, Any]]:
    """Every whole record of the journal in *state_dir* (oldest first).

    :param strict: raise :class:`JournalCorruptError` at a bad line; otherwise
        bad lines are skipped (readers that only report).
    """
    path = os.path.join(state_dir, JOURNAL_FILE)
    try:
        raw = _read(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JournalError(
            f"cannot read the journal {path}: {exc.strerror or exc}"
        ) from exc
    return parse_records(raw, path, strict=strict)[0]


def _regular(fd: int, path: str) -> int:
    """The size of the regular file open as *fd* (a device or a FIFO is refused)."""
    import stat

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(E.EINVAL, "not a regular file")
    return st.st_size


def _read(path: str) -> bytes:
    """A journal's bytes: a regular file, read to the size it has now."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        size = _regular(fd, path)
        chunks, got = [], 0
        while got < size:
            chunk = os.pread(fd, size - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def journal_damage(state_dir: str | os.PathLike[str]) -> list[JournalCorruptError]:
    """The bad lines of the journal in *state_dir* (for reports)."""
    path = os.path.join(state_dir, JOURNAL_FILE)
    try:
        raw = _read(path)
    except OSError:
        return []
    return parse_records(raw, path, strict=False)[1]


def last_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the most recent run."""
    for i in range(len(records) - 1, -1, -1):
        if records[i]["event"] == "run_start":
            return records[i:]
    return []


def unfinished(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last run if it never ended, else ``[]``."""
    run = last_run(records)
    if run and not any(r["event"] == "run_end" for r in run):
        return run
    return []


def resume_command(start: dict[str, Any], state_dir: str | os.PathLike[str]) -> str:
    """The command that finishes or cancels the run that began with *start*."""
    import shlex

    words = ["liveupdate", "resume", str(start.get("playbook", "PLAYBOOK"))]
    words += ["--state-dir", str(state_dir)]
    if str(start.get("kernel", "real")) != "real":
        words += ["--kernel", str(start["kernel"])]
    if start.get("owner") == "agent":
        return "systemctl restart liveupdate-agent (the agent resumes it), or " + (
            shlex.join(words)
        )
    return shlex.join(words)


def lock_holder(state_dir: str | os.PathLike[str]) -> str | None:
    """Who holds the orchestrator lock, or None."""
    try:
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        fd = os.open(os.path.join(state_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
    except OSError as exc:
        if exc.errno == E.EWOULDBLOCK:
            return "unknown"
        raise
    finally:
        os.close(fd)
    return None
