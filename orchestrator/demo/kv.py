"""A demo workload: an in-memory key-value store whose data lives in a memfd.

    python -m orchestrator.demo.kv --name kv0 --registry DIR --size-mib 128
    python -m orchestrator.demo.kv --name kv0 --registry DIR --memfd 3   # restored
    python -m orchestrator.demo.kv --registry DIR --stop   # stop DIR's stores

On a fresh start it fills its memfd with seeded records and publishes
``DIR/kv0.json`` (pid, the memfd's fd number, size, SHA-256 of the data); the
orchestrator preserves that memfd through ``/proc/PID/fd/N``. Started with
``--memfd N`` it serves the data it is handed instead -- after the kexec, the
retrieved memfd -- at once, without hashing it first (``sha256`` is null). It answers ``PING``, ``SUM`` (SHA-256 of its data) and
``GET <i>`` on the Unix socket ``DIR/kv0.sock``, to clients of its own user
(or root), one line of at most 256 bytes each, within 5 s: a client that
breaks these rules loses its request, the store goes on. On a simulated
kernel it registers itself as a process that the kexec ends.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

RECORD = 4096
MAX_REQUEST = 256
CLIENT_TIMEOUT = 5.0
"""Seconds a client has to send its request and take the answer."""


def fill(fd: int, size: int, seed: str) -> None:
    os.ftruncate(fd, size)
    block = hashlib.sha256(seed.encode()).digest() * (RECORD // 32)
    chunk = block * 256
    for offset in range(0, size, len(chunk)):
        os.pwrite(fd, chunk[: size - offset], offset)
    for i in range(0, size // RECORD, 97):  # make records differ
        os.pwrite(fd, f"{seed}:{i}".encode(), i * RECORD)


def checksum(view: mmap.mmap) -> str:
    return hashlib.sha256(view).hexdigest()


def serve(name: str, registry: Path, size: int, memfd: int | None) -> None:
    fresh = memfd is None
    if memfd is None:
        memfd = os.memfd_create(f"kv-{name}", 0)
        fill(memfd, size, name)
    size = os.fstat(memfd).st_size
    view = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    spec = os.environ.get("LIVEUPDATE_KERNEL", "")
    if spec.startswith("sim:"):
        from orchestrator.luo.sim import SimKernel

        SimKernel(Path(spec[4:])).join()
    sock_path = registry / f"{name}.sock"
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(8)
    info = {
        "name": name,
        "pid": os.getpid(),
        "fd": memfd,
        "size": size,
        # Fresh data: its checksum is what must come back. Restored data is
        # served at once (the blackout ends when the store serves again) and
        # checked afterwards, on request (SUM).
        "sha256": checksum(view) if fresh else None,
        "socket": str(sock_path),
    }
    tmp = registry / f".{name}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, registry / f"{name}.json")
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # e.g. out of fds, or the client gave up: try again
            time.sleep(0.01)
            continue
        with conn:
            _answer(conn, view)


def _answer(conn: socket.socket, view: mmap.mmap) -> None:
    """Answer one client. Whatever it does -- sends garbage, nothing, or goes
    away -- fails this request only: the store keeps serving the others."""
    creds = conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.getuid()):
        return  # not who may read this data: nothing is parsed
    conn.settimeout(CLIENT_TIMEOUT)  # a silent client cannot hold the store
    try:
        request = _read_line(conn)
        reply = _reply(request, view) if request is not None else "ERR too long"
        conn.sendall(reply.encode() + b"\n")
    except (OSError, UnicodeDecodeError):
        pass  # timed out, reset, or not text: that client's loss only


def _read_line(conn: socket.socket) -> str | None:
    """One request line of at most :data:`MAX_REQUEST` bytes, or None."""
    data = b""
    while b"\n" not in data:
        part = conn.recv(MAX_REQUEST)
        if not part:
            break
        data += part
        if len(data) > MAX_REQUEST:
            return None
    return data.split(b"\n", 1)[0].decode().strip()


def _reply(request: str, view: mmap.mmap) -> str:
    if request == "PING":
        return "PONG"
    if request == "SUM":
        return checksum(view)
    if request.startswith("GET "):
        arg = request[4:].strip()
        if not arg.isdigit() or int(arg) >= len(view) // RECORD:
            return f"ERR no record {arg[:32]!r}"
        i = int(arg)
        return view[i * RECORD : i * RECORD + 64].split(b"\0", 1)[0].hex()
    return "ERR unknown request"


def running(registry: Path) -> dict[str, int]:
    """The stores registered in *registry* whose process still runs: name -> pid.

    A pid counts only if its command line is a store of this registry (the pid
    may have been reused since).
    """
    found = {}
    for entry in sorted(registry.glob("*.json")):
        try:
            info = json.loads(entry.read_text())
            pid = int(info["pid"])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if b"orchestrator.demo.kv" in argv and str(registry).encode() in argv:
            found[str(info.get("name", entry.stem))] = pid
    return found


def stop(registry: Path, timeout: float = 10.0) -> list[str]:
    """Stop every store running from *registry* (SIGTERM, after a SIGCONT in
    case it was left frozen); the names of those stopped."""
    stores = running(registry)
    for pid in stores.values():
        for sig in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while running(registry) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in running(registry).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(stores)


def ask(sock_path: str, request: str, timeout: float = 30.0) -> str:
    """One request to a running store."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(sock_path)
        conn.sendall(request.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            part = conn.recv(4096)
            if not part:
                break
            data += part
    return data.decode().strip()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo.kv")
    parser.add_argument("--name")
    parser.add_argument("--registry", required=True, type=Path)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument(
        "--memfd", type=int, default=None, help="serve this inherited memfd"
    )
    parser.add_argument(
        "--detach", action="store_true", help="print the pid, run in background"
    )
    parser.add_argument(
        "--stop",
        action="store_true",
        help="stop every store running from --registry, and exit",
    )
    args = parser.parse_args()
    if args.stop:
        for name in stop(args.registry):
            sys.stdout.write(f"stopped {name}\n")
        return 0
    if not args.name:
        parser.error("--name is required (unless --stop)")
    args.registry.mkdir(parents=True, exist_ok=True)
    if args.detach:
        pid = os.fork()
        if pid:
            sys.stdout.write(f"{pid}\n")
            sys.stdout.flush()
            os._exit(0)
        os.setsid()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    serve(args.name, args.registry, args.size_mib << 20, args.memfd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
