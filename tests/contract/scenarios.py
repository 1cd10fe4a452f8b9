"""Kernel contract across kexecs: scenarios in stages, one stage per boot.

A scenario is a sequence of stage functions. Stage *i* runs in boot *i*; a
kexec separates them. Each stage gets the kernel, a JSON-able ``carry`` dict
that travels to the next boot, and a ``keep`` list: whatever a stage puts
there (session handles, fds) stays open until the kexec, as a real agent
keeps its sessions open until the reboot syscall.

The same functions run on the simulated kernel (earlier stages in a child
process that the simulated kexec ends, see test_kexec.py) and on a real LUO
kernel in the VM harness (``python -m tests.contract.stage``, then pytest with
``--luo-carry``). Stage functions use plain ``assert``: no pytest here.
"""

from __future__ import annotations

import errno as E
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.luo import (
    LiveUpdateDevice,
    SessionAlreadyRetrievedError,
    SessionNotFoundError,
    SessionStateError,
    TokenNotFoundError,
)

from ._util import pattern, read_all

if TYPE_CHECKING:
    from orchestrator.luo import Kernel

Carry = dict[str, Any]
Stage = Callable[["Kernel", Carry, list[object]], None]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    stages: tuple[Stage, ...]
    doc: str


def _create(kernel: Kernel, name: str, keep: list[object]) -> Any:
    with LiveUpdateDevice.open(kernel) as dev:
        session = dev.create_session(name)
    keep.append(session)
    return session


