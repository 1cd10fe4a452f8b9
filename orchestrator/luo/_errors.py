"""What the kernel meant: errno → typed exceptions, per request.

An errno alone is ambiguous (ENOENT from PRESERVE_FD means "no handler for
this kind of file", from RETRIEVE_FD "no such token"), so the translation is
keyed by the request. Every exception keeps the errno and the request::

    KernelError (OrchestratorError, OSError)
     ├── DeviceUnavailableError     open(): no /dev/liveupdate, no permission, EIO
     ├── DeviceBusyError            open(): another process holds the device
     ├── AbiError                   E2BIG / short size / ENOTTY: client and kernel disagree
     ├── SessionExistsError         CREATE_SESSION: name already used
     ├── SessionNotFoundError       RETRIEVE_SESSION: no incoming session of that name
     ├── SessionAlreadyRetrievedError  RETRIEVE_SESSION: retrieved before
     ├── SessionStateError          a request the session's direction does not allow
     ├── UnsupportedFileError       PRESERVE_FD: this kernel cannot preserve <kind>
     ├── FileAlreadyPreservedError  PRESERVE_FD: the file is preserved already
     ├── TokenExistsError           PRESERVE_FD: token already used in the session
     ├── TokenNotFoundError         RETRIEVE_FD / RFC FD_RESTORE: no such token
     ├── StateError                 RFC: request not allowed in the current state
     └── SessionFullError           PRESERVE_FD: ENOSPC
    KexecError (OrchestratorError, OSError)  kexec_file_load / reboot failed
"""

from __future__ import annotations

import errno as E
import os

from orchestrator._compat import TYPE_CHECKING
from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from typing import Final


class KernelError(OrchestratorError, OSError):
    """The kernel refused a request on /dev/liveupdate.

    :ivar errno: the errno the kernel returned.
    :ivar request: the request's name, e.g. ``"SESSION_PRESERVE_FD"``.
    :ivar meaning: what the kernel meant by it, in words.
    """

    def __init__(self, err: int, request: str, meaning: str, subject: str = "") -> None:
        self.request = request
        self.meaning = meaning
        self.subject = subject
        target = f"{request}({subject})" if subject else request
        name = E.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"{target}: {meaning} [{name}]")

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.request, self.meaning, self.subject))


class DeviceUnavailableError(KernelError):
    """/dev/liveupdate cannot be opened (absent, no permission, bad incoming state)."""


class DeviceBusyError(KernelError):
    """Another process has /dev/liveupdate open: the device admits one opener."""


class AbiError(KernelError):
    """The kernel does not understand the request or struct: an ABI mismatch."""


class SessionExistsError(KernelError):
    """CREATE_SESSION: a session of that name exists in this kernel."""


class SessionNotFoundError(KernelError):
    """RETRIEVE_SESSION: no session of that name came through the kexec."""


class SessionAlreadyRetrievedError(KernelError):
    """RETRIEVE_SESSION: the session was retrieved already in this kernel."""


class SessionStateError(KernelError):
    """The request does not apply to this session (outgoing vs. incoming)."""


class UnsupportedFileError(KernelError):
    """PRESERVE_FD: no handler in this kernel can preserve this kind of file."""


class FileAlreadyPreservedError(KernelError):
    """PRESERVE_FD: this file is preserved already (in this or another session)."""


class TokenExistsError(KernelError):
    """PRESERVE_FD: the token is used already in this session."""


class TokenNotFoundError(KernelError):
    """RETRIEVE_FD / FD_RESTORE: nothing preserved under this token (or FINISH ran)."""


class StateError(KernelError):
    """RFC ABI: the request is not allowed in the current LUO state."""


class SessionFullError(KernelError):
    """PRESERVE_FD: the session's file set is full."""


class KexecError(OrchestratorError, OSError):
    """Loading, unloading or starting the next kernel failed."""

    def __init__(self, err: int, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        name = E.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"{operation}: {detail} [{name}]")

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.errno, self.operation, self.detail))


_Meaning = tuple[type[KernelError], str]

