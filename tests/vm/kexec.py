"""Minimal kexec for stage commands inside the VM: kexec_file_load + reboot.

Stdlib only (ctypes), x86_64 only.  Kept separate on purpose: the lead will
later route this through ``orchestrator.luo``'s kexec API.  LUO requires the
file-based loader (KHO data is attached by ``kexec_file_load``), and the live
update itself happens inside ``reboot(LINUX_REBOOT_CMD_KEXEC)``: that is where
LUO serializes the sessions; if a file cannot be frozen the syscall *returns*
with an error and the old kernel keeps running.
"""

from __future__ import annotations

import ctypes
import os
from typing import NoReturn

SYS_KEXEC_FILE_LOAD = 320  # x86_64
SYS_REBOOT = 169  # x86_64
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_KEXEC = 0x45584543


class KexecError(OSError):
    """kexec_file_load or reboot(KEXEC) failed."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def kexec_file_load(
    kernel: str | os.PathLike[str],
    cmdline: str,
    initrd: str | os.PathLike[str] | None = None,
) -> None:
    """Load ``kernel`` (a bzImage) as the kexec target with ``cmdline``."""
    raw = cmdline.encode()
    flags = 0 if initrd is not None else KEXEC_FILE_NO_INITRAMFS
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC) if initrd is not None else -1
    try:
        buf = ctypes.create_string_buffer(raw)  # NUL-terminated
        rc = _libc().syscall(
            ctypes.c_long(SYS_KEXEC_FILE_LOAD),
            ctypes.c_int(kfd),
            ctypes.c_int(ifd),
            ctypes.c_ulong(len(raw) + 1),  # the length includes the NUL
            buf,
            ctypes.c_ulong(flags),
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise KexecError(err, f"kexec_file_load: {os.strerror(err)}", str(kernel))
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def kexec_unload() -> None:
    """Drop a loaded kexec image (cancels a prepared kexec)."""
    rc = _libc().syscall(
        ctypes.c_long(SYS_KEXEC_FILE_LOAD),
        ctypes.c_int(-1),
        ctypes.c_int(-1),
        ctypes.c_ulong(0),
        ctypes.c_char_p(None),
        ctypes.c_ulong(KEXEC_FILE_UNLOAD),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise KexecError(err, f"kexec_file_load(UNLOAD): {os.strerror(err)}")


def reboot_kexec() -> NoReturn:
    """reboot(MAGIC1, MAGIC2, LINUX_REBOOT_CMD_KEXEC): jump into the loaded image.

    Returns only on failure (e.g. LUO could not freeze a preserved file), as
    :class:`KexecError`.
    """
    os.sync()
    rc = _libc().syscall(
        ctypes.c_long(SYS_REBOOT),
        ctypes.c_uint(LINUX_REBOOT_MAGIC1),
        ctypes.c_uint(LINUX_REBOOT_MAGIC2),
        ctypes.c_uint(LINUX_REBOOT_CMD_KEXEC),
        ctypes.c_void_p(None),
    )
    err = ctypes.get_errno()
    raise KexecError(err, f"reboot(KEXEC) returned {rc}: {os.strerror(err)}")


def default_kernel() -> str:
    """The bzImage the harness booted (``LUO_VM_KERNEL``)."""
    return os.environ["LUO_VM_KERNEL"]


def default_cmdline() -> str:
    """The command line of the next stage (``LUO_VM_NEXT_CMDLINE``)."""
    return os.environ["LUO_VM_NEXT_CMDLINE"]


def kexec(kernel: str | None = None, cmdline: str | None = None) -> NoReturn:
    """Load and jump: defaults come from the harness (see :mod:`tests.vm.guest`)."""
    kexec_file_load(kernel or default_kernel(), cmdline or default_cmdline())
    reboot_kexec()


def main() -> int:
    """``python -m tests.vm.kexec``: kexec into the next stage (no LUO state)."""
    try:
        kexec()
    except (KexecError, KeyError) as e:
        print(f"kexec failed: {e!r}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
