"""The merged (session) ABI: ``/dev/liveupdate`` and its session fds.

::

    with LiveUpdateDevice.open() as dev:          # one opener at a time
        session = dev.create_session("vm-17")     # outgoing session
        session.preserve_fd(memfd, token=1)
    # the device fd may close now; the session must stay open until the kexec

    # in the new kernel
    with LiveUpdateDevice.open() as dev, dev.retrieve_session("vm-17") as s:
        with s.retrieve_fd(1) as fd:
            ...
        s.finish()

No method blocks on anything but the ioctl itself; async callers run them in a
worker thread.
"""

from __future__ import annotations

import errno as E
import os

from orchestrator._compat import Protocol, final
from orchestrator.errors import InvalidArgumentError

from . import _abi
from ._errors import kernel_error
from ._fds import Closing, OwnedFd, describe_fd
from ._kernel import Kernel, kernel_from_spec

MAX_NAME_BYTES = _abi.SESSION_NAME_LENGTH - 1
MAX_TOKEN = (1 << 64) - 1


def open_device(kernel: Kernel | str | None) -> tuple[Kernel, int]:
    """The kernel named by *kernel* (an object, a spec, or the default) and an
    open fd of its /dev/liveupdate, or the error that says why not."""
    k = (
        kernel
        if kernel is not None and not isinstance(kernel, str)
        else kernel_from_spec(kernel)
    )
    try:
        return k, k.open_device()
    except OSError as exc:
        raise kernel_error(exc.errno or E.EIO, "open", "/dev/liveupdate") from exc


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def check_session_name(name: str) -> bytes:
    """The encoded *name*, or :class:`InvalidArgumentError` saying what is wrong."""
    if not isinstance(name, str):
        raise InvalidArgumentError("session name", f"expected a string, got {name!r}")
    raw = _abi.encode_name(name)
    if not raw:
        raise InvalidArgumentError("session name", "must not be empty")
    if b"\0" in raw:
        raise InvalidArgumentError(
            f"session name {name!r}", "must not contain a NUL byte"
        )
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidArgumentError(
            f"session name {name!r}",
            f"is {len(raw)} bytes long; the kernel takes at most {MAX_NAME_BYTES}",
        )
    return raw


def check_token(token: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int):
        raise InvalidArgumentError("token", f"expected an integer, got {token!r}")
    if not 0 <= token <= MAX_TOKEN:
        raise InvalidArgumentError(
            f"token {token}", "must fit in an unsigned 64-bit integer"
        )
    return token


def check_fd(fd: int | HasFileno) -> int:
    """The raw fd of *fd*, checked to be open."""
    raw = fd if isinstance(fd, int) else fd.fileno()
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidArgumentError("fd", f"expected a file descriptor, got {fd!r}")
    if raw < 0:
        raise InvalidArgumentError(f"fd {raw}", "is negative")
    try:
        os.fstat(raw)
    except OSError:
        raise InvalidArgumentError(
            f"fd {raw}", "is not an open file descriptor"
        ) from None
    return raw


