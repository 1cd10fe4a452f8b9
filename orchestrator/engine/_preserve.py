"""Preserving fds through either ABI behind one interface.

Plugins say *what* to keep (``ctx.preserve("kv0", fd)``); this module decides
*how*: on the merged ABI one session per plugin (``lu-<plugin>``), or per
group of files a plugin names (``lu-<plugin>.<group>``), tokens counted
from 1; on the RFC ABI global tokens. The manifest -- which key went
where -- is journaled, and after the kexec it is all that is needed to take
every fd back.
"""

from __future__ import annotations

import errno
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


class SessionParking(Protocol):
    """Where a service keeps copies of its session fds: the agent's fd store.

    A session lives while some process holds its fd. Parked, it outlives the
    process that made it: an agent restarted before the kexec, or stopped by
    ``systemctl kexec``'s shutdown (which then preserves the store).
    """

    #: Session fds handed back at start (after a ``systemctl kexec``,
    #: systemd retrieved them), by session name; for the resume to adopt.
    stored: dict[str, int]

    def park(self, name: str, fd: int) -> bool:
        """Keep a copy of session *name*'s *fd*; False when it could not."""

    def unpark(self, name: str) -> None:
        """Drop the copy of session *name* (before it is closed to cancel)."""

    def kexec_via_systemd_refusal(self) -> str | None:
        """Why ``systemctl kexec`` would lose the parked sessions, or None.

        Asked (blocking) before the update touches anything, and again once
        every session is parked, before the freeze.
        """


class MergedPreserver:
    """Sessions per owner; the device fd is held only while sessions are created.

    With *parking*, every session's fd is parked as soon as it is made; with
    *must_park* as well, a session that cannot be parked fails its step.
    """

    abi = "merged"

    def __init__(
        self,
        kernel: Kernel,
        parking: SessionParking | None = None,
        *,
        must_park: bool = False,
    ) -> None:
        self.kernel = kernel
        self.sessions: dict[str, Session] = {}
        self._dev: LiveUpdateDevice | None = None
        self.parking = parking
        self.must_park = must_park

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
            parked = self.parking is not None and self.parking.park(
                name, session.fileno()
            )
            if self.must_park and not parked:
                raise OSError(
                    errno.EIO,
                    f"session {name} could not be parked in the fd store, and "
                    "systemctl kexec would lose it",
                )
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
        for name, session in self.sessions.items():
            if self.parking is not None:
                self.parking.unpark(name)  # else the store's copy keeps it alive
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


def open_preserver(
    kernel: Kernel, parking: SessionParking | None = None, *, must_park: bool = False
) -> Preserver:
    if _abi_of(kernel) == "rfc":
        return RfcPreserver(kernel)
    return MergedPreserver(kernel, parking, must_park=must_park)


class Retriever(Protocol):
    """After the kexec: fds back by their manifest entries, then FINISH.

    :class:`orchestrator.restore._keeper.Keeper` is the one implementation: it holds
    what it retrieved, so that nothing dies with the process that asked.
    """

    pid: int  # of the process that holds what was retrieved
    missing: list[str]  # planned sessions the new kernel did not have

    def retrieve(self, entry: dict[str, Any]) -> OwnedFd: ...
    def adopt(self, session: str, fd: int) -> None:
        """Hold *session* (a missing one's fd, from elsewhere) with the rest."""

    def finish(self) -> None: ...
