"""Client of the host agent: hand fds over for the next live update, take them back.

The agent listens on a Unix ``SOCK_SEQPACKET`` socket (default
``/run/liveupdate/agent.sock``). Every request is one packet: a JSON object,
with the fd attached as ``SCM_RIGHTS`` for ``register``; every answer is one
packet: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``, with the
fd attached for ``reclaim``. A packet arrives whole or not at all, so a client
that dies mid-request registers nothing.

::

    from orchestrator.agent_client import AgentClient

    with AgentClient("/run/liveupdate/agent.sock") as agent:
        agent.register("vm0-ram", memfd)      # before the update
        ...
        fd = agent.reclaim("vm0-ram")         # after it, in the new kernel

Synchronous and standard-library only, so that any workload can use it.
"""

from __future__ import annotations

import json
import os
import socket

from orchestrator._compat import TYPE_CHECKING
from orchestrator.errors import AgentError, AgentRefusedError, AgentUnreachableError
from orchestrator.luo._fds import Closing

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

DEFAULT_SOCKET = "/run/liveupdate/agent.sock"
MAX_PACKET = 1 << 16


DEFAULT_TIMEOUT = 60.0


class AgentClient(Closing):
    """A connection to the agent; one request at a time.

    :param timeout: seconds to wait for each answer (and to connect).
    :raises AgentUnreachableError: no agent listens at *path*.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SOCKET,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = os.fspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise AgentUnreachableError(
                self.path, exc.strerror or str(exc), exc.errno
            ) from exc

    def close(self) -> None:
        self._sock.close()

    def _receive(self, flags: int = 0) -> tuple[bytes, list[int]]:
        try:
            raw, got, _flags, _addr = socket.recv_fds(self._sock, MAX_PACKET, 4, flags)
        except ConnectionResetError:
            # The agent refused this connection and closed it with the request
            # unread; the reset is reported first, its answer is still queued.
            raw, got, _flags, _addr = socket.recv_fds(
                self._sock, MAX_PACKET, 4, socket.MSG_DONTWAIT
            )
        return raw, got

    def _call(
        self, request: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        op = str(request.get("op"))
        data = json.dumps(request).encode()
        try:
            try:
                if fds:
                    socket.send_fds(self._sock, [data], fds)
                else:
                    self._sock.send(data)
            except OSError as exc:
                # Refused at connect (not allowed, or the agent is full): the
                # agent answered and hung up before this request went out.
                try:
                    raw, got = self._receive(socket.MSG_DONTWAIT)
                except OSError:
                    raise exc from None
            else:
                raw, got = self._receive()
        except TimeoutError as exc:
            raise AgentUnreachableError(self.path, "no answer in time") from exc
        except OSError as exc:
            raise AgentUnreachableError(
                self.path, f"the connection failed: {exc.strerror}", exc.errno
            ) from exc
        if not raw:
            for fd in got:
                os.close(fd)
            raise AgentUnreachableError(self.path, "the agent closed the connection")
        try:
            answer = json.loads(raw)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            for fd in got:
                os.close(fd)
            raise AgentError(f"the agent sent a malformed answer: {exc}") from exc
        if not answer.get("ok"):
            for fd in got:
                os.close(fd)
            raise AgentRefusedError(op, str(answer.get("error", "refused")))
        return answer, got

    def register(self, name: str, fd: int) -> dict[str, Any]:
        """Hand *fd* to the agent under *name*; the agent keeps its own copy."""
        answer, _ = self._call({"op": "register", "name": name}, [fd])
        return answer

    def withdraw(self, name: str) -> None:
        """Take a registration back before an update (the agent closes its copy)."""
        self._call({"op": "withdraw", "name": name})

    def list(self) -> list[dict[str, Any]]:
        """Registrations and fds waiting to be reclaimed."""
        answer, _ = self._call({"op": "list"})
        items: list[dict[str, Any]] = answer["items"]
        return items

    def run(self, playbook: str | os.PathLike[str]) -> dict[str, Any]:
        """Ask the agent to run *playbook* (it preserves its registrations)."""
        answer, _ = self._call({"op": "run", "playbook": os.path.abspath(playbook)})
        return answer

    def reclaim(self, name: str) -> int:
        """The fd registered under *name* (after an update: the preserved one)."""
        _, fds = self._call({"op": "reclaim", "name": name})
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise AgentError(f"the agent sent {len(fds)} fds for {name!r}")
        return fds[0]
