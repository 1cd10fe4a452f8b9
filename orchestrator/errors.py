"""The root of every error luo-orchestrator raises.

::

    OrchestratorError
     ├── InvalidArgumentError (ValueError)      bad input, rejected before any syscall
     ├── KernelError (OSError)                  the kernel said no; keeps the errno
     │    └── ... one class per meaning, see orchestrator.luo._errors
     ├── KexecError (OSError)                   loading or starting the next kernel
     ├── PlaybookError (ValueError)             a playbook is malformed (file:line)
     ├── PhaseError                             a phase failed; the update was cancelled
     │    └── PhaseTimeoutError (TimeoutError)
     ├── PluginError                            a plugin cannot be loaded (misspelt hook)
     ├── JournalError                           the journal is unreadable or locked
     │    ├── JournalCorruptError               a line is not a record (file:line)
     │    └── LockedError                       another orchestrator runs here
     ├── UnfinishedUpdateError                  an earlier update must be resumed first
     └── KeeperError                            the keeper of retrieved fds failed

Each class builds its message from its fields, so ``str(exc)`` always says what
happened and to what.
"""

from __future__ import annotations


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
