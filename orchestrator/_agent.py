"""``liveupdate agent``: the long-running owner of the fds to preserve.

``/dev/liveupdate`` admits one opener and session fds must stay open until the
reboot syscall, while the fds to keep belong to other processes (VMMs,
services). So workloads hand their fds to the agent over a Unix
``SOCK_SEQPACKET`` socket (``SCM_RIGHTS``; protocol in
:mod:`orchestrator.agent_client`), the agent runs the update with its own
``agent`` plugin preserving them, and after the kexec -- started again at
boot -- it resumes the update and hands every fd back on ``reclaim``.

Peers are checked with ``SO_PEERCRED``: root, and the uids and gids given
with ``--allow-uid``/``--allow-gid``. The socket is created mode 0660 in a
directory the unit makes 0750.

Dead clients: a request is one packet, so a client that dies mid-request
registers nothing. A registration belongs to the agent once acknowledged: it
stays (and goes through the next update) until its owner withdraws or
reclaims it, whether or not the client still runs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._errors import OrchestratorError
from ._hookspecs import hookimpl
from .luo._fds import describe_fd, shmem_can_preserve

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ._context import StepContext
    from .luo import Kernel

logger = logging.getLogger(__name__)

MAX_PACKET = 1 << 16
CONTROL_SOCKET = "control.sock"
MAX_NAME = 128
_PEERCRED = struct.Struct("3i")


@dataclass(slots=True)
class Registration:
    """An fd the agent holds for a workload."""

    name: str
    fd: int
    kind: str
    size: int
    uid: int
    gid: int
    pid: int
    state: str  # "registered", then "restored" after an update

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        del data["fd"]
        return data


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


class AgentPlugin:
    """The ``agent`` plugin: preserves the agent's registrations, restores them."""

    name = "agent"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @hookimpl
    async def lu_preserve(self, ctx: StepContext) -> None:
        self.agent.frozen = True
        for reg in self.agent.registrations.values():
            await ctx.preserve(reg.name, reg.fd)
        ctx.record(
            "registrations", [r.public() for r in self.agent.registrations.values()]
        )

    @hookimpl
    async def lu_preserve_rollback(self, ctx: StepContext) -> None:
        self.agent.frozen = False  # registrations are open for changes again

    @hookimpl
    async def lu_restore(self, ctx: StepContext) -> None:
        for meta in ctx.recorded("registrations", []):
            fd = (await ctx.retrieve(meta["name"])).detach()
            self.agent.registrations[meta["name"]] = Registration(
                **{**meta, "fd": fd, "state": "restored"}
            )
        self.agent.frozen = False

    @hookimpl
    async def lu_finish(self, ctx: StepContext) -> None:
        self.agent.save()


