"""The agent's control API: HTTP/1.1 over a Unix socket, for automation.

    GET  /v1/status           the last update (as ``liveupdate status --json``)
                              plus the agent's registrations and whether it runs one
    POST /v1/updates          {"playbook": PATH}: start an update (202; 409 if
                              refused, with "code": "update_running" when the
                              refusal is that another update runs)
    POST /v1/cancel           cancel the running update (202; 409 if none)
    GET  /v1/report           the last update's timeline as a text table
    GET  /v1/registrations    what the agent holds

The socket (``control.sock`` beside the hand-over socket) admits the same
peers as the hand-over socket, checked with SO_PEERCRED when they connect,
before a byte is read. One request per connection, its head and body bounded
and its arrival timed (:class:`~orchestrator.agent._guard.Limits`); the
journal is read in a worker thread, and a request that fails gets a 500
without touching any other. There is no TCP listener: remote automation
reaches the host over SSH. Requests are parsed with h11 (:mod:`orchestrator._http`,
shared with ``liveupdate metrics serve``); the client side is httpx with a UDS
transport.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from orchestrator._http import read_request, response
from orchestrator.errors import (
    AgentRefusal,
    BadRequestError,
    HttpError,
    UpdateRunningError,
)

from ._guard import (
    decode_object,
    grant_access,
    listen_unix,
    receive_some,
    send_all,
    serve_listener,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ._guard import Peer
    from ._server import Agent

logger = logging.getLogger(__name__)

KNOWN = ("/v1/status", "/v1/updates", "/v1/cancel", "/v1/report", "/v1/registrations")


def _status(agent: Agent) -> dict[str, Any]:
    from orchestrator.observe._status import summarize

    return summarize(agent.state_dir).to_json()


def _report(agent: Agent) -> str | None:
    from orchestrator.observe._report import render_table
    from orchestrator.observe._runs import read_runs
    from orchestrator.restore._journal import read_journal

    runs = read_runs(read_journal(agent.state_dir))
    return render_table(runs[-1]) if runs else None


async def _route(
    agent: Agent, method: str, target: str, body: bytes
) -> tuple[int, dict[str, Any] | str]:
    if (method, target) == ("GET", "/v1/status"):
        # The flag before the journal: an update that ends while the journal is
        # read must not be reported as ended with the state it had mid-way.
        agent_view = {
            "updating": agent.updating,
            "registrations": len(agent.registrations),
        }
        status = await anyio.to_thread.run_sync(_status, agent, limiter=agent.blocking)
        status["agent"] = agent_view
        return 200, status
    if (method, target) == ("GET", "/v1/registrations"):
        return 200, {"items": [r.public() for r in agent.registrations.values()]}
    if (method, target) == ("GET", "/v1/report"):
        table = await anyio.to_thread.run_sync(_report, agent, limiter=agent.blocking)
        if table is None:
            raise HttpError(404, "no update has run here")
        return 200, table
    if (method, target) == ("POST", "/v1/updates"):
        try:
            request = decode_object(body or b"{}", agent.limits.max_depth)
        except BadRequestError as exc:
            raise HttpError(400, str(exc)) from exc
        try:
            return 202, await agent.start_run(request)
        except UpdateRunningError as exc:
            raise HttpError(409, str(exc), UpdateRunningError.code) from exc
        except AgentRefusal as exc:
            raise HttpError(409, str(exc)) from exc
    if (method, target) == ("POST", "/v1/cancel"):
        if agent.update_scope is None:
            raise HttpError(409, "no update is running")
        agent.update_scope.cancel()
        return 202, {"ok": True, "cancelling": True}
    if target in KNOWN:
        raise HttpError(405, f"{method} is not allowed on {target}")
    raise HttpError(404, f"no such resource {target}; try {', '.join(KNOWN)}")


def _response(status: int, body: dict[str, Any] | str) -> bytes:
    """A whole response: JSON, or text for the report."""
    if isinstance(body, str):
        return response(status, body.encode(), "text/plain; charset=utf-8")
    data = json.dumps(body, indent=1).encode() + b"\n"
    return response(status, data, "application/json")


async def _connection(agent: Agent, sock: socket.socket, peer: Peer) -> None:
    """Serve one request of an allowed peer."""
    timeout = agent.limits.idle_timeout
    try:
        limits = agent.limits
        request = None
        with anyio.move_on_after(timeout) as arrival:
            request = await read_request(
                lambda: receive_some(sock, 16384),
                max_head=limits.max_head,
                max_headers=limits.max_headers,
                max_body=limits.max_body,
            )
        if arrival.cancelled_caught:
            raise HttpError(408, f"no whole request within {timeout:.0f} s")
        if request is None:
            return
        status, answer = await _route(
            agent, request.method, request.target, request.body
        )
    except HttpError as exc:
        status, answer = exc.status, {"error": exc.problem}
        if exc.code is not None:
            answer["code"] = exc.code
    except (OSError, anyio.BrokenResourceError):
        logger.info("control client pid %d went away", peer.pid)
        return
    except Exception as exc:  # contained to this request
        logger.exception("control request of pid %d failed", peer.pid)
        status, answer = 500, {"error": f"internal error: {exc!r}"}
    try:
        with anyio.fail_after(timeout):
            await send_all(sock, _response(status, answer))
    except (OSError, TimeoutError):
        logger.info("control client pid %d went away before its answer", peer.pid)


async def serve_control(
    agent: Agent,
    path: Path,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on *path* until cancelled."""
    listener = listen_unix(path, socket.SOCK_STREAM, 64)
    try:
        grant_access(path, agent.allow_uids - {0}, agent.allow_gids)
        task_status.started()
        await serve_listener(
            listener,
            agent.slots,
            agent.allowed,
            lambda sock, peer: _connection(agent, sock, peer),
            lambda peer, why: _response(
                503 if why == "busy" else 403,
                {"error": agent.refusal_text(peer, why)},
            ),
            "control",
        )
    finally:
        listener.close()
