"""Kernel contract, one boot: what /dev/liveupdate (merged ABI) answers.

Every test runs on the simulated kernel and, in the VM harness, on a real 7.2
LUO kernel (``--luo-kernel=real``). The expectations are the ones observed on
the real kernel (shared/reference/luo-uapi.md, "Observed on a real 7.2.13").
"""

from __future__ import annotations

import errno as E
import fcntl
import os
from typing import TYPE_CHECKING

import pytest

from orchestrator.luo import (
    DeviceBusyError,
    FileAlreadyPreservedError,
    LiveUpdateDevice,
    SessionExistsError,
    SessionStateError,
    TokenExistsError,
    UnsupportedFileError,
    _abi,
)
from orchestrator.luo._ioc import io

from ._util import create_buf, raw_errno, tmpfs_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

    from orchestrator.luo import Kernel, Session


@pytest.fixture
def dev(kernel: Kernel) -> Iterator[LiveUpdateDevice]:
    with LiveUpdateDevice.open(kernel) as d:
        yield d


@pytest.fixture
def session(dev: LiveUpdateDevice) -> Iterator[Session]:
    with dev.create_session(f"contract-{os.getpid()}") as s:
        yield s


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("contract", os.MFD_CLOEXEC)
    os.write(fd, b"x" * 4096)
    yield fd
    os.close(fd)


def test_second_open_is_ebusy(kernel: Kernel, dev: LiveUpdateDevice) -> None:
    with pytest.raises(DeviceBusyError) as info:
        LiveUpdateDevice.open(kernel)
    assert info.value.errno == E.EBUSY


def test_device_can_be_reopened_after_close(kernel: Kernel) -> None:
    LiveUpdateDevice.open(kernel).close()
    LiveUpdateDevice.open(kernel).close()


def test_session_outlives_the_device_fd(kernel: Kernel, memfd: int) -> None:
    dev = LiveUpdateDevice.open(kernel)
    session = dev.create_session("outlives")
    dev.close()
    with session:
        session.preserve_fd(memfd, 1)
        assert session.get_name() == "outlives"


def test_create_duplicate_name_is_eexist(dev: LiveUpdateDevice) -> None:
    with dev.create_session("dup"), pytest.raises(SessionExistsError) as info:
        dev.create_session("dup")
    assert info.value.errno == E.EEXIST


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        pytest.param(create_buf(b""), E.EINVAL, id="empty-name"),
        pytest.param(create_buf(b"n" * 64), E.EINVAL, id="64-bytes-no-nul"),
        pytest.param(create_buf(b"short", size=8), E.EINVAL, id="size-8"),
        pytest.param(create_buf(b"big-zero", size=80), 0, id="size-80-zero-tail"),
        pytest.param(
            create_buf(b"big-set", size=80, tail=b"\1"), E.E2BIG, id="size-80-tail-set"
        ),
    ],
)
def test_create_session_raw(
    kernel: Kernel, dev: LiveUpdateDevice, buf: bytearray, expected: int
) -> None:
    assert raw_errno(kernel, dev.fileno(), _abi.CREATE_SESSION.number, buf) == expected
    if expected == 0:
        fd = int(_abi.SESSION_CREATE.unpack(buf)["fd"])
        assert fd >= 0
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        kernel.close(fd)


def test_create_session_without_argument_is_efault(
    kernel: Kernel, dev: LiveUpdateDevice
) -> None:
    assert raw_errno(kernel, dev.fileno(), _abi.CREATE_SESSION.number, None) == E.EFAULT


def test_unknown_device_request_is_einval(
    kernel: Kernel, dev: LiveUpdateDevice
) -> None:
    buf = create_buf(b"x")
    assert raw_errno(kernel, dev.fileno(), io(0xBA, 0x05), buf) == E.EINVAL


def test_session_request_on_device_is_einval(
    kernel: Kernel, dev: LiveUpdateDevice
) -> None:
    buf = _abi.SESSION_GET_NAME.pack()
    assert raw_errno(kernel, dev.fileno(), _abi.GET_NAME.number, buf) == E.EINVAL


def test_rfc_get_state_on_merged_kernel_is_einval(
    kernel: Kernel, dev: LiveUpdateDevice
) -> None:
    """How the probe tells the ABIs apart."""
    buf = _abi.RFC_STATE.pack()
    assert raw_errno(kernel, dev.fileno(), _abi.RFC_GET_STATE.number, buf) == E.EINVAL


def test_other_ioctl_type_is_enotty(kernel: Kernel, dev: LiveUpdateDevice) -> None:
    buf = create_buf(b"x")
    assert raw_errno(kernel, dev.fileno(), io(0xAB, 0x00), buf) == E.ENOTTY


def test_get_name(session: Session) -> None:
    assert session.get_name() == f"contract-{os.getpid()}"


def test_preserve_memfd(session: Session, memfd: int) -> None:
    session.preserve_fd(memfd, 1)
    assert session.tokens == {1}


def test_preserve_unlinked_tmpfile_on_tmpfs(session: Session) -> None:
    where = tmpfs_dir()
    if where is None:
        pytest.skip("no tmpfs here")
    fd = os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        session.preserve_fd(fd, 1)
    finally:
        os.close(fd)


