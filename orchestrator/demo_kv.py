"""A demo workload: an in-memory key-value store whose data lives in a memfd.

    python -m orchestrator.demo_kv --name kv0 --registry DIR --size-mib 128
    python -m orchestrator.demo_kv --name kv0 --registry DIR --memfd 3   # restored

On a fresh start it fills its memfd with seeded records and publishes
``DIR/kv0.json`` (pid, the memfd's fd number, size, SHA-256 of the data); the
orchestrator preserves that memfd through ``/proc/PID/fd/N``. Started with
``--memfd N`` it serves the data it is handed instead -- after the kexec, the
retrieved memfd -- at once, without hashing it first (``sha256`` is null). It answers ``PING``, ``SUM`` (SHA-256 of its data) and
``GET <i>`` on the Unix socket ``DIR/kv0.sock``. On a simulated kernel it
registers itself as a process that the kexec ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import socket
import sys
from pathlib import Path

RECORD = 4096


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
        conn, _ = server.accept()
        with conn:
            request = conn.recv(256).decode().strip()
            if request == "PING":
                reply = "PONG"
            elif request == "SUM":
                reply = checksum(view)
            elif request.startswith("GET "):
                i = int(request[4:])
                reply = view[i * RECORD : i * RECORD + 64].split(b"\0", 1)[0].hex()
            else:
                reply = "ERR unknown request"
            conn.sendall(reply.encode() + b"\n")


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
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo_kv")
    parser.add_argument("--name", required=True)
    parser.add_argument("--registry", required=True, type=Path)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument(
        "--memfd", type=int, default=None, help="serve this inherited memfd"
    )
    parser.add_argument(
        "--detach", action="store_true", help="print the pid, run in background"
    )
    args = parser.parse_args()
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
