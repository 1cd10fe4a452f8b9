"""A host service that keeps its state the systemd way (runs inside the VM).

The ``systemd`` scenario's stand-in for a service that is not the project's:
it keeps a memfd in its own fd store, and its unit sets
``FileDescriptorStorePreserve=yes``, so that systemd >= 261 itself carries
the memfd across ``systemctl kexec`` (its own LUO session, ``systemd``),
beside the project's sessions on the same single-opener device.

Started without a stored fd it fills a memfd with a pattern, stores it
(``FDSTORE=1``, ``FDNAME=state``) and writes the pattern's SHA-256 to
``<dir>/stored.json``; started with one (``$LISTEN_FDS``) it hashes what came
back into ``<dir>/found.json``. Either way it says ``READY=1`` and sleeps.
Standard library only: ``python3 fdkeep_service.py DIR MIB``.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

FDNAME = "state"


def notify(message: str, fds: list[int] | None = None) -> None:
    path = os.environ["NOTIFY_SOCKET"]
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds or []))]
        sock.sendmsg([message.encode()], rights if fds else [], 0, address)


def sha256_of(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest(), offset


def main(argv: list[str]) -> int:
    out, mib = Path(argv[0]), int(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    passed = []
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        passed = [
            (3 + i, n) for i, n in enumerate(names[: int(os.environ["LISTEN_FDS"])])
        ]
    mine = [fd for fd, name in passed if name == FDNAME]
    if mine:
        sha, size = sha256_of(mine[0])
        (out / "found.json").write_text(
            json.dumps({"sha256": sha, "size": size, "names": [n for _, n in passed]})
        )
    else:
        fd = os.memfd_create("fdkeep-state", os.MFD_CLOEXEC)
        block = os.urandom(1 << 20)
        for _ in range(mib):
            os.write(fd, block)
        sha, size = sha256_of(fd)
        notify(f"FDSTORE=1\nFDNAME={FDNAME}", [fd])
        os.close(fd)  # systemd's copy is the only one now
        (out / "stored.json").write_text(json.dumps({"sha256": sha, "size": size}))
    notify("READY=1")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