def test_preserve_pipe_is_enoent(session: Session) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(
            UnsupportedFileError, match="cannot preserve a pipe"
        ) as info:
            session.preserve_fd(r, 1)
        assert info.value.errno == E.ENOENT
    finally:
        os.close(r)
        os.close(w)


def test_preserve_linked_tmpfs_file_is_enoent(session: Session) -> None:
    where = tmpfs_dir()
    if where is None:
        pytest.skip("no tmpfs here")
    path = os.path.join(where, f"luo-linked-{os.getpid()}")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        with pytest.raises(
            UnsupportedFileError, match="cannot preserve a regular file"
        ) as info:
            session.preserve_fd(fd, 1)
        assert info.value.errno == E.ENOENT
    finally:
        os.close(fd)
        os.unlink(path)


def test_preserve_bad_fd_is_ebadf(kernel: Kernel, session: Session) -> None:
    buf = _abi.SESSION_PRESERVE_FD.pack(fd=1_000_000, token=1)
    assert raw_errno(kernel, session.fileno(), _abi.PRESERVE_FD.number, buf) == E.EBADF


def test_preserve_duplicate_token_is_eexist(
    kernel: Kernel, session: Session, memfd: int
) -> None:
    session.preserve_fd(memfd, 5)
    other = os.memfd_create("other")
    try:
        buf = _abi.SESSION_PRESERVE_FD.pack(fd=other, token=5)
        assert (
            raw_errno(kernel, session.fileno(), _abi.PRESERVE_FD.number, buf)
            == E.EEXIST
        )
    finally:
        os.close(other)


def test_duplicate_token_error_type(dev: LiveUpdateDevice, memfd: int) -> None:
    """Through a second handle the client cannot see the reuse: the kernel says so."""
    with dev.create_session("tok-a") as s:
        s.preserve_fd(memfd, 5)
        again = type(s)(s.kernel, os.dup(s.fileno()), s.name, incoming=False)
        other = os.memfd_create("other")
        try:
            with pytest.raises(TokenExistsError):
                again.preserve_fd(other, 5)
        finally:
            os.close(other)
            os.close(again.fileno())


def test_same_memfd_twice_is_ebusy(
    dev: LiveUpdateDevice, session: Session, memfd: int
) -> None:
    session.preserve_fd(memfd, 1)
    with pytest.raises(FileAlreadyPreservedError) as info:
        session.preserve_fd(memfd, 2)
    assert info.value.errno == E.EBUSY
    with (
        dev.create_session("another") as other,
        pytest.raises(FileAlreadyPreservedError),
    ):
        other.preserve_fd(memfd, 1)


@pytest.mark.parametrize(
    ("size", "tail", "expected"),
    [
        pytest.param(8, b"", E.EINVAL, id="size-8"),
        pytest.param(24, b"\1", E.E2BIG, id="size-24-tail-set"),
        pytest.param(24, b"", 0, id="size-24-zero-tail"),
    ],
)
def test_preserve_fd_struct_sizes(
    kernel: Kernel, session: Session, memfd: int, size: int, tail: bytes, expected: int
) -> None:
    buf = _abi.SESSION_PRESERVE_FD.pack(size=size, fd=memfd, token=9) + bytearray(tail)
    buf = buf.ljust(max(size, len(buf)), b"\0")
    assert raw_errno(kernel, session.fileno(), _abi.PRESERVE_FD.number, buf) == expected


def test_retrieve_or_finish_on_outgoing_session_is_einval(session: Session) -> None:
    with pytest.raises(SessionStateError) as info:
        session.retrieve_fd(1)
    assert info.value.errno == E.EINVAL
    with pytest.raises(SessionStateError):
        session.finish()


def test_closed_session_name_can_be_reused(dev: LiveUpdateDevice, memfd: int) -> None:
    with dev.create_session("reuse") as s:
        s.preserve_fd(memfd, 1)
    with dev.create_session("reuse") as s:
        s.preserve_fd(memfd, 1)  # the first session's hold on the memfd is gone


def test_device_request_on_session_is_einval(kernel: Kernel, session: Session) -> None:
    buf = create_buf(b"nested")
    assert (
        raw_errno(kernel, session.fileno(), _abi.CREATE_SESSION.number, buf) == E.EINVAL
    )


def test_unknown_session_request_is_enotty(kernel: Kernel, session: Session) -> None:
    """Number in range but not the exact request (here: with a size encoded)."""
    from orchestrator.luo._ioc import iow

    buf = _abi.SESSION_GET_NAME.pack()
    request = iow(0xBA, _abi.MergedNr.SESSION_GET_NAME, 72)
    assert raw_errno(kernel, session.fileno(), request, buf) == E.ENOTTY


def test_get_name_reserved_must_be_zero(kernel: Kernel, session: Session) -> None:
    buf = _abi.SESSION_GET_NAME.pack(reserved=1)
    assert raw_errno(kernel, session.fileno(), _abi.GET_NAME.number, buf) == E.EINVAL
