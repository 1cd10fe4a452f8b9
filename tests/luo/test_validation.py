"""Bad input is rejected before any ioctl, with a message that says what is wrong."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from orchestrator import InvalidArgumentError
from orchestrator.luo import LiveUpdateDevice, Session, UnsupportedFileError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path
    from typing import NoReturn

    from orchestrator.luo import Kernel


class CountingKernel:
    """A kernel that forwards to another and counts the ioctls it sees."""

    def __init__(self, inner: Kernel) -> None:
        self.inner = inner
        self.ioctls = 0

    @property
    def spec(self) -> str:
        return self.inner.spec

    def open_device(self) -> int:
        return self.inner.open_device()

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        self.ioctls += 1
        self.inner.ioctl(fd, request, arg)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def boot_id(self) -> str:
        return self.inner.boot_id()

    def since_boot(self) -> float:
        return self.inner.since_boot()

    def cmdline(self) -> str:
        return self.inner.cmdline()

    def kexec_load(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        self.inner.kexec_load(kernel, initrd, cmdline)

    def kexec_unload(self) -> None:
        self.inner.kexec_unload()

    def kexec_loaded(self) -> bool:
        return self.inner.kexec_loaded()

    def reboot_kexec(self) -> NoReturn:
        self.inner.reboot_kexec()

    def log_lines(self) -> Sequence[str]:
        return self.inner.log_lines()


@pytest.fixture
def counting(kernel: Kernel) -> CountingKernel:
    return CountingKernel(kernel)


@pytest.fixture
def session(counting: CountingKernel) -> Iterator[Session]:
    with LiveUpdateDevice.open(counting) as dev, dev.create_session("validation") as s:
        counting.ioctls = 0
        yield s


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param(
            "x" * 64, "64 bytes long; the kernel takes at most 63", id="64-bytes"
        ),
        pytest.param("é" * 32, "64 bytes long", id="64-bytes-utf8"),
        pytest.param("a\0b", "NUL", id="nul"),
    ],
)
def test_bad_session_names(counting: CountingKernel, name: str, message: str) -> None:
    with LiveUpdateDevice.open(counting) as dev:
        with pytest.raises(InvalidArgumentError, match=message):
            dev.create_session(name)
        with pytest.raises(InvalidArgumentError, match=message):
            dev.retrieve_session(name)
    assert counting.ioctls == 0


def test_longest_name_is_accepted(counting: CountingKernel) -> None:
    with LiveUpdateDevice.open(counting) as dev, dev.create_session("n" * 63) as s:
        assert s.get_name() == "n" * 63


def test_negative_fd(session: Session, counting: CountingKernel) -> None:
    with pytest.raises(InvalidArgumentError, match="fd -1: is negative"):
        session.preserve_fd(-1, 1)
    assert counting.ioctls == 0


def test_closed_fd(session: Session, counting: CountingKernel) -> None:
    fd = os.memfd_create("closed")
    os.close(fd)
    with pytest.raises(InvalidArgumentError, match=f"fd {fd}: is not an open file"):
        session.preserve_fd(fd, 1)
    assert counting.ioctls == 0


@pytest.mark.parametrize("token", [-1, 1 << 64, True, "1"])
def test_bad_tokens(session: Session, counting: CountingKernel, token: object) -> None:
    fd = os.memfd_create("tok")
    try:
        with pytest.raises(InvalidArgumentError, match="token"):
            session.preserve_fd(fd, token)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert counting.ioctls == 0


def test_token_reuse_in_one_session(session: Session, counting: CountingKernel) -> None:
    a, b = os.memfd_create("a"), os.memfd_create("b")
    try:
        session.preserve_fd(a, 7)
        assert counting.ioctls == 1
        with pytest.raises(InvalidArgumentError, match="token 7: is already used"):
            session.preserve_fd(b, 7)
        assert counting.ioctls == 1
    finally:
        os.close(a)
        os.close(b)


def test_refused_kind_names_the_kind_and_loses_nothing(session: Session) -> None:
    good = os.memfd_create("kept")
    r, w = os.pipe()
    try:
        session.preserve_fd(good, 1)
        with pytest.raises(
            UnsupportedFileError, match="cannot preserve a pipe"
        ) as info:
            session.preserve_fd(r, 2)
        assert info.value.errno == 2  # ENOENT, kept from the kernel
        assert session.tokens == {1}
        # The session still works and still holds token 1: 1 is taken, 3 is free.
        third = os.memfd_create("third")
        session.preserve_fd(third, 3)
        os.close(third)
        assert session.tokens == {1, 3}
    finally:
        for fd in (good, r, w):
            os.close(fd)
