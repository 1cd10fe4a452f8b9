"""``liveupdate agent``: the long-running owner of the fds to preserve.

``/dev/liveupdate`` admits one opener and session fds must stay open until the
reboot syscall, while the fds to keep belong to other processes (VMMs,
services). So workloads hand their fds to the agent over a Unix
``SOCK_SEQPACKET`` socket (``SCM_RIGHTS``; protocol in
:mod:`orchestrator.agent_client`), the agent runs the update with its own
``agent`` plugin preserving them, and after the kexec -- started again at
boot -- it resumes the update and hands every fd back on ``reclaim``.

Peers are checked with ``SO_PEERCRED`` when they connect, before any byte of
theirs is read: root, and the uids and gids given with
``--allow-uid``/``--allow-gid``; the socket file admits the same peers (see
:mod:`orchestrator.agent._guard` for this and for the limits).

Under systemd, every fd the agent holds for a workload is also parked in the
service's fd store (:mod:`orchestrator.agent._fdstore`), named after its
registration; an agent that starts again takes them back (``LISTEN_FDS``) and
matches them with the registrations it had published, so a crash or a restart
of the agent loses no workload's fd. A stored fd whose registration was not
published (the agent died in between) is kept all the same, as root's.

Dead clients: a request is one packet, so a client that dies mid-request
registers nothing. A registration belongs to the agent once acknowledged: it
stays (and goes through the next update) until its owner withdraws or
reclaims it, whether or not the client still runs.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import os
import socket
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from orchestrator.engine._hookspecs import hookimpl
from orchestrator.engine._phases import Phase
from orchestrator.engine._playbook import PhasePlan, Playbook, RetryPolicy, Step, Where
from orchestrator.errors import (
    AgentRefusal,
    AgentSetupError,
    BadRequestError,
    OrchestratorError,
    UpdateRunningError,
)
from orchestrator.luo._fds import describe_fd, shmem_can_preserve

from ._fdstore import (
    fd_store_support,
    kexec_via_systemd_refusal,
    registration_fdname,
    registration_name,
    remove_fd,
    session_fdname,
    session_name,
    store_fd,
    systemd_version,
)
from ._guard import (
    InstanceLock,
    Limits,
    Peer,
    Slots,
    decode_object,
    grant_access,
    listen_unix,
    serve_listener,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

    from orchestrator.engine._context import StepContext
    from orchestrator.engine._engine import Engine
    from orchestrator.luo import Kernel

    from ._fdstore import FdStoreSupport, StoredFd

logger = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"
REGISTRATIONS = "agent-registrations.json"
MAX_NAME = 128
MAX_FDS = 1  # per request: register takes one
AGENT_PHASES = (Phase.PRESERVE, Phase.RESTORE, Phase.FINISH)
AGENT_STEP_TIMEOUT = 60.0


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


class AgentPlugin:
    """The ``agent`` plugin: preserves the agent's registrations, restores them."""

    name = "agent"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @hookimpl
    async def lu_preserve(self, ctx: StepContext) -> None:
        async with self.agent.lock:  # a registration under way finishes first
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
            reg = Registration(**{**meta, "fd": fd, "state": "restored"})
            self.agent.registrations[meta["name"]] = reg
            await self.agent.park(reg, replace=True)
        self.agent.frozen = False

    @hookimpl
    async def lu_finish(self, ctx: StepContext) -> None:
        await self.agent.save()


def with_agent_steps(playbook: Playbook) -> Playbook:
    """*playbook* with an ``agent`` step added to each of preserve, restore and
    finish that has none, so that the registrations go through every update
    whatever the playbook names. Steps the playbook gives keep their place."""
    phases = dict(playbook.phases)
    where = Where(f"{playbook.path} (step added by the agent)", 0)
    for phase in AGENT_PHASES:
        plan = phases.get(phase)
        steps = plan.steps if plan is not None else ()
        if any(step.plugin == AgentPlugin.name for step in steps):
            continue
        names = {step.name for step in steps}
        name = "agent" if "agent" not in names else f"agent-{len(steps)}"
        added = Step(
            phase,
            AgentPlugin.name,
            name,
            types.MappingProxyType({}),
            AGENT_STEP_TIMEOUT,
            RetryPolicy(),
            where,
            len(steps),
        )
        phases[phase] = PhasePlan(
            phase,
            plan.timeout if plan is not None else None,
            (*steps, added),
            plan.where if plan is not None else where,
        )
    ordered = {phase: phases[phase] for phase in Phase if phase in phases}
    return dataclasses.replace(playbook, phases=types.MappingProxyType(ordered))


