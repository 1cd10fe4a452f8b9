"""The agent's control API: HTTP/1.1 over a Unix socket, for automation.

    GET  /v1/status           the last update (as ``liveupdate status --json``)
                              plus the agent's registrations and whether it runs one
    POST /v1/updates          {"playbook": PATH}: start an update (202)
    POST /v1/cancel           cancel the running update (202; 409 if none)
    GET  /v1/report           the last update's timeline as a text table
    GET  /v1/registrations    what the agent holds

The socket (``control.sock`` beside the hand-over socket) is mode 0660 and
every peer is checked with SO_PEERCRED like the hand-over socket. There is no
TCP listener: remote automation reaches the host over SSH. Served with h11
(httpx's own HTTP/1.1 engine); the client side is httpx with a UDS transport.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import h11

from ._agent import _PEERCRED, AgentRefusal, Peer

if TYPE_CHECKING:
    from pathlib import Path

    from ._agent import Agent

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 16


class _Answer(Exception):
    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        self.status = status
        self.body = body


def _route(
    agent: Agent, method: str, target: str, body: bytes
) -> tuple[int, dict[str, Any] | str]:
    if (method, target) == ("GET", "/v1/status"):
        from ._status import summarize

        status = summarize(agent.state_dir).to_json()
        status["agent"] = {
            "updating": agent.updating,
            "registrations": len(agent.registrations),
        }
        return 200, status
    if (method, target) == ("GET", "/v1/registrations"):
        return 200, {"items": [r.public() for r in agent.registrations.values()]}
    if (method, target) == ("GET", "/v1/report"):
        from ._journal import read_journal
        from ._report import render_table
        from ._runs import read_runs

        runs = read_runs(read_journal(agent.state_dir))
        if not runs:
            raise _Answer(404, {"error": "no update has run here"})
        return 200, render_table(runs[-1])
    if (method, target) == ("POST", "/v1/updates"):
        try:
            request = json.loads(body or b"{}")
        except ValueError as exc:
            raise _Answer(400, {"error": f"the body is not JSON: {exc}"}) from exc
        if not isinstance(request, dict):
            raise _Answer(400, {"error": "the body must be a JSON object"})
        try:
            return 202, agent._run(request)
        except AgentRefusal as exc:
            raise _Answer(409, {"error": str(exc)}) from exc
    if (method, target) == ("POST", "/v1/cancel"):
        if agent.update_scope is None:
            raise _Answer(409, {"error": "no update is running"})
        agent.update_scope.cancel()
        return 202, {"ok": True, "cancelling": True}
    known = (
        "/v1/status",
        "/v1/updates",
        "/v1/cancel",
        "/v1/report",
        "/v1/registrations",
    )
    if target in known:
        raise _Answer(405, {"error": f"{method} is not allowed on {target}"})
    raise _Answer(404, {"error": f"no such resource {target}; try {', '.join(known)}"})


async def _respond(
    stream: anyio.abc.SocketStream,
    conn: h11.Connection,
    status: int,
    body: dict[str, Any] | str,
) -> None:
    if isinstance(body, str):
        data, kind = body.encode(), "text/plain; charset=utf-8"
    else:
        data, kind = json.dumps(body, indent=1).encode() + b"\n", "application/json"
    headers = [
        ("content-type", kind),
        ("content-length", str(len(data))),
        ("connection", "close"),
    ]
    for event in (
        h11.Response(status_code=status, headers=headers),
        h11.Data(data=data),
        h11.EndOfMessage(),
    ):
        out = conn.send(event)
        if out:
            await stream.send(out)


async def _connection(agent: Agent, stream: anyio.abc.SocketStream) -> None:
    async with stream:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        peer = Peer(
            *_PEERCRED.unpack(
                raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        )
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            with anyio.fail_after(30):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            conn.receive_data(await stream.receive(65536))
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            conn.receive_data(b"")
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            raise _Answer(413, {"error": "body too large"})
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            if request is None:
                return
            if not agent.allowed(peer):
                raise _Answer(
                    403, {"error": f"uid {peer.uid} gid {peer.gid} is not allowed"}
                )
            status, answer = _route(
                agent, request.method.decode(), request.target.decode(), body
            )
        except _Answer as exc:
            status, answer = exc.status, exc.body
        except h11.RemoteProtocolError as exc:
            status, answer = 400, {"error": f"bad HTTP: {exc}"}
        except TimeoutError:
            return
        try:
            await _respond(stream, conn, status, answer)
        except (anyio.BrokenResourceError, OSError, h11.LocalProtocolError):
            logger.info("control client pid %d went away before its answer", peer.pid)


async def serve_control(
    agent: Agent,
    path: Path,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on *path* until cancelled."""
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True, mode=0o750)
    await anyio.Path(path).unlink(missing_ok=True)
    listener = await anyio.create_unix_listener(path, mode=0o660)
    async with listener:
        task_status.started()
        await listener.serve(lambda stream: _connection(agent, stream))
