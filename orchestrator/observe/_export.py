"""Getting the metrics to Prometheus: textfile, Pushgateway, HTTP endpoint.

- :func:`write_textfile` -- for node-exporter's textfile collector: the last
  run's metrics, written atomically (a temporary file in the same directory,
  fsync'd, renamed over the target; no timestamps);
- :func:`push` -- to a Pushgateway, grouping key ``job=liveupdate,
  instance=<hostname>``: each run replaces the host's group (PUT);
- :func:`serve_metrics` -- ``/metrics`` of a long-running process, read
  from the whole journal at each scrape (when it changed).

:func:`export_from_env` runs the first two after ``liveupdate run`` or
``resume`` has finished (``LIVEUPDATE_TEXTFILE``, ``LIVEUPDATE_PUSHGATEWAY``):
never inside the blackout, and this stack is never imported on the restore
path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client import generate_latest
from prometheus_client.exposition import push_to_gateway
from prometheus_client.registry import CollectorRegistry

from orchestrator._http import read_request, response
from orchestrator.errors import HttpError, MetricsExportError

from ._metrics import register_metrics

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from orchestrator._http import Request

logger = logging.getLogger(__name__)

JOB = "liveupdate"
PUSH_TIMEOUT = 10.0
ENV_TEXTFILE = "LIVEUPDATE_TEXTFILE"
ENV_PUSHGATEWAY = "LIVEUPDATE_PUSHGATEWAY"
_MAX_REQUEST = 16384
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text format ``generate_latest`` writes, named as every Prometheus 2.x
knows it (newer prometheus_client names it ``version=1.0.0``)."""


@contextlib.contextmanager
def _translated(target: str) -> Iterator[None]:
    """The boundary: OS and network errors become :class:`MetricsExportError`."""
    try:
        yield
    except OSError as exc:
        raise MetricsExportError(target, exc.strerror or str(exc)) from exc


def last_run_registry(state_dir: Path | str) -> CollectorRegistry:
    """A fresh registry with the metrics of the journal's last run."""
    registry = CollectorRegistry(auto_describe=False)
    register_metrics(registry, state_dir, history=False)
    return registry


def write_textfile(state_dir: Path | str, output: Path | str) -> None:
    """Write the last run's metrics to *output* for node-exporter, atomically.

    :raises MetricsExportError: the directory is missing or not writable.
    """
    data = generate_latest(last_run_registry(state_dir))
    output = os.fspath(output)
    directory = os.path.dirname(os.path.abspath(output))
    with _translated(output):
        # node-exporter reads only *.prom: the temporary file is never half-read.
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(output)}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.replace(tmp, output)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def push(
    state_dir: Path | str,
    gateway: str,
    instance: str | None = None,
    timeout: float = PUSH_TIMEOUT,
) -> None:
    """Push the last run's metrics to the Pushgateway at *gateway*, replacing
    the group ``job=liveupdate, instance=<instance or hostname>``.

    :raises MetricsExportError: the Pushgateway is unreachable or refused.
    """
    with _translated(gateway):
        push_to_gateway(
            gateway,
            job=JOB,
            registry=last_run_registry(state_dir),
            grouping_key={"instance": instance or socket.gethostname()},
            timeout=timeout,
        )


def export_from_env(state_dir: Path | str) -> tuple[list[str], list[str]]:
    """Export the last run as ``LIVEUPDATE_TEXTFILE`` (a path) and
    ``LIVEUPDATE_PUSHGATEWAY`` (a URL) say; unset or empty means not that way.

    Both are attempted; a failure of one is returned, not raised: the update
    itself is over and its outcome stands.

    :return: what was done, and what failed, one line each.
    """
    done: list[str] = []
    failed: list[str] = []
    textfile = os.environ.get(ENV_TEXTFILE)
    gateway = os.environ.get(ENV_PUSHGATEWAY)
    if textfile:
        try:
            write_textfile(state_dir, textfile)
            done.append(f"metrics written to {textfile}")
        except MetricsExportError as exc:
            failed.append(str(exc))
    if gateway:
        try:
            push(state_dir, gateway)
            done.append(f"metrics pushed to {gateway}")
        except MetricsExportError as exc:
            failed.append(str(exc))
    return done, failed


# --- the HTTP endpoint --------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair.

    :raises MetricsExportError: not of that form.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise MetricsExportError(listen, "expected HOST:PORT, e.g. 127.0.0.1:9731")
    return host.strip("[]"), int(port)


async def _answer(registry: CollectorRegistry, request: Request) -> bytes:
    head = request.method == "HEAD"
    path = request.target.split("?", 1)[0]
    if request.method not in ("GET", "HEAD"):
        return response(405, b"", "text/plain", head=head)
    if path == "/metrics":
        body = await anyio.to_thread.run_sync(generate_latest, registry)
        return response(200, body, CONTENT_TYPE, head=head)
    if path == "/":
        page = b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
        return response(200, page, "text/html", head=head)
    return response(404, b"not found\n", "text/plain", head=head)


async def _handle(registry: CollectorRegistry, stream: anyio.abc.ByteStream) -> None:
    async def receive() -> bytes:
        try:
            return await stream.receive()
        except anyio.EndOfStream:
            return b""

    async with stream:
        try:
            request = None
            with anyio.move_on_after(10) as arrival:
                request = await read_request(
                    receive,
                    max_head=_MAX_REQUEST,
                    max_headers=_MAX_REQUEST,
                    max_body=_MAX_REQUEST,
                )
            if arrival.cancelled_caught:
                raise HttpError(408, "no whole request within 10 s")
            if request is None:
                return
            answer = await _answer(registry, request)
        except HttpError as exc:
            answer = response(exc.status, f"{exc.problem}\n".encode(), "text/plain")
        await stream.send(answer)


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` of *registry* over HTTP on *host*:*port* until cancelled.

    Start it with ``await tg.start(serve_metrics, ...)``: it reports the port
    it listens on (useful with port 0) once it accepts connections. Requests
    are parsed as the agent's are (:mod:`orchestrator._http`, h11). Each
    scrape collects in a worker thread (the journal is read from disk); a
    client has 10 s to send its request.

    :raises MetricsExportError: the address cannot be bound.
    """
    with _translated(f"{host}:{port}"):
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        logger.info("serving metrics on http://%s:%d/metrics", host, bound)
        task_status.started(bound)

        async def handler(stream: anyio.abc.SocketStream) -> None:
            try:
                await _handle(registry, stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                logger.debug("a scrape connection broke", exc_info=True)

        await listener.serve(handler)