def _memfd(keep: list[object], seed: int, size: int | None = None) -> int:
    fd = os.memfd_create(f"contract-{seed}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = pattern(seed) if size is None else pattern(seed, size)
    os.write(fd, data)
    keep.append(fd)
    return fd


def _retrieve(kernel: Kernel, name: str) -> Any:
    with LiveUpdateDevice.open(kernel) as dev:
        return dev.retrieve_session(name)


# --- memfd contents and attributes ------------------------------------------------


def roundtrip_before(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    s = _create(kernel, "c-roundtrip", keep)
    fd = _memfd(keep, 1)
    os.lseek(fd, 12345, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    s.preserve_fd(fd, 1)
    small = _memfd(keep, 2, size=0)
    s.preserve_fd(small, 2)
    carry["boot_id"] = kernel.boot_id()


def roundtrip_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    assert kernel.boot_id() != carry["boot_id"], "no kexec happened"
    with _retrieve(kernel, "c-roundtrip") as s:
        with s.retrieve_fd(1) as fd:
            raw = fd.fileno()
            assert read_all(raw) == pattern(1), "contents differ"
            assert os.lseek(raw, 0, os.SEEK_CUR) == 12345, "file position lost"
            seals = fcntl.fcntl(raw, fcntl.F_GET_SEALS)
            assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) == (
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            ), f"seals lost: {seals:#x}"
            assert fcntl.fcntl(raw, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "not O_CLOEXEC"
            assert fcntl.fcntl(raw, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        with s.retrieve_fd(2) as fd:
            assert os.fstat(fd.fileno()).st_size == 0
        s.finish()


def write_after_preserve_before(
    kernel: Kernel, carry: Carry, keep: list[object]
) -> None:
    s = _create(kernel, "c-late-write", keep)
    fd = _memfd(keep, 3)
    s.preserve_fd(fd, 1)
    os.pwrite(fd, b"written after PRESERVE", 100)


def write_after_preserve_after(
    kernel: Kernel, carry: Carry, keep: list[object]
) -> None:
    with _retrieve(kernel, "c-late-write") as s, s.retrieve_fd(1) as fd:
        assert os.pread(fd.fileno(), 22, 100) == b"written after PRESERVE"
        s.finish()


# --- session lifecycle --------------------------------------------------------------


def closed_session_before(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    s = _create(kernel, "c-closed", keep)
    s.preserve_fd(_memfd(keep, 4), 1)
    s.close()


def closed_session_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    try:
        _retrieve(kernel, "c-closed")
    except SessionNotFoundError as exc:
        assert exc.errno == E.ENOENT
    else:
        raise AssertionError("a session closed before the kexec came back")


def one_file_before(name: str, seed: int, tokens: tuple[int, ...] = (1,)) -> Stage:
    def stage(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
        s = _create(kernel, name, keep)
        for token in tokens:
            s.preserve_fd(_memfd(keep, seed + token), token)

    return stage


def retrieve_twice_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    with LiveUpdateDevice.open(kernel) as dev, dev.retrieve_session("c-twice") as s:
        try:
            dev.retrieve_session("c-twice")
        except SessionAlreadyRetrievedError as exc:
            assert exc.errno == E.EINVAL
        else:
            raise AssertionError("RETRIEVE_SESSION twice succeeded")
        s.finish()


def retrieve_fd_twice_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    with _retrieve(kernel, "c-fd-twice") as s:
        with s.retrieve_fd(1) as a, s.retrieve_fd(1) as b:
            assert a.fileno() != b.fileno()
            sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
            assert (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino), "not the same file"
            os.pwrite(a.fileno(), b"shared", 0)
            assert os.pread(b.fileno(), 6, 0) == b"shared"
        try:
            s.retrieve_fd(99)
        except TokenNotFoundError as exc:
            assert exc.errno == E.ENOENT
        else:
            raise AssertionError("unknown token retrieved")
        s.finish()


def preserve_into_incoming_after(
    kernel: Kernel, carry: Carry, keep: list[object]
) -> None:
    with _retrieve(kernel, "c-incoming") as s:
        fd = os.memfd_create("late")
        try:
            s.preserve_fd(fd, 2)
        except SessionStateError as exc:
            assert exc.errno == E.EINVAL
        else:
            raise AssertionError("PRESERVE_FD into an incoming session succeeded")
        finally:
            os.close(fd)
        s.finish()


def finish_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """FINISH twice is fine; after it, RETRIEVE_FD is ENOENT; earlier fds stay usable."""
    with _retrieve(kernel, "c-finish") as s:
        early = s.retrieve_fd(1)
        s.finish()
        s.finish()
        for token in (1, 2):  # 2 was never retrieved: dropped by FINISH
            try:
                s.retrieve_fd(token)
            except TokenNotFoundError:
                pass
            else:
                raise AssertionError(f"token {token} retrieved after FINISH")
        with early:
            assert read_all(early.fileno()) == pattern(11)


def incoming_name_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """A new session may take the name of an incoming one."""
    with LiveUpdateDevice.open(kernel) as dev:
        with dev.create_session("c-name"):
            pass
        with dev.retrieve_session("c-name") as s, s.retrieve_fd(1) as fd:
            assert read_all(fd.fileno()) == pattern(21)
            s.finish()


def close_finishes_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """Closing a retrieved session finishes it: it cannot be retrieved again."""
    with _retrieve(kernel, "c-close-in") as s, s.retrieve_fd(1) as fd:
        assert read_all(fd.fileno()) == pattern(31)
    try:
        _retrieve(kernel, "c-close-in")
    except SessionNotFoundError:
        pass
    else:
        raise AssertionError("a closed incoming session came back")


def holder_exits_after(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """A process that retrieves a session and exits without FINISH releases it:
    the kernel finishes it (luo_session_release), so it is gone afterwards."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from orchestrator.luo import LiveUpdateDevice, kernel_from_spec\n"
        "dev = LiveUpdateDevice.open(kernel_from_spec(sys.argv[1]))\n"
        "s = dev.retrieve_session('c-holder-exits')\n"
        "s.retrieve_fd(1)\n"
        "import os; os._exit(0)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code, kernel.spec], check=True, cwd=root)
    try:
        _retrieve(kernel, "c-holder-exits")
    except SessionNotFoundError:
        pass
    else:
        raise AssertionError("a session released by its holder's exit came back")


# --- across two kexecs --------------------------------------------------------------


def left_open_middle(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """In boot 1: an incoming session left unretrieved, a new one left open."""
    s = _create(kernel, "c-carried-on", keep)
    s.preserve_fd(_memfd(keep, 41), 1)


def left_open_last(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    with _retrieve(kernel, "c-carried-on") as s, s.retrieve_fd(1) as fd:
        assert read_all(fd.fileno()) == pattern(41)
        s.finish()
    try:
        _retrieve(kernel, "c-never-retrieved")
    except SessionNotFoundError:
        pass
    else:
        raise AssertionError(
            "an incoming session never retrieved survived a second kexec"
        )


def nothing(kernel: Kernel, carry: Carry, keep: list[object]) -> None:
    """A boot in which the scenario does nothing."""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "memfd-roundtrip",
        (roundtrip_before, roundtrip_after),
        "contents, size, position, seals, O_RDWR survive; fd is O_CLOEXEC",
    ),
    Scenario(
        "write-after-preserve",
        (write_after_preserve_before, write_after_preserve_after),
        "contents are taken at the kexec, not at PRESERVE",
    ),
    Scenario(
        "closed-session-gone",
        (closed_session_before, closed_session_after),
        "a session closed before the kexec is gone after it (ENOENT)",
    ),
    Scenario(
        "retrieve-session-twice",
        (one_file_before("c-twice", 0), retrieve_twice_after),
        "RETRIEVE_SESSION of the same name twice is EINVAL",
    ),
    Scenario(
        "retrieve-fd-twice",
        (one_file_before("c-fd-twice", 5), retrieve_fd_twice_after),
        "RETRIEVE_FD twice gives a new fd for the same file; unknown token ENOENT",
    ),
    Scenario(
        "preserve-into-incoming",
        (one_file_before("c-incoming", 6), preserve_into_incoming_after),
        "PRESERVE_FD into an incoming session is EINVAL",
    ),
    Scenario(
        "finish",
        (one_file_before("c-finish", 10, (1, 2)), finish_after),
        "FINISH twice OK; drops unretrieved files; retrieved fds stay usable",
    ),
    Scenario(
        "incoming-name-reused",
        (one_file_before("c-name", 20), incoming_name_after),
        "CREATE_SESSION may reuse the name of an incoming session",
    ),
    Scenario(
        "close-finishes",
        (one_file_before("c-close-in", 30), close_finishes_after),
        "closing a retrieved session finishes and removes it",
    ),
    Scenario(
        "holder-exits",
        (one_file_before("c-holder-exits", 60), holder_exits_after),
        "a retrieved session whose holder exits is finished and removed",
    ),
    Scenario(
        "two-kexecs",
        (one_file_before("c-never-retrieved", 50), left_open_middle, left_open_last),
        "a session left open in the new kernel is carried into the next kexec; "
        "an incoming session never retrieved is dropped at it",
    ),
)

BY_NAME = {s.name: s for s in SCENARIOS}
