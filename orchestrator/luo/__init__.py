"""The kernel layer: /dev/liveupdate (both ABIs), kexec, probe, simulated kernel.

Synchronous and thin on purpose -- no asyncio here. It is imported on the
restore path after the kexec, inside the blackout window, so it pulls in only
the standard library.
"""

from __future__ import annotations

from orchestrator._compat import TYPE_CHECKING
from orchestrator._compat import lazy_exports as _lazy_exports

if TYPE_CHECKING:
    from ._errors import (
        AbiError,
        DeviceBusyError,
        DeviceUnavailableError,
        FileAlreadyPreservedError,
        KernelError,
        KexecError,
        SessionAlreadyRetrievedError,
        SessionExistsError,
        SessionFullError,
        SessionNotFoundError,
        SessionStateError,
        StateError,
        TokenExistsError,
        TokenNotFoundError,
        UnsupportedFileError,
    )
    from ._fds import OwnedFd, describe_fd, holds_same_file
    from ._kernel import DEVICE_PATH, KERNEL_ENV, Kernel, RealKernel, kernel_from_spec
    from ._rfc import RfcDevice
    from ._rfcstate import RfcState
    from ._session import MAX_NAME_BYTES, LiveUpdateDevice, Session


__all__ = [
    "DEVICE_PATH",
    "KERNEL_ENV",
    "MAX_NAME_BYTES",
    "AbiError",
    "DeviceBusyError",
    "DeviceUnavailableError",
    "FileAlreadyPreservedError",
    "Kernel",
    "KernelError",
    "KexecError",
    "LiveUpdateDevice",
    "OwnedFd",
    "RealKernel",
    "RfcDevice",
    "RfcState",
    "Session",
    "SessionAlreadyRetrievedError",
    "SessionExistsError",
    "SessionFullError",
    "SessionNotFoundError",
    "SessionStateError",
    "StateError",
    "TokenExistsError",
    "TokenNotFoundError",
    "UnsupportedFileError",
    "describe_fd",
    "holds_same_file",
    "kernel_from_spec",
]

# Loaded on first use (PEP 562): the restore path imports only what it touches
# (no enum, no RFC client, no kexec or probe machinery).
_WHERE = {
    "RfcState": "._rfcstate",
    "RfcDevice": "._rfc",
    "OwnedFd": "._fds",
    "describe_fd": "._fds",
    "holds_same_file": "._fds",
    "DEVICE_PATH": "._kernel",
    "KERNEL_ENV": "._kernel",
    "Kernel": "._kernel",
    "RealKernel": "._kernel",
    "kernel_from_spec": "._kernel",
    "MAX_NAME_BYTES": "._session",
    "LiveUpdateDevice": "._session",
    "Session": "._session",
}


_WHERE.update(dict.fromkeys(set(__all__) - set(_WHERE), "._errors"))

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _WHERE)
