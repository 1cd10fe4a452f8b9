"""Real Prometheus servers started by the tests: loopback, free ports, temp dirs.

The binaries come from Debian's packages ``prometheus`` (also ``promtool``),
``prometheus-pushgateway`` and ``prometheus-node-exporter``; a test that
needs a missing one is skipped and says which package to install. Readiness
and results are polled with generous deadlines, never timed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

DEADLINE = 180.0
PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-pushgateway": "prometheus-pushgateway",
    "prometheus-node-exporter": "prometheus-node-exporter",
}


def need(binary: str) -> str:
    """The path of *binary*, or skip the test naming the apt package."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(
            f"{binary} is not installed (apt-get install -y {PACKAGES[binary]})"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    what: str,
    check: Callable[[], Any],
    deadline: float = DEADLINE,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> Any:
    """Poll *check* until it returns something true; fail after *deadline*
    seconds (or as soon as *proc* exits), showing the end of *log*."""
    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what}: not ready (last: {last!r})\n{tail}")


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(self.url + path, params=params, timeout=30)


@contextlib.contextmanager
def running(
    name: str, argv: list[str], url: str, ready_path: str, log: Path
) -> Iterator[Server]:
    """Start *argv*, wait until GET *url* + *ready_path* answers 200, stop it after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(name, url, proc, log)
    try:
        wait_for(
            f"{name} ({url})",
            lambda: server.get(ready_path).status_code == 200,
            proc=proc,
            log=log,
        )
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def query(prometheus: Server, expr: str) -> list[dict[str, Any]]:
    """The result of an instant PromQL query (HTTP API)."""
    reply = prometheus.get("/api/v1/query", query=expr)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result
