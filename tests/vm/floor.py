"""FLOOR client: the smallest possible LUO user, as a baseline.

Pure Python (fcntl.ioctl + struct + ctypes), nothing from the orchestrator:
it only uses the harness's guest helpers (marks) and kexec helper, both stdlib.

``python -m tests.vm.floor pre [--mib N]`` (first kernel):
    open /dev/liveupdate, CREATE_SESSION "floor", memfd of N MiB filled with a
    pattern, PRESERVE_FD token 1, kexec_file_load, reboot(KEXEC).
``python -m tests.vm.floor post`` (next kernel):
    open /dev/liveupdate, RETRIEVE_SESSION "floor", RETRIEVE_FD token 1,
    SESSION_FINISH, then check every byte against the pattern.

SESSION_FINISH is issued right after the retrieve, *before* the byte check, so
that the retrieve -> FINISH step is not inflated by the (slow, under TCG) check;
the fds retrieved before FINISH stay usable.  Timestamps (guest wall clock) go
to ``$LUO_VM_OUT/floor-<stage>.json``; each step is also a mark on the console.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import struct
import sys
import time
from array import array

from tests.vm import guest, kexec

DEV = "/dev/liveupdate"
SESSION = b"floor"
TOKEN = 1
PAGE = 4096
CHUNK = 1 << 20
PAGES_PER_CHUNK = CHUNK // PAGE


def _io(nr: int) -> int:
    """_IO(0xBA, nr): the merged ABI encodes no size in the request number."""
    return (0xBA << 8) | nr


LIVEUPDATE_IOCTL_CREATE_SESSION = _io(0x00)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = _io(0x01)
LIVEUPDATE_SESSION_PRESERVE_FD = _io(0x40)
LIVEUPDATE_SESSION_RETRIEVE_FD = _io(0x41)
LIVEUPDATE_SESSION_FINISH = _io(0x42)

SESSION_FMT = "<Ii64s"  # u32 size; s32 fd; u8 name[64]  -> 72 bytes
FD_FMT = "<IiQ"  # u32 size; s32 fd; u64 token            -> 16 bytes
FINISH_FMT = "<II"  # u32 size; u32 reserved               -> 8 bytes
assert struct.calcsize(SESSION_FMT) == 72
assert struct.calcsize(FD_FMT) == 16
assert struct.calcsize(FINISH_FMT) == 8


# --------------------------------------------------------------------------- ioctls


def _session_ioctl(dev_fd: int, request: int, name: bytes) -> int:
    buf = bytearray(struct.pack(SESSION_FMT, 72, -1, name))
    fcntl.ioctl(dev_fd, request, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


def create_session(dev_fd: int, name: bytes) -> int:
    return _session_ioctl(dev_fd, LIVEUPDATE_IOCTL_CREATE_SESSION, name)


def retrieve_session(dev_fd: int, name: bytes) -> int:
    return _session_ioctl(dev_fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name)


def preserve_fd(session_fd: int, fd: int, token: int) -> None:
    buf = bytearray(struct.pack(FD_FMT, 16, fd, token))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_PRESERVE_FD, buf)


def retrieve_fd(session_fd: int, token: int) -> int:
    buf = bytearray(struct.pack(FD_FMT, 16, -1, token))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_RETRIEVE_FD, buf)
    return int(struct.unpack_from("<i", buf, 4)[0])


def session_finish(session_fd: int) -> None:
    buf = bytearray(struct.pack(FINISH_FMT, 8, 0))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_FINISH, buf)


# --------------------------------------------------------------------------- pattern

_FILLER = b"".join(
    hashlib.sha256(b"luo-floor-%d" % i).digest() for i in range(PAGE // 32)
)[8:]  # 4088 bytes: each page = u64 page index + this filler


_BASE_CHUNK = bytes((b"\0" * 8 + _FILLER) * PAGES_PER_CHUNK)


def expected_chunk(index: int) -> bytearray:
    """Contents of the 1 MiB chunk ``index``: every page starts with its index."""
    first = index * PAGES_PER_CHUNK
    buf = bytearray(_BASE_CHUNK)
    # one strided store of the 256 page indices (u64, little endian on x86)
    memoryview(buf).cast("Q")[:: PAGE // 8] = array(
        "Q", range(first, first + PAGES_PER_CHUNK)
    )
    return buf


def _mismatches(got: bytes | bytearray, want: bytes | bytearray) -> tuple[int, int]:
    """(bytes, pages) that differ; only called on a chunk that differs."""
    nbytes = npages = 0
    for off in range(0, len(want), PAGE):
        a = got[off : off + PAGE]
        b = want[off : off + PAGE]
        if a != b:
            npages += 1
            nbytes += sum(1 for x, y in zip(a, b, strict=False) if x != y)
            nbytes += abs(len(a) - len(b))
    return nbytes, npages


# --------------------------------------------------------------------------- stages


def stage_pre(mib: int) -> int:
    t: dict[str, float] = {}
    out = guest.out_dir()
    t["pre_start"] = guest.mark("floor.pre_start", mib=mib)
    dev = os.open(DEV, os.O_RDWR)
    session = create_session(dev, SESSION)
    t["session_created"] = guest.mark("floor.session_created")

    memfd = os.memfd_create("floor", 0)
    for i in range(mib):
        os.write(memfd, expected_chunk(i))
    t["filled"] = guest.mark("floor.filled", mib=mib)

    preserve_fd(session, memfd, TOKEN)
    t["preserved"] = guest.mark("floor.preserved")

    kernel = kexec.default_kernel()
    cmdline = kexec.default_cmdline()
    t["kexec_load"] = guest.mark("floor.kexec_load")
    kexec.kexec_file_load(kernel, cmdline)
    t["kexec_loaded"] = guest.mark("floor.kexec_loaded")

    t["reboot"] = time.time()
    record = {
        "stage": "pre",
        "mib": mib,
        "size": mib * CHUNK,
        "session": SESSION.decode(),
        "token": TOKEN,
        "kernel": kernel,
        "cmdline": cmdline,
        "t": t,
    }
    guest.write_json(out / "floor-pre.json", record)
    guest.mark("floor.reboot")
    # The session and memfd fds stay open: the kexec happens inside this call.
    try:
        kexec.reboot_kexec()
    except kexec.KexecError as e:
        record["error"] = repr(e)
        guest.write_json(out / "floor-pre.json", record)
        print(f"floor: kexec failed: {e!r}", flush=True)
        return 1


def stage_post() -> int:
    t: dict[str, float] = {}
    out = guest.out_dir()
    t["post_start"] = guest.mark("floor.post_start")
    pre = _read_pre(out)
    raw_mib = pre.get("mib") if pre else None
    mib = raw_mib if isinstance(raw_mib, int) else 0
    dev = os.open(DEV, os.O_RDWR)
    t["opened"] = guest.mark("floor.opened")
    session = retrieve_session(dev, SESSION)
    t["session_retrieved"] = guest.mark("floor.session_retrieved")
    memfd = retrieve_fd(session, TOKEN)
    t["retrieved"] = guest.mark("floor.retrieved")
    session_finish(session)
    t["finished"] = guest.mark("floor.finished")

    size = os.fstat(memfd).st_size
    want_size = mib * CHUNK
    bad_bytes = bad_pages = 0
    for i in range(size // CHUNK if size == want_size else 0):
        want = expected_chunk(i)
        got = os.pread(memfd, CHUNK, i * CHUNK)
        if got != want:
            nb, np_ = _mismatches(got, want)
            bad_bytes += nb
            bad_pages += np_
    t["verified"] = guest.mark(
        "floor.verified", mismatched_bytes=bad_bytes, mismatched_pages=bad_pages
    )
    ok = size == want_size and bad_bytes == 0 and want_size > 0
    record = {
        "stage": "post",
        "mib": mib,
        "expected_size": want_size,
        "size": size,
        "mismatched_bytes": bad_bytes,
        "mismatched_pages": bad_pages,
        "verified_bytes": size if size == want_size else 0,
        "ok": ok,
        "t": t,
    }
    guest.write_json(out / "floor-post.json", record)
    print(
        f"floor: {'OK' if ok else 'FAIL'}: size {size} (expected {want_size}), "
        f"{bad_bytes} mismatched bytes in {bad_pages} pages",
        flush=True,
    )
    return 0 if ok else 1


def _read_pre(out: os.PathLike[str] | str) -> dict[str, object] | None:
    import json

    try:
        with open(os.path.join(out, "floor-pre.json")) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.floor")
    p.add_argument("stage", choices=["pre", "post"])
    p.add_argument("--mib", type=int, default=1024, help="memfd size (pre)")
    args = p.parse_args(argv)
    try:
        return stage_pre(args.mib) if args.stage == "pre" else stage_post()
    except OSError as e:
        guest.mark(f"floor.error.{args.stage}")
        print(f"floor {args.stage}: {e!r}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
