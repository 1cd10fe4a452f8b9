"""Helpers shared by the contract tests and their kexec stages (no pytest here)."""

from __future__ import annotations

import errno as E
import os
from typing import TYPE_CHECKING

from orchestrator.luo import _abi

if TYPE_CHECKING:
    from orchestrator.luo import Kernel


def raw_errno(kernel: Kernel, fd: int, request: int, arg: bytearray | None) -> int:
    """Issue a raw ioctl; the errno it failed with, or 0."""
    try:
        kernel.ioctl(fd, request, arg)
    except OSError as exc:
        return exc.errno or E.EIO
    return 0


def create_buf(
    name: bytes, size: int = _abi.SESSION_CREATE.size, tail: bytes = b""
) -> bytearray:
    """A CREATE_SESSION argument of *size* bytes, *tail* after the known struct."""
    buf = _abi.SESSION_CREATE.pack(size=size, name=name) + bytearray(tail)
    return buf.ljust(max(size, len(buf)), b"\0")


def tmpfs_dir() -> str | None:
    """A writable tmpfs directory (for 'linked tmpfs file' cases)."""
    with open("/proc/self/mounts") as mounts:
        kinds = {line.split()[1]: line.split()[2] for line in mounts}
    for path in ("/dev/shm", "/tmp", "/run"):
        if kinds.get(path) == "tmpfs" and os.access(path, os.W_OK):
            return path
    return None


PATTERN_SIZE = 3 * 1024 * 1024 + 17


def pattern(seed: int, size: int = PATTERN_SIZE) -> bytes:
    """Deterministic non-repeating-ish bytes for byte-for-byte checks."""
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(4093))
    return (block * (size // len(block) + 1))[:size]


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
