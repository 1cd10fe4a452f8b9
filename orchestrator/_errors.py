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
     └── JournalError                           the journal is unreadable or locked

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
