"""An async QMP client: QEMU's JSON monitor protocol over a Unix socket.

One JSON object a line. On connect QEMU sends a greeting (``{"QMP": ...}``);
the client answers with ``qmp_capabilities`` and may then send commands, each
with an ``id`` that QEMU echoes in its reply. Asynchronous events
(``{"event": ...}``) may arrive between replies at any time; they are logged
and skipped. A QMP socket serves one client at a time: a second client is
accepted by the kernel but gets no greeting until the first disconnects, so
hold a connection only for as long as a hook needs it.

Errors are translated here, once: QMP ``error`` replies become
:class:`QmpCommandError`, deadlines :class:`QmpTimeoutError`, and socket
failures :class:`QmpConnectionError`; no ``OSError`` leaves this module.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.errors import (
    QmpCommandError,
    QmpConnectionError,
    QmpError,
    QmpTimeoutError,
)

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator, Collection, Iterator

    from anyio.abc import UNIXSocketStream

logger = logging.getLogger(__name__)

MAX_LINE = 16 << 20
"""Longest reply accepted (``human-monitor-command`` dumps can be large)."""
DEFAULT_TIMEOUT = 10.0
"""Seconds for connecting, the greeting, and each command unless told otherwise."""


@final
class QmpClient:
    """A QMP session on one connected socket; made by :func:`open_qmp`.

    Commands run one at a time (a lock serializes concurrent callers).

    :ivar version: QEMU's ``(major, minor, micro)`` from the greeting.
    """

    def __init__(
        self, stream: UNIXSocketStream, path: str, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._path = path
        self._timeout = timeout
        self._lock = anyio.Lock()
        self._next_id = 0
        self.version: tuple[int, int, int] = (0, 0, 0)

    @property
    def path(self) -> str:
        return self._path

    @contextmanager
    def _translate(self, command: str | None) -> Iterator[None]:
        try:
            yield
        except QmpError:
            raise
        except TimeoutError as exc:
            problem = (
                "no reply"
                if command
                else "no greeting (QEMU busy, or another QMP client connected)"
            )
            raise QmpTimeoutError(self._path, command, problem) from exc
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise QmpConnectionError(
                self._path, command, "QEMU closed the connection"
            ) from exc
        except anyio.IncompleteRead as exc:
            raise QmpConnectionError(
                self._path, command, "QEMU closed the connection mid-reply"
            ) from exc
        except anyio.DelimiterNotFound as exc:
            raise QmpError(
                self._path, command, f"reply longer than {MAX_LINE} bytes"
            ) from exc
        except OSError as exc:
            raise QmpConnectionError(
                self._path, command, exc.strerror or str(exc)
            ) from exc

    async def _receive(self) -> dict[str, Any]:
        line = await self._reader.receive_until(b"\n", MAX_LINE)
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(self._path, None, f"not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise QmpError(self._path, None, f"not a JSON object: {line[:200]!r}")
        return message

    async def _handshake(self) -> None:
        with self._translate(None), anyio.fail_after(self._timeout):
            greeting = await self._receive()
        if "QMP" not in greeting:
            raise QmpError(self._path, None, f"unexpected greeting {greeting!r}")
        qemu = greeting["QMP"].get("version", {}).get("qemu", {})
        self.version = (
            int(qemu.get("major", 0)),
            int(qemu.get("minor", 0)),
            int(qemu.get("micro", 0)),
        )
        await self.execute("qmp_capabilities")

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        fds: Collection[int] = (),
        reply_timeout: float | None = None,
    ) -> Any:
        """Run *command* and return its ``return`` value.

        Cancellation or the deadline may leave the reply unread; the next
        command skips it (replies are matched by ``id``).

        :param arguments: the command's arguments.
        :param fds: file descriptors sent with the command (``SCM_RIGHTS``),
            e.g. for ``getfd``.
        :param reply_timeout: seconds to wait for the reply (default: the client's).
        :raises QmpCommandError: QEMU answered with an error.
        :raises QmpTimeoutError: no reply in time.
        :raises QmpConnectionError: the connection broke.
        """
        self._next_id += 1
        ident = f"lu-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        async with self._lock:
            with (
                self._translate(command),
                anyio.fail_after(
                    self._timeout if reply_timeout is None else reply_timeout
                ),
            ):
                if fds:
                    await self._stream.send_fds(data, fds)
                else:
                    await self._stream.send(data)
                while True:
                    reply = await self._receive()
                    if "event" in reply:
                        logger.debug("QMP event on %s: %s", self._path, reply["event"])
                        continue
                    if reply.get("id") != ident:
                        logger.debug("QMP stale reply on %s: %s", self._path, reply)
                        continue
                    break
        if "error" in reply:
            error = reply["error"]
            raise QmpCommandError(
                self._path,
                command,
                str(error.get("class", "?")),
                str(error.get("desc", "")),
            )
        return reply.get("return")

    async def hmp(
        self, command_line: str, *, reply_timeout: float | None = None
    ) -> str:
        """Run a human monitor command (e.g. ``xp``) and return its output."""
        out = await self.execute(
            "human-monitor-command",
            {"command-line": command_line},
            reply_timeout=reply_timeout,
        )
        return str(out)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()


@asynccontextmanager
async def open_qmp(
    path: str | os.PathLike[str], *, command_timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[QmpClient]:
    """Connect to the QMP socket at *path* and negotiate capabilities.

    :param command_timeout: seconds for the connection and the greeting, and
        the default for each command.
    :raises QmpConnectionError: nothing listens at *path*.
    :raises QmpTimeoutError: no greeting in time (e.g. another client holds
        the monitor).
    """
    where = str(path)
    try:
        with anyio.fail_after(command_timeout):
            stream = await anyio.connect_unix(where)
    except TimeoutError as exc:
        raise QmpTimeoutError(where, None, "connect timed out") from exc
    except OSError as exc:
        raise QmpConnectionError(where, None, exc.strerror or str(exc)) from exc
    client = QmpClient(stream, where, command_timeout)
    try:
        await client._handshake()
        yield client
    finally:
        await client.aclose()