class Agent:
    """Registrations and the socket that serves them."""

    def __init__(
        self,
        socket_path: Path,
        state_dir: Path,
        kernel: Kernel,
        allow_uids: frozenset[int] = frozenset(),
        allow_gids: frozenset[int] = frozenset(),
        limits: Limits | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.kernel = kernel
        self.allow_uids = allow_uids | {0}
        self.allow_gids = allow_gids
        self.limits = (limits or Limits()).resolve()
        assert self.limits.max_connections is not None
        self.slots = Slots(self.limits.max_connections)
        self.registrations: dict[str, Registration] = {}
        self.lock = anyio.Lock()  # one change of the registrations at a time
        self.blocking = anyio.CapacityLimiter(4)  # threads for file work
        self.frozen = False  # an update is past PRESERVE: no changes
        self.updating = False
        self.update_scope: anyio.CancelScope | None = None
        self.task_group: anyio.abc.TaskGroup | None = None
        self.engine_for: Callable[[Path], Engine] | None = None
        self.start_update: Callable[[Engine], Coroutine[Any, Any, None]] | None = None

    def _write(self, items: list[dict[str, Any]]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_dir / f"{REGISTRATIONS}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(items).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_dir / REGISTRATIONS)

    async def save(self, items: list[dict[str, Any]] | None = None) -> None:
        """Publish the registrations (metadata only) for ``status`` and operators,
        in a worker thread (it fsyncs).

        :raises OSError: the state directory cannot be written.
        """
        if items is None:
            items = [r.public() for r in self.registrations.values()]
        await anyio.to_thread.run_sync(self._write, items, limiter=self.blocking)

    async def _publish(self, items: list[dict[str, Any]]) -> None:
        try:
            await self.save(items)
        except OSError as exc:
            logger.error("cannot write %s: %s", self.state_dir / REGISTRATIONS, exc)
            raise AgentRefusal(
                f"the agent cannot record registrations in {self.state_dir} "
                f"({exc.strerror}); nothing changed"
            ) from exc

    async def park(self, reg: Registration, *, replace: bool = False) -> None:
        """Put *reg*'s fd in the service's fd store (a no-op outside systemd);
        *replace* drops what was stored under its name first."""
        fdname = registration_fdname(reg.name)
        if replace:
            await anyio.to_thread.run_sync(remove_fd, fdname, limiter=self.blocking)
        await anyio.to_thread.run_sync(store_fd, reg.fd, fdname, limiter=self.blocking)

    async def unpark(self, name: str) -> None:
        """Drop registration *name*'s fd from the service's fd store."""
        fdname = registration_fdname(name)
        await anyio.to_thread.run_sync(remove_fd, fdname, limiter=self.blocking)

    def _published(self) -> dict[str, dict[str, Any]]:
        try:
            items = json.loads((self.state_dir / REGISTRATIONS).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(items, list):
            return {}
        return {str(i["name"]): i for i in items if isinstance(i, dict) and "name" in i}

    async def adopt(self, stored: Sequence[StoredFd]) -> None:
        """Take back the fds the fd store handed over at start.

        Each becomes the registration published under its name again; an fd
        whose registration was not published is kept as root's (it was
        stored, so its owner may not have been told "no"); one for a name
        already held (restored by the update this start resumed) is closed,
        as are fds not stored by the agent.
        """
        published = await anyio.to_thread.run_sync(
            self._published, limiter=self.blocking
        )
        for item in stored:
            name = registration_name(item.name)
            if name is None or name in self.registrations:
                logger.info("fd store: dropping %s (not needed)", item.name)
                os.close(item.fd)
                if name is None:
                    await anyio.to_thread.run_sync(
                        remove_fd, item.name, limiter=self.blocking
                    )
                continue
            meta = published.get(name)
            fields = _registration_fields(meta) if meta is not None else None
            if fields is None:
                logger.warning(
                    "fd store: %r was stored but not published; kept, as root's", name
                )
                fields = {"uid": 0, "gid": 0, "pid": 0, "state": "registered"}
            self.registrations[name] = Registration(
                name=name,
                fd=item.fd,
                kind=describe_fd(item.fd),
                size=os.fstat(item.fd).st_size,
                **fields,
            )
            logger.info("fd store: took %r back", name)

    def allowed(self, peer: Peer) -> bool:
        return (
            peer.uid in self.allow_uids
            or peer.gid in self.allow_gids
            or not self.allow_gids.isdisjoint(peer.groups)
        )

    def refusal_text(self, peer: Peer, reason: str) -> str:
        if reason == "busy":
            return (
                f"the agent is serving {self.slots.limit} connections, its limit; "
                "try again later"
            )
        return (
            f"uid {peer.uid} gid {peer.gid} (pid {peer.pid}) is not allowed "
            f"to use the agent (allowed uids {sorted(self.allow_uids)}, "
            f"gids {sorted(self.allow_gids)})"
        )

    # --- requests -------------------------------------------------------------------

    async def handle(
        self, peer: Peer, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        """Answer one request; the fds received are consumed (kept or closed)."""
        op = request.get("op")
        try:
            if not self.allowed(peer):  # checked at accept already; kept as a guard
                raise AgentRefusal(self.refusal_text(peer, "peer"))
            if op == "register":
                return await self._register(peer, request, fds), []
            if fds:
                raise AgentRefusal(f"{op!r} takes no fd")
            if op == "list":
                return {
                    "ok": True,
                    "items": [r.public() for r in self.registrations.values()],
                }, []
            if op == "withdraw":
                await self._take(peer, request, "withdraw")
                return {"ok": True}, []
            if op == "run":
                return await self.start_run(request), []
            if op == "reclaim":
                reg = await self._take(peer, request, "reclaim")
                return {"ok": True, "name": reg.name, "state": reg.state}, [reg.fd]
            raise AgentRefusal(
                f"unknown op {op!r}: expected register, list, withdraw, reclaim or run"
            )
        except AgentRefusal as exc:
            _close_unheld(fds, self.registrations)
            return {"ok": False, "error": str(exc)}, []

    async def _register(
        self, peer: Peer, request: dict[str, Any], fds: list[int]
    ) -> dict[str, Any]:
        name = request.get("name")
        if len(fds) != 1:
            raise AgentRefusal(f"register takes exactly one fd, got {len(fds)}")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "\0" in name:
            raise AgentRefusal(f"name must be 1..{MAX_NAME} characters without NUL")
        fd = fds[0]
        if not shmem_can_preserve(fd):
            raise AgentRefusal(
                f"this kernel cannot preserve {describe_fd(fd)}; not registered"
            )
        async with self.lock:
            if self.frozen:
                raise AgentRefusal("an update is in progress: registrations are frozen")
            if name in self.registrations:
                raise AgentRefusal(
                    f"{name!r} is already registered (withdraw it first)"
                )
            limit = self.limits.max_registrations
            if limit is not None and len(self.registrations) >= limit:
                raise AgentRefusal(
                    f"the agent holds {limit} registrations, its limit "
                    "(set by --max-registrations or RLIMIT_NOFILE)"
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
            await self._publish(
                [*(r.public() for r in self.registrations.values()), reg.public()]
            )
            self.registrations[name] = reg
            await self.park(reg)  # before the answer: acknowledged means kept
        logger.info("registered %s (%s) from pid %d", name, reg.kind, peer.pid)
        return {"ok": True, "name": name, "kind": reg.kind, "size": reg.size}

    async def start_run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start the update *request* names in the agent's task group.

        The playbook is loaded (in a worker thread) before the answer, so a
        playbook that cannot run is refused here with its reason.
        """
        playbook = request.get("playbook")
        if not isinstance(playbook, str) or not 0 < len(playbook) <= 4096:
            raise AgentRefusal(f"no playbook at {playbook!r}")
        tg, engine_for, start = self.task_group, self.engine_for, self.start_update
        if tg is None or engine_for is None or start is None:
            raise AgentRefusal("not ready")
        if self.updating:
            raise UpdateRunningError
        self.updating = True  # before the first await: one update at a time
        try:
            engine = await anyio.to_thread.run_sync(
                engine_for, Path(playbook), limiter=self.blocking
            )
        except (OrchestratorError, OSError) as exc:
            self.updating = False
            raise AgentRefusal(f"cannot run {playbook}: {exc}") from exc
        except BaseException:
            self.updating = False
            raise
        tg.start_soon(start, engine)
        return {
            "ok": True,
            "playbook": playbook,
            "registrations": len(self.registrations),
        }

    async def _take(
        self, peer: Peer, request: dict[str, Any], what: str
    ) -> Registration:
        name = request.get("name")
        async with self.lock:
            reg = self.registrations.get(name) if isinstance(name, str) else None
            if reg is None:
                raise AgentRefusal(f"nothing is registered under {name!r}")
            if peer.uid not in (0, reg.uid):
                raise AgentRefusal(f"{reg.name!r} belongs to uid {reg.uid}")
            if self.frozen:
                raise AgentRefusal(f"an update is in progress: cannot {what} now")
            await self._publish(
                [r.public() for r in self.registrations.values() if r is not reg]
            )
            del self.registrations[reg.name]
            await self.unpark(reg.name)
        if what == "withdraw":
            os.close(reg.fd)
        return reg

    # --- serving --------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = listen_unix(self.socket_path, socket.SOCK_SEQPACKET, 64)
        try:
            grant_access(self.socket_path, self.allow_uids - {0}, self.allow_gids)
            task_status.started()
            await serve_listener(
                listener,
                self.slots,
                self.allowed,
                self._connection,
                lambda peer, why: _packet(
                    {"ok": False, "error": self.refusal_text(peer, why)}
                ),
                "hand-over",
            )
        finally:
            listener.close()

    async def _connection(self, sock: socket.socket, peer: Peer) -> None:
        """Serve one allowed peer, one request packet at a time."""
        while await self._one_request(sock, peer):
            pass

    async def _one_request(self, sock: socket.socket, peer: Peer) -> bool:
        """Answer one request; whether the connection stays open."""
        packet = None
        with anyio.move_on_after(self.limits.idle_timeout) as idle:
            packet = await _receive_packet(sock, self.limits.max_packet)
        if idle.cancelled_caught:
            logger.info(
                "closed pid %d's connection: idle %.0f s",
                peer.pid,
                self.limits.idle_timeout,
            )
            return False
        if packet is None:
            return False  # the client hung up
        data, fds, problem = packet
        try:
            if problem:
                raise BadRequestError(problem)
            request = decode_object(data, self.limits.max_depth)
        except BadRequestError as exc:
            _close_unheld(fds, {})
            answer: dict[str, Any] = {"ok": False, "error": str(exc)}
            out: list[int] = []
        else:
            try:
                answer, out = await self.handle(peer, request, fds)
            except Exception as exc:  # contained to this request
                logger.exception("a request of pid %d failed", peer.pid)
                _close_unheld(fds, self.registrations)
                answer, out = {"ok": False, "error": f"internal error: {exc!r}"}, []
        try:
            with anyio.fail_after(self.limits.idle_timeout):
                await _send_packet(sock, _packet(answer), out)
        except (OSError, TimeoutError):
            # The client died (or stopped reading) before its answer: what it
            # asked is done (a registration stands; see the module docstring).
            logger.info("pid %d went away before its answer", peer.pid)
            return False
        finally:
            for fd in out:  # reclaimed: the peer has its own copy now
                os.close(fd)
        return True


def _registration_fields(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The owner and state of a published registration; None if malformed."""
    try:
        fields = {k: int(meta[k]) for k in ("uid", "gid", "pid")}
        state = str(meta.get("state", "registered"))
    except (KeyError, TypeError, ValueError):
        return None
    return {**fields, "state": state}


def _close_unheld(fds: list[int], registrations: dict[str, Registration]) -> None:
    held = {r.fd for r in registrations.values()}
    for fd in fds:
        if fd not in held:
            os.close(fd)


def _packet(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode()


async def _receive_packet(
    sock: socket.socket, max_bytes: int
) -> tuple[bytes, list[int], str] | None:
    """One request packet with its fds and what is wrong with it (``""``: nothing),
    or ``None`` when the peer hung up. Oversized packets and surplus fds are
    cut off by the kernel (which closes the fds it does not deliver)."""
    while True:
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                max_bytes, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            break
        except BlockingIOError:
            await anyio.wait_readable(sock)
    fds = array.array("i")
    problem = ""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        else:
            problem = f"unexpected ancillary data (level {level}, type {kind})"
    if flags & socket.MSG_TRUNC:
        problem = f"a request is at most {max_bytes} bytes"
    elif flags & socket.MSG_CTRUNC:
        problem = f"at most {MAX_FDS} fd per request"
    if not data and not ancillary and not problem:
        return None
    return data, list(fds), problem or ("" if data else "empty request")


async def _send_packet(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            sock.sendmsg([data], ancillary if fds else [])
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)


def control_socket_for(handover_socket: Path) -> Path:
    """The control API's socket, beside the hand-over socket."""
    return handover_socket.with_name(CONTROL_SOCKET)


def instance_lock(socket_path: Path, state_dir: Path) -> InstanceLock:
    """The locks that keep a second agent off this socket and this state dir
    (both directories are created if missing)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return InstanceLock(
        (socket_path.with_name(f"{socket_path.name}.lock"), state_dir / "agent.lock")
    )


async def run_agent(
    socket_path: Path,
    state_dir: Path,
    kernel: Kernel,
    allow_uids: frozenset[int] = frozenset(),
    allow_gids: frozenset[int] = frozenset(),
    limits: Limits | None = None,
    *,
    stored: Sequence[StoredFd] = (),
    task_status: anyio.abc.TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Take the agent's locks, resume an update the kexec interrupted, then
    serve until cancelled.

    Updates are started with ``{"op": "run", "playbook": PATH}``; the agent's
    own ``agent`` plugin preserves its registrations.

    :param stored: the fds the service's fd store handed back at start
        (:func:`orchestrator.agent._fdstore.listen_fds`); they are closed if
        the agent does not start.

    :raises AgentBusyError: another agent serves this socket or state dir;
        nothing of it was touched.
    :raises AgentSetupError: the sockets or the fd limit are unusable.
    """
    try:
        lock = instance_lock(socket_path, state_dir)
    except OSError as exc:
        _close_stored(stored)
        raise AgentSetupError(
            Path(exc.filename or state_dir), exc.strerror or str(exc)
        ) from exc
    try:
        lock.acquire()
    except BaseException:
        _close_stored(stored)
        raise
    try:
        agent = Agent(socket_path, state_dir, kernel, allow_uids, allow_gids, limits)
        await _run_locked(agent, task_status, stored)
    finally:
        lock.release()


class StoreParking:
    """The agent's fd store as the engine's :class:`SessionParking`.

    :param stored: what the store handed back at start; its sessions
        (``lus-`` names) are kept for the resume to adopt.
    """

    def __init__(self, support: FdStoreSupport, stored: Sequence[StoredFd]) -> None:
        self.support = support
        self.stored: dict[str, int] = {}
        for item in stored:
            name = session_name(item.name)
            if name is not None:
                self.stored[name] = item.fd

    def park(self, name: str, fd: int) -> bool:
        return store_fd(fd, session_fdname(name))

    def unpark(self, name: str) -> None:
        remove_fd(session_fdname(name))

    def kexec_via_systemd_refusal(self) -> str | None:
        return kexec_via_systemd_refusal(self.support)

    def release(self) -> None:
        """Let go of the sessions handed back at start: out of the store,
        and this process's copies closed."""
        for name, fd in self.stored.items():
            logger.info("fd store: releasing session %s", name)
            remove_fd(session_fdname(name))
            os.close(fd)
        self.stored.clear()


def _close_stored(stored: Sequence[StoredFd]) -> None:
    for item in stored:
        os.close(item.fd)


async def _run_locked(
    agent: Agent,
    task_status: anyio.abc.TaskStatus[Agent],
    stored: Sequence[StoredFd],
) -> None:
    from orchestrator.engine._engine import Engine, plugin_manager
    from orchestrator.engine._playbook import load_playbook

    socket_path, state_dir, kernel = agent.socket_path, agent.state_dir, agent.kernel

    def engine_for(playbook: Path) -> Engine:
        from orchestrator.engine._engine import check_playbook
        from orchestrator.errors import PlaybookError

        pm = plugin_manager(extra=[AgentPlugin(agent)])
        known = {name for name, _ in pm.list_name_plugin()}
        book = with_agent_steps(load_playbook(playbook, known_plugins=known))
        problems = check_playbook(pm, book)  # the plugins' options, as `plan` does
        if problems:
            raise PlaybookError(str(playbook), None, "; ".join(problems))
        return Engine(
            book,
            kernel,
            state_dir,
            pm=pm,
            owner="agent",  # after the kexec the agent, not the boot unit, restores
            parking=parking,
        )

    support = fd_store_support(await anyio.to_thread.run_sync(systemd_version))
    logger.info("fd store: %s", support.reason)
    parking = StoreParking(support, stored)
    if await _resume_own_update(state_dir, engine_for):
        # Whatever the resume needed of the stored sessions the keeper now
        # holds (or the update was cancelled): the store's copies go.
        await anyio.to_thread.run_sync(parking.release)
    await agent.adopt([s for s in stored if session_name(s.name) is None])
    await agent.save()

    async def run_update(engine: Engine) -> None:
        with anyio.CancelScope() as scope:  # POST /v1/cancel cancels it
            agent.update_scope = scope
            try:
                outcome = await engine.run()  # the kexec does not return
            except OrchestratorError as exc:
                logger.error("the update could not start: %s", exc)
            except Exception:  # the agent and its registrations outlive it
                logger.exception("the update failed")
            else:
                logger.warning("the update ended without a kexec: %s", outcome.value)
            finally:
                agent.frozen = agent.updating = False
                agent.update_scope = None

    from ._http import serve_control

    agent.engine_for = engine_for
    agent.start_update = run_update
    async with anyio.create_task_group() as tg:
        agent.task_group = tg
        await tg.start(agent.serve)
        await tg.start(serve_control, agent, control_socket_for(socket_path))
        task_status.started(agent)


async def _resume_own_update(
    state_dir: Path, engine_for: Callable[[Path], Engine]
) -> bool:
    """Finish (or cancel) the update this agent started before it stopped.

    Only the agent's own runs (``owner: agent``) are its to resume: the boot
    unit leaves them to it, and the keeper holds their sessions meanwhile. A
    resume that fails is logged and the agent serves on: the data stays with
    the keeper, and restarting the agent tries again.
    """
    import anyio.to_thread

    from orchestrator.restore._journal import read_journal, unfinished

    try:
        left = unfinished(await anyio.to_thread.run_sync(read_journal, state_dir))
    except OrchestratorError as exc:
        logger.error("cannot read the journal: %s", exc)
        return False
    if not left or left[0].get("owner") != "agent":
        return True
    try:
        engine = await anyio.to_thread.run_sync(
            engine_for, Path(str(left[0]["playbook"]))
        )
        outcome = await engine.resume()
    except OrchestratorError as exc:
        logger.error(
            "could not resume the interrupted update %s: %s; its data stays with "
            "the keeper: fix this and restart the agent",
            left[0]["run"],
            exc,
        )
        return False
    logger.info("resumed the interrupted update %s: %s", left[0]["run"], outcome.value)
    return True
