"""The seam between the client code and a kernel: real or simulated.

Everything above this seam (sessions, the RFC client, the probe, the engine)
packs the same bytes for either kernel. :class:`RealKernel` hands them to
``ioctl(2)``; :class:`orchestrator.luo.sim.SimKernel` hands them to an emulator
with the kernel's semantics.
"""

from __future__ import annotations

import fcntl
import os
import time

from orchestrator._compat import TYPE_CHECKING, Protocol, final

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path
    from typing import NoReturn

DEVICE_PATH = "/dev/liveupdate"
KERNEL_ENV = "LIVEUPDATE_KERNEL"
"""Environment variable naming the kernel to use: ``real`` or ``sim:DIR``."""


class Kernel(Protocol):
    """What the client needs from a kernel.

    ``ioctl`` raises :class:`OSError` with the kernel's errno; callers translate
    it with :func:`orchestrator.luo._errors.kernel_error`.
    """

    @property
    def spec(self) -> str:
        """``"real"`` or ``"sim:DIR"``: enough to find this kernel again."""

    def open_device(self) -> int:
        """Open /dev/liveupdate; return the fd."""

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        """Issue *request* on *fd*; the kernel may write into *arg*."""

    def close(self, fd: int) -> None:
        """Close an fd this kernel handed out (device, session or retrieved file)."""

    def boot_id(self) -> str:
        """The id of the running boot (changes at every kexec)."""

    def since_boot(self) -> float:
        """Seconds since this kernel's clock started (CLOCK_BOOTTIME): never
        jumps, and after a kexec counts from the new kernel's start."""

    def cmdline(self) -> str:
        """The running kernel's command line."""

    def kexec_load(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        """Load the next kernel (``kexec_file_load``)."""

    def kexec_unload(self) -> None:
        """Unload a loaded next kernel."""

    def kexec_loaded(self) -> bool:
        """Whether a next kernel is loaded."""

    def reboot_kexec(self) -> NoReturn:
        """Jump into the loaded kernel; returns only by raising (the kexec failed)."""

    def log_lines(self) -> Sequence[str]:
        """The kernel log lines about live update of this boot (best effort)."""


@final
class RealKernel:
    """The running Linux kernel."""

    def __init__(self, device: str = DEVICE_PATH) -> None:
        self.device = device

    @property
    def spec(self) -> str:
        return "real"

    def open_device(self) -> int:
        return os.open(self.device, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        if arg is None:
            fcntl.ioctl(fd, request, 0)
        else:
            fcntl.ioctl(fd, request, arg, True)

    def close(self, fd: int) -> None:
        os.close(fd)

    def boot_id(self) -> str:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()

    def since_boot(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def cmdline(self) -> str:
        with open("/proc/cmdline") as f:
            return f.read().strip()

    def kexec_load(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        from . import _kexec

        _kexec.kexec_file_load(kernel, initrd, cmdline)

    def kexec_unload(self) -> None:
        from . import _kexec

        _kexec.kexec_file_unload()

    def kexec_loaded(self) -> bool:
        from . import _kexec

        return _kexec.kexec_loaded()

    def reboot_kexec(self) -> NoReturn:
        from . import _kexec

        _kexec.reboot_kexec()

    def log_lines(self) -> Sequence[str]:
        from . import _kexec

        return _kexec.kernel_log(("liveupdate", "luo:", "KHO"))


def detect_abi(kernel: Kernel, fd: int) -> tuple[str, int | None]:
    """Which ABI the open device *fd* speaks: ``("rfc", state)``, with the RFC
    state number GET_STATE returned, or ``("merged", None)``.

    The RFC's GET_STATE is number 3 with a size, which the merged ABI's
    dispatcher rejects (EINVAL: number out of range).
    """
    from . import _abi

    buf = _abi.RFC_STATE.pack()
    try:
        kernel.ioctl(fd, _abi.RFC_GET_STATE.number, buf)
    except OSError:
        return "merged", None
    return "rfc", int(_abi.RFC_STATE.unpack(buf)["state"])


def liveupdate_number(kernel: Kernel) -> int | None:
    """The kernel's count of live updates, from its log ("liveupdate number: N")."""
    for line in kernel.log_lines():
        if "liveupdate number:" in line:
            try:
                return int(line.rsplit(":", 1)[1])
            except ValueError:
                continue
    return None


def kernel_from_spec(spec: str | None = None) -> Kernel:
    """The kernel named by *spec* (or ``$LIVEUPDATE_KERNEL``, default ``real``).

    ``real`` is this host's kernel; ``sim:DIR`` the simulated kernel whose
    state lives in DIR (``liveupdate sim init DIR`` creates it; this does not).

    :raises InvalidArgumentError: *spec* names neither, or DIR holds no
        simulated kernel.
    """
    from orchestrator.errors import InvalidArgumentError

    spec = spec or os.environ.get(KERNEL_ENV) or "real"
    if spec == "real":
        return RealKernel()
    if spec.startswith("sim:") and len(spec) > 4:
        from pathlib import Path

        from .sim import SimKernel

        return SimKernel.existing(Path(spec[4:]))
    raise InvalidArgumentError(
        f"unknown kernel {spec!r}", "expected 'real' or 'sim:DIR'"
    )
