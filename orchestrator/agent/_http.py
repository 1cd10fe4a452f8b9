"""The agent's control API: HTTP/1.1 over a Unix socket, for automation.

    GET  /v1/status           the last update (as ``liveupdate status --json``)
                              plus the agent's registrations and whether it runs one
    POST /v1/updates          {"playbook": PATH}: start an update (202)
    POST /v1/cancel           cancel the running update (202; 409 if none)
    GET  /v1/report           the last update's timeline as a text table
    GET  /v1/registrations    what the agent holds

The socket (``control.sock`` beside the hand-over socket) admits the same
peers as the hand-over socket, checked with SO_PEERCRED when they connect,
before a byte is read. One request per connection, its head and body bounded
and its arrival timed (:class:`~orchestrator.agent._guard.Limits`); the
journal is read in a worker thread, and a request that fails gets a 500
without touching any other. There is no TCP listener: remote automation
reaches the host over SSH. Requests are parsed with h11 (httpx's own HTTP/1.1
engine); the client side is httpx with a UDS transport.
"""

from __future__ import annotations

import http
import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import h11

from orchestrator.errors import AgentRefusal, BadRequestError

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


class _Answer(Exception):
    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        self.status = status
        self.body = body


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
        status = await anyio.to_thread.run_sync(_status, agent, limiter=agent.blocking)
        status["agent"] = {
            "updating": agent.updating,
            "registrations": len(agent.registrations),
        }
        return 200, status
    if (method, target) == ("GET", "/v1/registrations"):
        return 200, {"items": [r.public() for r in agent.registrations.values()]}
    if (method, target) == ("GET", "/v1/report"):
        table = await anyio.to_thread.run_sync(_report, agent, limiter=agent.blocking)
        if table is None:
            raise _Answer(404, {"error": "no update has run here"})
        return 200, table
    if (method, target) == ("POST", "/v1/updates"):
        try:
            request = decode_object(body or b"{}", agent.limits.max_depth)
        except BadRequestError as exc:
            raise _Answer(400, {"error": str(exc)}) from exc
        try:
            return 202, await agent.start_run(request)
        except AgentRefusal as exc:
            raise _Answer(409, {"error": str(exc)}) from exc
    if (method, target) == ("POST", "/v1/cancel"):
        if agent.update_scope is None:
            raise _Answer(409, {"error": "no update is running"})
        agent.update_scope.cancel()
        return 202, {"ok": True, "cancelling": True}
    if target in KNOWN:
        raise _Answer(405, {"error": f"{method} is not allowed on {target}"})
    raise _Answer(404, {"error": f"no such resource {target}; try {', '.join(KNOWN)}"})


def _response(status: int, body: dict[str, Any] | str) -> bytes:
    """A whole HTTP/1.1 response; written by hand so that it can also answer a
    request h11 refused to parse."""
    if isinstance(body, str):
        data, kind = body.encode(), "text/plain; charset=utf-8"
    else:
        data, kind = json.dumps(body, indent=1).encode() + b"\n", "application/json"
    phrase = http.HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {kind}\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


async def _read_request(
    agent: Agent, sock: socket.socket
) -> tuple[h11.Request, bytes] | None:
    """The request and its body, within the limits; ``None`` if the peer hung
    up before a whole request."""
    limits = agent.limits
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await receive_some(sock, 16384))
        elif isinstance(event, h11.Request):
            request = event
            if len(request.headers) > limits.max_headers:
                raise _Answer(431, {"error": f"more than {limits.max_headers} headers"})
            for name, value in request.headers:
                if name == b"content-length" and int(value) > limits.max_body:
                    raise _Answer(413, {"error": f"body over {limits.max_body} bytes"})
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limits.max_body:
                raise _Answer(413, {"error": f"body over {limits.max_body} bytes"})
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _connection(agent: Agent, sock: socket.socket, peer: Peer) -> None:
    """Serve one request of an allowed peer."""
    timeout = agent.limits.idle_timeout
    try:
        got = None
        with anyio.move_on_after(timeout) as arrival:
            got = await _read_request(agent, sock)
        if arrival.cancelled_caught:
            raise _Answer(408, {"error": f"no whole request within {timeout:.0f} s"})
        if got is None:
            return
        request, body = got
        status, answer = await _route(
            agent, request.method.decode(), request.target.decode(), body
        )
    except _Answer as exc:
        status, answer = exc.status, exc.body
    except h11.RemoteProtocolError as exc:
        status, answer = 400, {"error": f"bad HTTP: {exc}"}
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