class Agent:
    """Registrations and the socket that serves them."""

    def __init__(
        self,
        socket_path: Path,
        state_dir: Path,
        kernel: Kernel,
        allow_uids: frozenset[int] = frozenset(),
        allow_gids: frozenset[int] = frozenset(),
    ) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.kernel = kernel
        self.allow_uids = allow_uids | {0}
        self.allow_gids = allow_gids
        self.registrations: dict[str, Registration] = {}
        self.frozen = False  # an update is past PRESERVE: no changes
        self.updating = False
        self.update_scope: anyio.CancelScope | None = None
        self.task_group: anyio.abc.TaskGroup | None = None
        self.start_update: Callable[[Path], Coroutine[Any, Any, None]] | None = None

    def save(self) -> None:
        """Publish the registrations (metadata only) for ``status`` and operators."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_dir / "agent-registrations.json.tmp"
        tmp.write_text(json.dumps([r.public() for r in self.registrations.values()]))
        os.replace(tmp, self.state_dir / "agent-registrations.json")

    def allowed(self, peer: Peer) -> bool:
        return peer.uid in self.allow_uids or peer.gid in self.allow_gids

    # --- requests -------------------------------------------------------------------

    def handle(
        self, peer: Peer, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        """Answer one request; the fds received are consumed (kept or closed)."""
        op = request.get("op")
        try:
            if not self.allowed(peer):
                raise AgentRefusal(
                    f"uid {peer.uid} gid {peer.gid} (pid {peer.pid}) is not allowed "
                    f"to use the agent (allowed uids {sorted(self.allow_uids)}, "
                    f"gids {sorted(self.allow_gids)})"
                )
            if op == "register":
                return self._register(peer, request, fds), []
            if fds:
                raise AgentRefusal(f"{op!r} takes no fd")
            if op == "list":
                return {
                    "ok": True,
                    "items": [r.public() for r in self.registrations.values()],
                }, []
            if op == "withdraw":
                self._take(peer, request, "withdraw")
                return {"ok": True}, []
            if op == "run":
                return self._run(request), []
            if op == "reclaim":
                reg = self._take(peer, request, "reclaim")
                return {"ok": True, "name": reg.name, "state": reg.state}, [reg.fd]
            raise AgentRefusal(
                f"unknown op {op!r}: expected register, list, withdraw, reclaim or run"
            )
        except AgentRefusal as exc:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "error": str(exc)}, []

    def _register(
        self, peer: Peer, request: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        name = request.get("name")
        if len(fds) != 1:
            raise AgentRefusal(f"register takes exactly one fd, got {len(fds)}")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "\0" in name:
            raise AgentRefusal(f"name must be 1..{MAX_NAME} characters without NUL")
        if self.frozen:
            raise AgentRefusal("an update is in progress: registrations are frozen")
        if name in self.registrations:
            raise AgentRefusal(f"{name!r} is already registered (withdraw it first)")
        fd = fds[0]
        if not shmem_can_preserve(fd):
            raise AgentRefusal(
                f"this kernel cannot preserve {describe_fd(fd)}; not registered"
            )
        reg = Registration(
            name,
            fd,
            describe_fd(fd),
            os.fstat(fd).st_size,
            peer.uid,
            peer.gid,
            peer.pid,
            "registered",
        )
        self.registrations[name] = reg
        self.save()
        logger.info("registered %s (%s) from pid %d", name, reg.kind, peer.pid)
        return {"ok": True, "name": name, "kind": reg.kind, "size": reg.size}

    def _run(self, request: dict[str, Any]) -> dict[str, Any]:
        playbook = request.get("playbook")
        if not isinstance(playbook, str) or not os.path.isfile(playbook):
            raise AgentRefusal(f"no playbook at {playbook!r}")
        if self.task_group is None or self.start_update is None or self.updating:
            raise AgentRefusal(
                "an update is already running" if self.updating else "not ready"
            )
        self.updating = True
        self.task_group.start_soon(self.start_update, Path(playbook))
        return {
            "ok": True,
            "playbook": playbook,
            "registrations": len(self.registrations),
        }

    def _take(self, peer: Peer, request: dict[str, Any], what: str) -> Registration:
        name = request.get("name")
        reg = self.registrations.get(name) if isinstance(name, str) else None
        if reg is None or not isinstance(name, str):
            raise AgentRefusal(f"nothing is registered under {name!r}")
        if peer.uid not in (0, reg.uid):
            raise AgentRefusal(f"{name!r} belongs to uid {reg.uid}")
        if self.frozen:
            raise AgentRefusal(f"an update is in progress: cannot {what} now")
        del self.registrations[name]
        self.save()
        if what == "withdraw":
            os.close(reg.fd)
        return reg

    # --- serving --------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.socket_path.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(
            self.socket_path, mode=0o660, kind=socket.SOCK_SEQPACKET
        )
        async with listener:
            task_status.started()
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        assert isinstance(stream, anyio.abc.UNIXSocketStream)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        pid, uid, gid = _PEERCRED.unpack(
            raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        peer = Peer(pid, uid, gid)
        async with stream:
            while True:
                try:
                    data, fds = await stream.receive_fds(MAX_PACKET, 4)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return  # the client went away
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return
                try:
                    request = json.loads(data)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    answer: dict[str, Any] = {
                        "ok": False,
                        "error": f"bad request: {exc}",
                    }
                    out: list[int] = []
                    for fd in fds:
                        os.close(fd)
                else:
                    answer, out = self.handle(peer, request, fds)
                payload = json.dumps(answer).encode()
                try:
                    if out:
                        await stream.send_fds(payload, out)
                    else:
                        await stream.send(payload)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    # The client died before its answer: what it asked is done
                    # (a registration stands; see the module docstring).
                    logger.info("pid %d went away before its answer", peer.pid)
                    return
                finally:
                    for fd in out:  # reclaimed: the peer has its own copy now
                        os.close(fd)


class AgentRefusal(OrchestratorError):
    """A request the agent refuses; the message goes back to the client."""


def control_socket_for(handover_socket: Path) -> Path:
    """The control API's socket, beside the hand-over socket."""
    return handover_socket.with_name(CONTROL_SOCKET)


async def run_agent(
    socket_path: Path,
    state_dir: Path,
    kernel: Kernel,
    allow_uids: frozenset[int] = frozenset(),
    allow_gids: frozenset[int] = frozenset(),
    *,
    task_status: anyio.abc.TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Resume an update the kexec interrupted, then serve until cancelled.

    Updates are started with ``{"op": "run", "playbook": PATH}``; the agent's
    own ``agent`` plugin preserves its registrations.
    """
    from ._engine import Engine, plugin_manager
    from ._journal import last_run, read_journal
    from ._playbook import load_playbook
    from ._resume import read_plan

    agent = Agent(socket_path, state_dir, kernel, allow_uids, allow_gids)

    def engine_for(playbook: Path) -> Engine:
        pm = plugin_manager(extra=[AgentPlugin(agent)])
        known = {name for name, _ in pm.list_name_plugin()}
        return Engine(
            load_playbook(playbook, known_plugins=known), kernel, state_dir, pm=pm
        )

    if read_plan(state_dir) is not None:
        start = last_run(read_journal(state_dir))[0]
        outcome = await engine_for(Path(start["playbook"])).resume()
        logger.info("resumed the interrupted update: %s", outcome.value)
    agent.save()

    async def run_update(playbook: Path) -> None:
        with anyio.CancelScope() as scope:  # POST /v1/cancel cancels it
            agent.update_scope = scope
            try:
                outcome = await engine_for(playbook).run()  # the kexec does not return
            except OrchestratorError as exc:
                logger.error("the update could not start: %s", exc)
            else:
                logger.warning("the update ended without a kexec: %s", outcome.value)
            finally:
                agent.frozen = agent.updating = False
                agent.update_scope = None

    from ._agent_http import serve_control

    agent.start_update = run_update
    async with anyio.create_task_group() as tg:
        agent.task_group = tg
        await tg.start(agent.serve)
        await tg.start(serve_control, agent, control_socket_for(socket_path))
        task_status.started(agent)
