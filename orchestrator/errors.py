"""Every error luo-orchestrator raises, from one root.

::

    OrchestratorError
     ├── InvalidArgumentError (ValueError)      bad input, rejected before any syscall
     ├── KernelError (OSError)                  the kernel said no; keeps the errno
     │    ├── DeviceUnavailableError, DeviceBusyError, AbiError,
     │    ├── SessionExistsError, SessionNotFoundError,
     │    ├── SessionAlreadyRetrievedError, SessionStateError,
     │    ├── UnsupportedFileError, FileAlreadyPreservedError,
     │    ├── TokenExistsError, TokenNotFoundError,
     │    └── StateError, SessionFullError      (orchestrator.luo._errors: one
     │                                           class per meaning of an errno)
     ├── KexecError (OSError)                   loading or starting the next kernel
     ├── PlaybookError (ValueError)             a playbook is malformed (file:line)
     ├── PhaseError                             a phase failed; the update was cancelled
     │    └── PhaseTimeoutError (TimeoutError)
     ├── PluginError                            a plugin cannot be loaded (misspelt hook)
     ├── UnfinishedUpdateError                  an earlier update must be resumed first
     ├── JournalError                           the journal is unreadable or locked
     │    ├── JournalCorruptError               a line is not a record (file:line)
     │    └── LockedError                       another orchestrator runs here
     ├── KeeperError                            the keeper of retrieved fds failed
     ├── MetricsExportError                     metrics not written, pushed or served
     ├── AgentError                             (client side) the agent said no
     │    ├── AgentUnreachableError (ConnectionError)
     │    └── AgentRefusedError                 the agent refused; its reason
     ├── AgentSetupError                        the agent cannot start
     │    └── AgentBusyError                    another agent holds the lock
     ├── AgentRefusal                           (agent side) a request refused
     │    └── UpdateRunningError                an update asked for while one runs
     ├── BadRequestError (ValueError)           (agent side) a request not decodable
     ├── HttpError                              (server side) a request answered 4xx
     ├── VmError                                a VM cannot be started or found
     ├── WorkloadError                          a demo workload is not there or answering
     └── QmpError                               talking QMP to a QEMU failed
          ├── QmpCommandError                   QEMU answered with an error
          ├── QmpTimeoutError (TimeoutError)
          └── QmpConnectionError (ConnectionError)

    TransientError                              a mixin, not an error of its own:
                                                a failure worth retrying

The kernel's errors are defined beside the errno tables that raise them, in
:mod:`orchestrator.luo._errors`; every other class is defined here. All are
exported by :mod:`orchestrator`. Each class builds its message from its
fields, so ``str(exc)`` always says what happened and to what. Standard
library only: this module is imported inside the blackout.
"""

from __future__ import annotations

from orchestrator._compat import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class OrchestratorError(Exception):
    """Base class of every error raised by luo-orchestrator."""


class InvalidArgumentError(OrchestratorError, ValueError):
    """Input that would be wrong for the kernel, rejected before any syscall."""

    def __init__(self, what: str, problem: str) -> None:
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}")


class PlaybookError(OrchestratorError, ValueError):
    """A playbook is malformed; says where (``file:line``) and what was expected."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {problem}")


class TransientError(Exception):
    """Mixin: a failure worth retrying. Retry policies match on nothing else
    (and on the errnos a playbook step lists in ``retry.on_errno``)."""


class PhaseError(OrchestratorError):
    """A step of a phase failed (after its retries); the update was cancelled
    if the phase came before the kexec."""

    def __init__(self, phase: str, step: str, problem: str) -> None:
        self.phase = phase
        self.step = step
        self.problem = problem
        super().__init__(f"phase {phase}, step {step}: {problem}")


class PhaseTimeoutError(PhaseError, TimeoutError):
    """A step, a phase, or the blackout budget ran out of time."""


class PluginError(OrchestratorError):
    """A plugin cannot be loaded or registered (e.g. it implements a hook that
    does not exist: a misspelt ``lu_<phase>``)."""

    def __init__(self, plugin: str, problem: str) -> None:
        self.plugin = plugin
        self.problem = problem
        super().__init__(f"plugin {plugin}: {problem}")


class UnfinishedUpdateError(OrchestratorError):
    """An earlier update never ended; it must be finished or cancelled first.

    :ivar run_id: the unfinished run.
    :ivar state: the state it stopped in.
    :ivar command: the command that finishes or cancels it.
    """

    def __init__(
        self, run_id: str, state: str, after_kexec: bool, command: str
    ) -> None:
        self.run_id = run_id
        self.state = state
        self.after_kexec = after_kexec
        self.command = command
        how = "finish it" if after_kexec else "finish or cancel it"
        where = "after the kexec" if after_kexec else "before the kexec"
        super().__init__(
            f"update {run_id} did not end: it stopped {where} in state {state}; "
            f"{how} first with: {command}"
        )


class JournalError(OrchestratorError):
    """The journal cannot be read or written, or another orchestrator holds it."""


class JournalCorruptError(JournalError):
    """A line of the journal is not a record: the history cannot be trusted.

    :ivar path: the journal.
    :ivar line: the 1-based line number.
    :ivar problem: what is wrong with it.
    """

    def __init__(self, path: str, line: int, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(
            f"{path}:{line}: not a journal record ({problem}); the journal "
            "cannot be trusted past it: repair or remove that line"
        )


class LockedError(JournalError):
    """Another orchestrator is running on this host."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"another orchestrator is running on this host ({holder}); "
            f"lock {path}. Use 'liveupdate status' to see it, 'liveupdate cancel' to stop it"
        )


