"""kexec through the syscalls: load, unload, probe and jump.

``kexec_file_load(2)`` is the loader LUO needs (Kexec HandOver passes its data
through the file-based loader). The syscall is reached through ctypes so that
no kexec-tools are needed; when the syscall is missing (ENOSYS) and
``kexec`` is installed, ``kexec -s`` is used instead.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import platform
import shutil
import subprocess
from pathlib import Path

from orchestrator._compat import TYPE_CHECKING

from ._errors import KexecError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Final, NoReturn

# Syscall numbers by machine (asm/unistd_64.h and asm-generic/unistd.h).
_SYS_KEXEC_FILE_LOAD: Final = {"x86_64": 320, "aarch64": 294, "riscv64": 294}
_SYS_REBOOT: Final = {"x86_64": 169, "aarch64": 142, "riscv64": 142}

KEXEC_FILE_UNLOAD: Final = 0x1
KEXEC_FILE_ON_CRASH: Final = 0x2
KEXEC_FILE_NO_INITRAMFS: Final = 0x4

LINUX_REBOOT_MAGIC1: Final = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2: Final = 672274793
LINUX_REBOOT_CMD_KEXEC: Final = 0x45584543

KEXEC_LOADED: Final = Path("/sys/kernel/kexec_loaded")

_libc: ctypes.CDLL | None = None


def _syscall(name: str, table: dict[str, int], *args: int | bytes | None) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    number = table.get(platform.machine())
    if number is None:
        raise KexecError(E.ENOSYS, name, f"unsupported machine {platform.machine()}")
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if _libc.syscall(ctypes.c_long(number), *cargs) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_LOAD_MEANING: Final = {
    E.EPERM: "needs CAP_SYS_BOOT (run as root), or kexec is disabled "
    "(kernel.kexec_load_disabled) or locked down",
    E.ENOEXEC: "the image is not a kernel this kernel can load "
    "(a bzImage needs CONFIG_RELOCATABLE, and KEXEC_FILE support for its format)",
    E.EKEYREJECTED: "the image's signature was rejected",
    E.EBUSY: "another kexec load is in progress",
    E.ENOMEM: "not enough memory to stage the image",
    E.EINVAL: "the kernel rejected the image, initrd or command line",
}


def kexec_file_load(kernel: Path, initrd: Path | None, cmdline: str) -> None:
    """Load *kernel* (with *initrd*, if any) to be started with *cmdline*.

    :raises KexecError: the kernel refused; the message says why.
    """
    raw_cmdline = cmdline.encode() + b"\0"
    flags = 0 if initrd is not None else KEXEC_FILE_NO_INITRAMFS
    try:
        kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KexecError(
            exc.errno or E.EIO, "kexec_file_load", f"{kernel}: {exc.strerror}"
        ) from exc
    ifd = -1
    try:
        if initrd is not None:
            try:
                ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise KexecError(
                    exc.errno or E.EIO, "kexec_file_load", f"{initrd}: {exc.strerror}"
                ) from exc
        try:
            _syscall(
                "kexec_file_load",
                _SYS_KEXEC_FILE_LOAD,
                kfd,
                ifd,
                len(raw_cmdline),
                raw_cmdline,
                flags,
            )
        except OSError as exc:
            err = exc.errno or E.EIO
            if err == E.ENOSYS and shutil.which("kexec"):
                _kexec_tools_load(kernel, initrd, cmdline)
                return
            raise KexecError(
                err,
                "kexec_file_load",
                f"{kernel}: {_LOAD_MEANING.get(err, exc.strerror)}",
            ) from exc
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def _kexec_tools_load(kernel: Path, initrd: Path | None, cmdline: str) -> None:
    argv = ["kexec", "-s", "-l", str(kernel), f"--command-line={cmdline}"]
    if initrd is not None:
        argv.append(f"--initrd={initrd}")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KexecError(E.EINVAL, "kexec -s -l", done.stderr.strip() or "failed")


def kexec_file_unload() -> None:
    """Unload the loaded next kernel (a no-op when none is loaded)."""
    try:
        _syscall(
            "kexec_file_load", _SYS_KEXEC_FILE_LOAD, -1, -1, 0, None, KEXEC_FILE_UNLOAD
        )
    except OSError as exc:
        raise KexecError(exc.errno or E.EIO, "kexec unload", str(exc.strerror)) from exc


def kexec_loaded() -> bool:
    """Whether a next kernel is loaded (``/sys/kernel/kexec_loaded``)."""
    try:
        return KEXEC_LOADED.read_text().strip() == "1"
    except OSError:
        return False


def reboot_kexec() -> NoReturn:
    """``reboot(LINUX_REBOOT_CMD_KEXEC)``: start the loaded kernel.

    Inside the syscall LUO freezes every preserved file; if one refuses, the
    syscall returns an error and the old kernel keeps running.

    :raises KexecError: the kexec did not happen.
    """
    try:
        _syscall(
            "reboot",
            _SYS_REBOOT,
            LINUX_REBOOT_MAGIC1,
            LINUX_REBOOT_MAGIC2,
            LINUX_REBOOT_CMD_KEXEC,
            None,
        )
    except OSError as exc:
        err = exc.errno or E.EIO
        detail = {
            E.EINVAL: "no kernel is loaded",
            E.EPERM: "needs CAP_SYS_BOOT",
        }.get(
            err,
            f"the kernel refused the kexec ({exc.strerror}); a preserved file "
            "may have failed to freeze",
        )
        raise KexecError(err, "reboot(LINUX_REBOOT_CMD_KEXEC)", detail) from exc
    raise KexecError(
        E.EIO, "reboot(LINUX_REBOOT_CMD_KEXEC)", "returned without a kexec"
    )


def kernel_log(needles: Iterable[str]) -> list[str]:
    """Lines of ``/dev/kmsg`` that contain any of *needles* (best effort)."""
    wanted = tuple(needles)
    lines: list[str] = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return lines
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == E.EPIPE:  # overwritten record: skip it
                    continue
                break
            message = record.split(";", 1)[-1].split("\n", 1)[0]
            if any(n in message for n in wanted):
                lines.append(message)
    finally:
        os.close(fd)
    return lines
