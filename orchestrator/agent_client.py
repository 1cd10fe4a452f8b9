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

from ._errors import OrchestratorError
from .luo._fds import Closing

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

DEFAULT_SOCKET = "/run/liveupdate/agent.sock"
MAX_PACKET = 1 << 16


class AgentError(OrchestratorError):
    """The agent refused a request, or cannot be reached."""


class AgentClient(Closing):
    """A connection to the agent; one request at a time."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET) -> None:
        self.path = os.fspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise AgentError(
                f"cannot reach the agent at {self.path}: {exc.strerror}"
            ) from exc

    def close(self) -> None:
        self._sock.close()

    def _call(
        self, request: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        data = json.dumps(request).encode()
        if fds:
            socket.send_fds(self._sock, [data], fds)
        else:
            self._sock.send(data)
        raw, got, _flags, _addr = socket.recv_fds(self._sock, MAX_PACKET, 4)
        if not raw:
            for fd in got:
                os.close(fd)
            raise AgentError("the agent closed the connection")
        answer: dict[str, Any] = json.loads(raw)
        if not answer.get("ok"):
            for fd in got:
                os.close(fd)
            raise AgentError(str(answer.get("error", "refused")))
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