class KeeperError(OrchestratorError):
    """The keeper could not be started or reached, or refused a request."""


class MetricsExportError(OrchestratorError):
    """The metrics could not be written, pushed or served."""

    def __init__(self, target: str, problem: str) -> None:
        self.target = target
        self.problem = problem
        super().__init__(f"metrics to {target}: {problem}")


class AgentError(OrchestratorError):
    """The agent refused a request, or cannot be reached."""


class AgentUnreachableError(AgentError, ConnectionError):
    """No agent answers at *path* (not running, wrong path, or not allowed by
    the socket file's permissions), or it went away mid-request."""

    def __init__(self, path: str, problem: str, errno: int | None = None) -> None:
        self.path = path
        self.problem = problem
        self.errno = errno
        super().__init__(f"cannot reach the agent at {path}: {problem}")


class AgentRefusedError(AgentError):
    """The agent answered *op* with a refusal; *reason* is its own message."""

    def __init__(self, op: str, reason: str) -> None:
        self.op = op
        self.reason = reason
        super().__init__(reason)


class AgentSetupError(OrchestratorError):
    """The agent cannot start: its socket, state directory or limits are unusable."""

    def __init__(self, path: Path | None, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class AgentBusyError(AgentSetupError):
    """Another agent already serves this socket or state directory."""

    def __init__(self, path: Path, holder: str) -> None:
        self.holder = holder
        super().__init__(
            path,
            f"another agent ({holder}) already holds this lock; not starting, "
            "and leaving its socket and registrations alone",
        )


class BadRequestError(OrchestratorError, ValueError):
    """A request that cannot be decoded within the agent's limits."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"bad request: {problem}")


class AgentRefusal(OrchestratorError):
    """A request the agent refuses; the message goes back to the client."""


class UpdateRunningError(AgentRefusal):
    """An update was asked for while the agent runs one (the host lock).

    The control API answers it with 409 and ``"code": "update_running"``, so
    that automation tells it from any other refusal without reading the text.
    """

    code = "update_running"

    def __init__(self) -> None:
        super().__init__("another update is running on this host")


class VmError(OrchestratorError):
    """A VM cannot be started, found, or is not in the state expected.

    :ivar vm: the VM's name.
    """

    def __init__(self, vm: str, problem: str) -> None:
        self.vm = vm
        self.problem = problem
        super().__init__(f"VM {vm}: {problem}")


class QmpError(OrchestratorError):
    """Talking to a QEMU over QMP failed.

    :ivar socket: the QMP socket path.
    :ivar command: the command being run, or ``None`` while connecting.
    """

    def __init__(self, socket: str, command: str | None, problem: str) -> None:
        self.socket = socket
        self.command = command
        self.problem = problem
        what = f"QMP {command!r}" if command else "QMP"
        super().__init__(f"{what} on {socket}: {problem}")


class QmpCommandError(QmpError):
    """QEMU answered a command with an ``error`` reply.

    :ivar error_class: QMP's error class, e.g. ``GenericError``, ``CommandNotFound``.
    :ivar desc: QEMU's description of the error.
    """

    def __init__(self, socket: str, command: str, error_class: str, desc: str) -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(socket, command, f"{error_class}: {desc}")


class QmpTimeoutError(QmpError, TimeoutError):
    """No greeting or no reply within the deadline."""


class QmpConnectionError(QmpError, ConnectionError):
    """The socket cannot be reached, or QEMU closed it (QEMU died or quit)."""


class WorkloadError(OrchestratorError):
    """A demo workload is not there or not answering."""


class HttpError(OrchestratorError):
    """(server side) a request answered with an HTTP error status.

    :ivar status: the status, e.g. 400.
    :ivar problem: what was wrong with the request.
    """

    def __init__(self, status: int, problem: str, code: str | None = None) -> None:
        self.status = status
        self.problem = problem
        self.code = code
        super().__init__(f"HTTP {status}: {problem}")
