"""Guest-side helpers shared by the VM init and the stage commands.

Runs *inside* the VM (stdlib only).  The init exports, for every stage command:

``LUO_VM_OUT``          the writable 9p share (host: the scenario's out dir)
``LUO_VM_STAGE``        the stage being run (``pre``, ``post``, ...)
``LUO_VM_BOOT``         1 for the first kernel, 2 after the first kexec, ...
``LUO_VM_KERNEL``       host path of the bzImage (reachable through the 9p root)
``LUO_VM_NEXT_CMDLINE`` the command line to kexec into (runs the next stage)

A *mark* is a named timestamp: it is written to ``/dev/kmsg`` (so it shows up on
the serial console, where the host timestamps it on arrival) and appended to
``$LUO_VM_OUT/marks.jsonl`` together with the guest's wall clock.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MARK_PREFIX = "luo-vm: mark"
DEFAULT_OUT = "/run/luo-vm/out"


def out_dir() -> Path:
    return Path(os.environ.get("LUO_VM_OUT", DEFAULT_OUT))


def boot_index() -> int:
    try:
        return int(os.environ.get("LUO_VM_BOOT", "0"))
    except ValueError:
        return 0


def stage_name() -> str:
    return os.environ.get("LUO_VM_STAGE", "")


def write_json(path: Path, data: object) -> None:
    """Write JSON durably (the guest may kexec or reset right after)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def kmsg(text: str, level: int = 5) -> None:
    """Write one line to the kernel log (and so to the serial console)."""
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"<{level}>{text}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def mark(name: str, **extra: object) -> float:
    """Record a named timestamp; returns the guest wall clock (time.time())."""
    wall = time.time()
    boot = boot_index()
    kmsg(f"{MARK_PREFIX} boot={boot} name={name} wall={wall:.6f}")
    rec: dict[str, object] = {
        "boot": boot,
        "name": name,
        "wall": wall,
        "mono": time.monotonic(),
        "stage": stage_name(),
        "pid": os.getpid(),
        **extra,
    }
    try:
        fd = os.open(
            out_dir() / "marks.jsonl",
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o644,
        )
    except OSError:
        return wall
    try:
        os.write(fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return wall
