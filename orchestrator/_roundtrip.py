"""A preserve → kexec → retrieve round trip on a kernel, in two processes.

The first process fills a memfd, preserves it in a session and jumps into the
next kernel (on the simulated kernel that ends the process, as a kexec
would); the second retrieves it in the "new kernel", checks every byte and
FINISHes. ``liveupdate demo`` and the contract tests use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .luo import LiveUpdateDevice, kernel_from_spec

CHUNK = 1 << 20


def _fill(fd: int, size: int, seed: bytes) -> str:
    """Write *size* bytes of a seeded pattern; return its SHA-256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (CHUNK // 32)
    os.ftruncate(fd, size)
    for offset in range(0, size, CHUNK):
        part = block[: min(CHUNK, size - offset)]
        os.pwrite(fd, part, offset)
        digest.update(part)
    return digest.hexdigest()


def sha256_fd(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(os.pread(fd, min(CHUNK, size - offset), offset))
    return digest.hexdigest()


def before(spec: str, session: str, size: int, record: Path, next_kernel: Path) -> None:
    """Preserve a filled memfd, load the next kernel and kexec (never returns)."""
    kernel = kernel_from_spec(spec)
    fd = os.memfd_create("roundtrip", os.MFD_CLOEXEC)
    checksum = _fill(fd, size, session.encode())
    with LiveUpdateDevice.open(kernel) as dev:
        sess = dev.create_session(session)
    t0 = time.monotonic()
    sess.preserve_fd(fd, 1)
    preserve_s = time.monotonic() - t0
    kernel.kexec_load(next_kernel, None, kernel.cmdline())
    record.write_text(
        json.dumps(
            {
                "sha256": checksum,
                "size": size,
                "preserve_s": preserve_s,
                "kexec_at": time.time(),
                "boot_id": kernel.boot_id(),
            }
        )
    )
    kernel.reboot_kexec()


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """What came back after the kexec."""

    sha256: str
    size: int
    preserve_s: float
    retrieve_s: float
    blackout_s: float
    boot_id: str
    new_boot_id: str
    intact: bool


def after(spec: str, session: str, record: Path) -> RoundTrip:
    """Retrieve and verify the memfd in the new kernel; FINISH the session."""
    kernel = kernel_from_spec(spec)
    rec = json.loads(record.read_text())
    t0 = time.monotonic()
    with LiveUpdateDevice.open(kernel) as dev, dev.retrieve_session(session) as sess:
        with sess.retrieve_fd(1) as fd:
            retrieve_s = time.monotonic() - t0
            checksum = sha256_fd(fd.fileno(), int(rec["size"]))
            size = os.fstat(fd.fileno()).st_size
        sess.finish()
    return RoundTrip(
        sha256=rec["sha256"],
        size=rec["size"],
        preserve_s=rec["preserve_s"],
        retrieve_s=retrieve_s,
        blackout_s=time.time() - float(rec["kexec_at"]),
        boot_id=rec["boot_id"],
        new_boot_id=kernel.boot_id(),
        intact=checksum == rec["sha256"] and size == rec["size"],
    )


if __name__ == "__main__":
    # python -m orchestrator._roundtrip SPEC SESSION SIZE RECORD NEXT_KERNEL
    before(
        sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    )
