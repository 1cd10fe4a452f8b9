"""The RFC (July 2025 seed) ABI: one global state machine on /dev/liveupdate.

::

    NORMAL --PREPARE--> PREPARED --reboot(KEXEC)--> FROZEN --kexec--> UPDATED
       ^                   |                                           |
       +------CANCEL-------+                                  FINISH --+--> NORMAL

Files are preserved globally under caller-chosen tokens (FD_PRESERVE), can be
withdrawn in NORMAL (FD_UNPRESERVE), and come back in UPDATED (FD_RESTORE).
"""

from __future__ import annotations

import errno as E

from orchestrator._compat import TYPE_CHECKING, final

from . import _abi
from ._errors import kernel_error
from ._fds import Closing, OwnedFd, describe_fd
from ._rfcstate import RfcState
from ._session import HasFileno, check_fd, check_token, open_device

if TYPE_CHECKING:
    from ._kernel import Kernel


@final
class RfcDevice(Closing):
    """An open /dev/liveupdate on a kernel that carries the RFC series."""

    __slots__ = ("_fd", "kernel")

    def __init__(self, kernel: Kernel, fd: int) -> None:
        self.kernel = kernel
        self._fd: int | None = fd

    @classmethod
    def open(cls, kernel: Kernel | str | None = None) -> RfcDevice:
        return cls(*open_device(kernel))

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("/dev/liveupdate is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.kernel.close(fd)

    def _ioctl(
        self,
        request: _abi.Request,
        buf: bytearray | None,
        subject: str = "",
        kind: str = "",
    ) -> None:
        try:
            self.kernel.ioctl(self.fileno(), request.number, buf)
        except OSError as exc:
            raise kernel_error(exc.errno or E.EIO, request.name, subject, kind) from exc

    def state(self) -> RfcState:
        """GET_STATE."""
        buf = _abi.RFC_STATE.pack()
        self._ioctl(_abi.RFC_GET_STATE, buf)
        return RfcState(int(_abi.RFC_STATE.unpack(buf)["state"]))

    def prepare(self) -> None:
        """PREPARE: NORMAL → PREPARED (heavy serialization happens here)."""
        self._ioctl(_abi.RFC_PREPARE, None)

    def cancel(self) -> None:
        """CANCEL: back to NORMAL; preserved tokens stay valid."""
        self._ioctl(_abi.RFC_CANCEL, None)

    def finish(self) -> None:
        """FINISH: UPDATED → NORMAL; unrestored files are discarded."""
        self._ioctl(_abi.RFC_FINISH, None)

    def preserve_fd(self, fd: int | HasFileno, token: int) -> int:
        """FD_PRESERVE *fd* under *token*; returns the token the kernel wrote back."""
        raw_fd = check_fd(fd)
        check_token(token)
        buf = _abi.RFC_FD.pack(fd=raw_fd, token=token)
        self._ioctl(_abi.RFC_FD_PRESERVE, buf, f"token={token}", describe_fd(raw_fd))
        return int(_abi.RFC_FD.unpack(buf)["token"])

    def unpreserve_fd(self, token: int) -> None:
        """FD_UNPRESERVE: withdraw *token* (NORMAL only)."""
        check_token(token)
        buf = _abi.RFC_TOKEN.pack(token=token)
        self._ioctl(_abi.RFC_FD_UNPRESERVE, buf, f"token={token}")

    def restore_fd(self, token: int) -> OwnedFd:
        """FD_RESTORE: the file preserved under *token* (UPDATED only)."""
        check_token(token)
        buf = _abi.RFC_FD.pack(token=token)
        self._ioctl(_abi.RFC_FD_RESTORE, buf, f"token={token}")
        return OwnedFd(int(_abi.RFC_FD.unpack(buf)["fd"]))

    def __repr__(self) -> str:
        return f"<RfcDevice {self.kernel.spec} fd={self._fd}>"
