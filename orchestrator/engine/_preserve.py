"""Preserving fds through either ABI behind one interface.

Plugins say *what* to keep (``ctx.preserve("kv0", fd)``); this module decides
*how*: on the merged ABI one session per plugin (``lu-<plugin>``), or per
group of files a plugin names (``lu-<plugin>.<group>``), tokens counted
from 1; on the RFC ABI global tokens. The manifest -- which key went
where -- is journaled, and after the kexec it is all that is needed to take
every fd back.
"""

from __future__ import annotations

import os

from orchestrator._compat import TYPE_CHECKING, Protocol
from orchestrator.luo._kernel import detect_abi
from orchestrator.luo._session import LiveUpdateDevice

if TYPE_CHECKING:
    from typing import Any

    from orchestrator.luo import Kernel, OwnedFd, Session

SESSION_PREFIX = "lu-"


def _abi_of(kernel: Kernel) -> str:
    """``"merged"`` or ``"rfc"``, from how the device answers GET_STATE."""
    fd = kernel.open_device()
    try:
        return detect_abi(kernel, fd)[0]
    finally:
        kernel.close(fd)


class Preserver(Protocol):
    abi: str

    def preserve(
        self, owner: str, key: str, fd: int, group: str | None = None
    ) -> dict[str, Any]:
        """Preserve *fd*; return the manifest entry that finds it after the kexec.

        *group* puts it in a session of its own with the other files of that
        group (merged ABI: ``lu-<owner>.<group>``), e.g. one per VM.
        """

    def prepare(self) -> None: ...
    def cancel(self) -> None: ...
    def close_device(self) -> None: ...


class MergedPreserver:
    """Sessions per owner; the device fd is held only while sessions are created."""

    abi = "merged"

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.sessions: dict[str, Session] = {}
        self._dev: LiveUpdateDevice | None = None

    def preserve(
        self, owner: str, key: str, fd: int, group: str | None = None
    ) -> dict[str, Any]:
        name = SESSION_PREFIX + owner + ("" if group is None else f".{group}")
        session = self.sessions.get(name)
        if session is None:
            if self._dev is None:
                self._dev = LiveUpdateDevice.open(self.kernel)
            session = self._dev.create_session(name)
            self.sessions[name] = session
        token = len(session.tokens) + 1
        session.preserve_fd(fd, token)
        return {"session": session.name, "token": token}

    def close_device(self) -> None:
        """Let go of /dev/liveupdate; session fds stay open until the kexec."""
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def prepare(self) -> None:
        self.close_device()

    def cancel(self) -> None:
        """Close every session: the kernel unpreserves all their files."""
        self.close_device()
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


class RfcPreserver:
    """Global tokens on the RFC ABI, with its PREPARE and CANCEL ioctls."""

    abi = "rfc"

    def __init__(self, kernel: Kernel) -> None:
        from orchestrator.luo._rfc import RfcDevice

        self.kernel = kernel
        self.dev = RfcDevice.open(kernel)
        self.tokens: list[int] = []

    def preserve(
        self, owner: str, key: str, fd: int, group: str | None = None
    ) -> dict[str, Any]:
        token = int.from_bytes(os.urandom(8), "little") >> 1
        self.dev.preserve_fd(fd, token)
        self.tokens.append(token)
        return {"token": token}

    def prepare(self) -> None:
        self.dev.prepare()

    def cancel(self) -> None:
        from orchestrator.luo._rfcstate import RfcState

        if self.dev.state() in (RfcState.PREPARED, RfcState.FROZEN):
            self.dev.cancel()
        for token in self.tokens:
            self.dev.unpreserve_fd(token)
        self.tokens.clear()

    def close_device(self) -> None:
        """The RFC device stays open: the reboot syscall needs no fd, but FINISH does."""


def open_preserver(kernel: Kernel) -> Preserver:
    return RfcPreserver(kernel) if _abi_of(kernel) == "rfc" else MergedPreserver(kernel)


class Retriever(Protocol):
    """After the kexec: fds back by their manifest entries, then FINISH.

    :class:`orchestrator.restore._keeper.Keeper` is the one implementation: it holds
    what it retrieved, so that nothing dies with the process that asked.
    """

    pid: int  # of the process that holds what was retrieved
    missing: list[str]  # planned sessions the new kernel did not have

    def retrieve(self, entry: dict[str, Any]) -> OwnedFd: ...
    def finish(self) -> None: ...