# (request, errno) -> (class, meaning). "{kind}" is filled with a description
# of the file for PRESERVE_FD. Requests not listed fall back to _GENERIC.
_TABLE: Final[dict[tuple[str, int], _Meaning]] = {
    ("open", E.ENOENT): (DeviceUnavailableError, "no /dev/liveupdate on this host"),
    ("open", E.ENODEV): (DeviceUnavailableError, "live update is not enabled"),
    ("open", E.ENXIO): (DeviceUnavailableError, "live update is not enabled"),
    ("open", E.EACCES): (DeviceUnavailableError, "permission denied"),
    ("open", E.EPERM): (DeviceUnavailableError, "permission denied"),
    ("open", E.EIO): (
        DeviceUnavailableError,
        "the state handed over by the previous kernel failed to deserialize",
    ),
    ("open", E.EBUSY): (DeviceBusyError, "another process holds /dev/liveupdate"),
    ("CREATE_SESSION", E.EEXIST): (SessionExistsError, "session name already exists"),
    ("CREATE_SESSION", E.EINVAL): (AbiError, "the kernel rejected the session name"),
    ("RETRIEVE_SESSION", E.ENOENT): (
        SessionNotFoundError,
        "no session of this name came through the live update",
    ),
    ("RETRIEVE_SESSION", E.EINVAL): (
        SessionAlreadyRetrievedError,
        "the session was already retrieved in this kernel",
    ),
    ("SESSION_PRESERVE_FD", E.ENOENT): (
        UnsupportedFileError,
        "this kernel cannot preserve {kind}",
    ),
    ("SESSION_PRESERVE_FD", E.EOPNOTSUPP): (
        UnsupportedFileError,
        "this kernel cannot preserve {kind} in its current configuration "
        "(e.g. hugetlb or unknown seals)",
    ),
    ("SESSION_PRESERVE_FD", E.EBUSY): (
        FileAlreadyPreservedError,
        "{kind} is already preserved (in this or another session)",
    ),
    ("SESSION_PRESERVE_FD", E.EEXIST): (
        TokenExistsError,
        "the token is already used in this session",
    ),
    ("SESSION_PRESERVE_FD", E.EBADF): (KernelError, "not an open file descriptor"),
    ("SESSION_PRESERVE_FD", E.EINVAL): (
        SessionStateError,
        "files can only be preserved into a session created in this kernel",
    ),
    ("SESSION_PRESERVE_FD", E.ENOSPC): (SessionFullError, "the session is full"),
    ("SESSION_RETRIEVE_FD", E.ENOENT): (
        TokenNotFoundError,
        "nothing is preserved under this token (or the session was finished)",
    ),
    ("SESSION_RETRIEVE_FD", E.EINVAL): (
        SessionStateError,
        "files can only be retrieved from a session that came through the kexec",
    ),
    ("SESSION_FINISH", E.EINVAL): (
        SessionStateError,
        "only a session that came through the kexec can be finished",
    ),
    ("FD_PRESERVE", E.ENOENT): (
        UnsupportedFileError,
        "this kernel cannot preserve {kind}",
    ),
    ("FD_PRESERVE", E.EEXIST): (TokenExistsError, "the token is already used"),
    ("FD_PRESERVE", E.EBUSY): (StateError, "files can only be preserved in NORMAL"),
    ("FD_UNPRESERVE", E.ENOENT): (
        TokenNotFoundError,
        "no file is preserved under this token",
    ),
    ("FD_UNPRESERVE", E.EBUSY): (StateError, "files can only be unpreserved in NORMAL"),
    ("FD_RESTORE", E.ENOENT): (
        TokenNotFoundError,
        "nothing is preserved under this token",
    ),
    ("FD_RESTORE", E.EBUSY): (StateError, "files can only be restored in UPDATED"),
    ("PREPARE", E.EBUSY): (StateError, "PREPARE is only allowed in NORMAL"),
    ("PREPARE", E.EINVAL): (StateError, "PREPARE is only allowed in NORMAL"),
    ("CANCEL", E.EBUSY): (StateError, "there is no prepared update to cancel"),
    ("CANCEL", E.EINVAL): (StateError, "there is no prepared update to cancel"),
    ("FINISH", E.EBUSY): (StateError, "FINISH is only allowed in UPDATED"),
    ("FINISH", E.EINVAL): (StateError, "FINISH is only allowed in UPDATED"),
}

_GENERIC: Final[dict[int, _Meaning]] = {
    E.E2BIG: (AbiError, "the kernel does not know the trailing fields of this struct"),
    E.ENOTTY: (AbiError, "the kernel does not know this request"),
    E.EOPNOTSUPP: (AbiError, "the kernel does not support this value"),
    E.EOVERFLOW: (KernelError, "a value overflowed what the kernel supports"),
    E.ENOMEM: (KernelError, "the kernel ran out of memory"),
    E.EFAULT: (AbiError, "the kernel could not read or write the argument"),
    E.EINVAL: (AbiError, "the kernel rejected the argument"),
    E.EBADF: (KernelError, "not an open file descriptor"),
}


def kernel_error(
    err: int, request: str, subject: str = "", kind: str = ""
) -> KernelError:
    """The exception that says what *err* means for *request*."""
    cls, meaning = _TABLE.get((request, err)) or _GENERIC.get(
        err, (KernelError, os.strerror(err))
    )
    return cls(err, request, meaning.format(kind=kind or "this kind of file"), subject)
