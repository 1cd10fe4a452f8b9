"""What this host can do for a live update, found by asking the kernel.

Nothing is assumed: the ABI is told by how the device answers, and each kind
of file is tried for real on a scratch session (merged ABI) or a scratch
token (RFC ABI, NORMAL state only), which is dropped again at once.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import random
import socket
from dataclasses import asdict, dataclass, field

from orchestrator._compat import TYPE_CHECKING

from ._errors import DeviceBusyError, KernelError, kernel_error
from ._fds import OwnedFd
from ._kernel import Kernel, detect_abi, kernel_from_spec, liveupdate_number
from ._rfc import RfcDevice
from ._rfcstate import RfcState
from ._session import LiveUpdateDevice

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Final

EXIT_OK: Final = 0
EXIT_NOT_POSSIBLE: Final = 3
EXIT_BUSY: Final = 4

_KVM_CREATE_VM: Final = 0xAE01  # _IO(KVMIO, 0x01)


@dataclass(frozen=True, slots=True)
class KindResult:
    """Whether one kind of file can be preserved here, and why not."""

    kind: str
    preservable: bool | None  # None: could not be tried on this host
    detail: str


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """The answer of :func:`probe`.

    :ivar possible: a live update can be done here.
    :ivar reason: why not, in words, when it cannot.
    :ivar exit_code: 0 possible, 3 not possible here, 4 device busy.
    """

    kernel: str
    device_present: bool
    abi: str | None
    liveupdate_on_cmdline: bool
    kho: bool | None
    rfc_state: str | None
    liveupdate_number: int | None
    kexec_loaded: bool
    kinds: tuple[KindResult, ...] = field(default=())
    possible: bool = False
    reason: str = ""
    exit_code: int = EXIT_NOT_POSSIBLE
    boot_id: str | None = None
    running_kernel: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@contextlib.contextmanager
def _scratch_files() -> Iterator[list[tuple[str, Callable[[], int] | str]]]:
    """(kind, opener or the reason it cannot be made here) for each kind to try."""

    def memfd() -> int:
        return os.memfd_create("luo-probe", os.MFD_CLOEXEC)

    def memfd_hugetlb() -> int:
        return os.memfd_create("luo-probe-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)

    def tmpfile() -> int:
        return os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def pipe() -> int:
        r, w = os.pipe()
        os.close(w)
        return r

    def unix_socket() -> int:
        a, b = socket.socketpair()
        b.close()
        return a.detach()

    def device(path: str) -> Callable[[], int]:
        return lambda: os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def kvm_vm() -> int:
        import fcntl

        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        finally:
            os.close(kvm)

    yield [
        ("memfd", memfd),
        ("memfd (hugetlb)", memfd_hugetlb),
        ("unlinked tmpfs file", tmpfile),
        ("pipe", pipe),
        ("unix socket", unix_socket),
        ("KVM VM", kvm_vm if os.path.exists("/dev/kvm") else "no /dev/kvm"),
        (
            "iommufd",
            device("/dev/iommu") if os.path.exists("/dev/iommu") else "no /dev/iommu",
        ),
        (
            "VFIO container",
            device("/dev/vfio/vfio")
            if os.path.exists("/dev/vfio/vfio")
            else "no /dev/vfio",
        ),
    ]


def _try_kinds(preserve: Callable[[int, int], None]) -> tuple[KindResult, ...]:
    results = []
    base = random.getrandbits(63)
    with _scratch_files() as candidates:
        for i, (kind, opener) in enumerate(candidates):
            if isinstance(opener, str):
                results.append(KindResult(kind, None, opener))
                continue
            try:
                fd = OwnedFd(opener())
            except OSError as exc:
                results.append(
                    KindResult(kind, None, f"cannot make one here: {exc.strerror}")
                )
                continue
            with fd:
                try:
                    preserve(fd.fileno(), base + i)
                except KernelError as exc:
                    results.append(KindResult(kind, False, exc.meaning))
                else:
                    results.append(
                        KindResult(kind, True, "preserved on a scratch session")
                    )
    return tuple(results)


def _boot_id(kernel: Kernel) -> str | None:
    try:
        return kernel.boot_id()
    except OSError:
        return None


def _release(kernel: Kernel) -> str:
    """The running kernel's release; a simulated kernel has its own
    (``SimKernel.release``), fleet automation compares it with its target."""
    release = getattr(kernel, "release", None)
    return str(release()) if callable(release) else os.uname().release


def probe(kernel: Kernel | str | None = None, *, try_kinds: bool = True) -> ProbeReport:
    """Probe *kernel* (default: ``$LIVEUPDATE_KERNEL`` or this host's)."""
    k = (
        kernel
        if kernel is not None and not isinstance(kernel, str)
        else kernel_from_spec(kernel)
    )
    try:
        cmdline = k.cmdline().split()
    except OSError:
        cmdline = []
    lu_on = any(
        arg in ("liveupdate=on", "liveupdate=1", "liveupdate=y") for arg in cmdline
    )
    kho: bool | None = (
        True
        if "kho=on" in cmdline or os.path.isdir("/sys/kernel/debug/kho")
        else (False if "kho=off" in cmdline else None)
    )
    common = {
        "kernel": k.spec,
        "liveupdate_on_cmdline": lu_on,
        "kho": kho,
        "liveupdate_number": liveupdate_number(k),
        "kexec_loaded": k.kexec_loaded(),
        "boot_id": _boot_id(k),
        "running_kernel": _release(k),
    }
    try:
        fd = k.open_device()
    except OSError as exc:
        err = exc.errno or E.EIO
        if err == E.EBUSY:
            return ProbeReport(
                device_present=True,
                abi=None,
                rfc_state=None,
                **common,  # type: ignore[arg-type]
                reason="another process holds /dev/liveupdate (an agent or a running "
                "update); probe again when it is done",
                exit_code=EXIT_BUSY,
            )
        if err == E.ENOENT:
            reason = (
                "no /dev/liveupdate: the kernel lacks CONFIG_LIVEUPDATE, or KHO is "
                "disabled (see 'Disabling liveupdate because KHO is disabled' in dmesg)"
                if lu_on
                else "no /dev/liveupdate: live update is off; boot a kernel with "
                "CONFIG_LIVEUPDATE and 'liveupdate=on' on its command line"
            )
        else:
            reason = str(kernel_error(err, "open", "/dev/liveupdate"))
        return ProbeReport(
            device_present=err != E.ENOENT,
            abi=None,
            rfc_state=None,
            **common,  # type: ignore[arg-type]
            reason=reason,
        )
    abi, raw_state = detect_abi(k, fd)
    rfc_state = None if raw_state is None else RfcState(raw_state).name
    kinds: tuple[KindResult, ...] = ()
    if abi == "merged":
        dev = LiveUpdateDevice(k, fd)
        with dev:
            if try_kinds:
                try:
                    scratch = dev.create_session(f"luo-probe-{os.getpid()}")
                except KernelError as exc:
                    kinds = (KindResult("*", None, f"no scratch session: {exc}"),)
                else:
                    with scratch:  # closing it unpreserves everything
                        kinds = _try_kinds(scratch.preserve_fd)
    else:
        rdev = RfcDevice(k, fd)
        with rdev:
            if try_kinds and rfc_state == "NORMAL":

                def preserve(raw: int, token: int) -> None:
                    rdev.preserve_fd(raw, token)
                    rdev.unpreserve_fd(token)

                kinds = _try_kinds(preserve)
    memfd_ok = any(r.kind == "memfd" and r.preservable for r in kinds)
    if try_kinds and not memfd_ok and not (abi == "rfc" and rfc_state != "NORMAL"):
        return ProbeReport(
            device_present=True,
            abi=abi,
            rfc_state=rfc_state,
            kinds=kinds,
            **common,  # type: ignore[arg-type]
            reason="this kernel cannot preserve memfds (CONFIG_LIVEUPDATE_MEMFD missing?)",
        )
    return ProbeReport(
        device_present=True,
        abi=abi,
        rfc_state=rfc_state,
        kinds=kinds,
        **common,  # type: ignore[arg-type]
        possible=True,
        exit_code=EXIT_OK,
    )


__all__ = [
    "EXIT_BUSY",
    "EXIT_NOT_POSSIBLE",
    "EXIT_OK",
    "DeviceBusyError",
    "KindResult",
    "ProbeReport",
    "probe",
]
