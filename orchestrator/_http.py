"""The HTTP/1.1 server side of both our servers: one request, one response.

The agent's control API (a Unix socket) and ``liveupdate metrics serve`` (TCP)
each read one request per connection, answer it and close. h11 (httpx's own
HTTP/1.1 engine) parses the request, within limits on its head, its headers
and its body; the response is one head and one body, written here so that a
request h11 refused to parse can still be answered.
"""

from __future__ import annotations

import http
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from orchestrator.errors import HttpError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    body: bytes


async def read_request(
    receive: Callable[[], Awaitable[bytes]],
    *,
    max_head: int,
    max_headers: int,
    max_body: int,
) -> Request | None:
    """The request and its body, within the limits; ``None`` if the peer hung
    up before a whole request.

    :param receive: the next bytes from the peer, ``b""`` at the end.
    :raises HttpError: 400 (not HTTP), 413 (body too large), 431 (too many
        headers).
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(400, f"bad HTTP: {exc}") from exc
        if event is h11.NEED_DATA:
            conn.receive_data(await receive())
        elif isinstance(event, h11.Request):
            request = event
            if len(request.headers) > max_headers:
                raise HttpError(431, f"more than {max_headers} headers")
            for name, value in request.headers:
                if name == b"content-length" and int(value) > max_body:
                    raise HttpError(413, f"body over {max_body} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise HttpError(413, f"body over {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return Request(
                request.method.decode(), request.target.decode(), bytes(body)
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


def response(
    status: int, data: bytes, content_type: str, *, head: bool = False
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (only its head
    when answering a HEAD request)."""
    phrase = http.HTTPStatus(status).phrase
    start = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return start if head else start + data