@final
class LiveUpdateDevice(Closing):
    """An open ``/dev/liveupdate`` (merged ABI).

    The device admits one opener; close it as soon as the sessions exist:
    session fds stay valid without it.
    """

    __slots__ = ("_fd", "kernel")

    def __init__(self, kernel: Kernel, fd: int) -> None:
        self.kernel = kernel
        self._fd: int | None = fd

    @classmethod
    def open(cls, kernel: Kernel | str | None = None) -> LiveUpdateDevice:
        """Open the device of *kernel* (a :class:`Kernel`, a spec, or the default).

        :raises DeviceBusyError: another process holds it.
        :raises DeviceUnavailableError: there is no usable device here.
        """
        return cls(*open_device(kernel))

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("/dev/liveupdate is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.kernel.close(fd)

    def create_session(self, name: str) -> Session:
        """Create an outgoing session: its files go through the next kexec.

        :raises SessionExistsError: a session of that name exists in this kernel.
        """
        raw = check_session_name(name)
        buf = _abi.SESSION_CREATE.pack(name=raw)
        self._ioctl(_abi.CREATE_SESSION, buf, name)
        fd = int(_abi.SESSION_CREATE.unpack(buf)["fd"])
        return Session(self.kernel, fd, name, incoming=False)

    def retrieve_session(self, name: str) -> Session:
        """Take back a session that came through the kexec (once per boot).

        :raises SessionNotFoundError: no such session came through.
        :raises SessionAlreadyRetrievedError: it was retrieved already.
        """
        raw = check_session_name(name)
        buf = _abi.SESSION_RETRIEVE.pack(name=raw)
        self._ioctl(_abi.RETRIEVE_SESSION, buf, name)
        fd = int(_abi.SESSION_RETRIEVE.unpack(buf)["fd"])
        return Session(self.kernel, fd, name, incoming=True)

    def _ioctl(self, request: _abi.Request, buf: bytearray, subject: str) -> None:
        try:
            self.kernel.ioctl(self.fileno(), request.number, buf)
        except OSError as exc:
            raise kernel_error(exc.errno or E.EIO, request.name, repr(subject)) from exc

    def __repr__(self) -> str:
        return f"<LiveUpdateDevice {self.kernel.spec} fd={self._fd}>"


@final
class Session(Closing):
    """A session fd: outgoing (created here) or incoming (retrieved after a kexec).

    Closing an outgoing session before the kexec unpreserves all its files:
    keep it open until the reboot syscall.
    """

    __slots__ = ("_fd", "_tokens", "incoming", "kernel", "name")

    def __init__(self, kernel: Kernel, fd: int, name: str, *, incoming: bool) -> None:
        self.kernel = kernel
        self.name = name
        self.incoming = incoming
        self._fd: int | None = fd
        self._tokens: set[int] = set()

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"session {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def tokens(self) -> frozenset[int]:
        """Tokens preserved through this handle."""
        return frozenset(self._tokens)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.kernel.close(fd)

    def preserve_fd(self, fd: int | HasFileno, token: int) -> None:
        """Preserve *fd* under *token* through the next kexec.

        This is the heavy step (a memfd's pages are allocated and pinned): do it
        before the blackout window. The file's contents are taken at the kexec.

        :raises InvalidArgumentError: closed or negative fd, bad or reused token.
        :raises UnsupportedFileError: this kernel cannot preserve this kind of file.
        :raises FileAlreadyPreservedError: the file is preserved already.
        """
        raw_fd = check_fd(fd)
        check_token(token)
        if token in self._tokens:
            raise InvalidArgumentError(
                f"token {token}", f"is already used in session {self.name!r}"
            )
        buf = _abi.SESSION_PRESERVE_FD.pack(fd=raw_fd, token=token)
        try:
            self.kernel.ioctl(self.fileno(), _abi.PRESERVE_FD.number, buf)
        except OSError as exc:
            raise kernel_error(
                exc.errno or E.EIO,
                _abi.PRESERVE_FD.name,
                f"{self.name!r}, token={token}",
                kind=describe_fd(raw_fd),
            ) from exc
        self._tokens.add(token)

    def retrieve_fd(self, token: int) -> OwnedFd:
        """The file preserved under *token*, as a new O_CLOEXEC fd you own.

        :raises TokenNotFoundError: nothing under this token, or FINISH ran.
        """
        check_token(token)
        buf = _abi.SESSION_RETRIEVE_FD.pack(token=token)
        self._ioctl(_abi.RETRIEVE_FD, buf, f"{self.name!r}, token={token}")
        return OwnedFd(int(_abi.SESSION_RETRIEVE_FD.unpack(buf)["fd"]))

    def finish(self) -> None:
        """Tell the kernel the session is restored; unretrieved files are dropped."""
        buf = _abi.SESSION_FINISH.pack()
        self._ioctl(_abi.FINISH, buf, repr(self.name))

    def get_name(self) -> str:
        """The session's name, as the kernel knows it."""
        buf = _abi.SESSION_GET_NAME.pack()
        self._ioctl(_abi.GET_NAME, buf, repr(self.name))
        return _abi.decode_name(bytes(_abi.SESSION_GET_NAME.unpack(buf)["name"]))

    def _ioctl(self, request: _abi.Request, buf: bytearray, subject: str) -> None:
        try:
            self.kernel.ioctl(self.fileno(), request.number, buf)
        except OSError as exc:
            raise kernel_error(exc.errno or E.EIO, request.name, subject) from exc

    def __repr__(self) -> str:
        direction = "incoming" if self.incoming else "outgoing"
        return f"<Session {self.name!r} {direction} fd={self._fd}>"
