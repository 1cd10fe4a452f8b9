"""The kernel layer: /dev/liveupdate (both ABIs), kexec, probe, simulated kernel.

Synchronous and thin on purpose -- no asyncio here. It is imported on the
restore path after the kexec, inside the blackout window, so it pulls in only
the standard library.
"""

from __future__ import annotations

from ._abi import RfcState
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
from ._fds import OwnedFd, describe_fd
from ._kernel import DEVICE_PATH, KERNEL_ENV, Kernel, RealKernel, kernel_from_spec
from ._rfc import RfcDevice
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
    "kernel_from_spec",
]
