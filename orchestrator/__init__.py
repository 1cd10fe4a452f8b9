"""luo-orchestrator: whole-host Linux live update as a playbook of phases.

The kernel layer lives in :mod:`orchestrator.luo` and imports nothing heavy;
the rest of the public API is loaded on first use, so that the restore path
after a kexec pays only for what it touches.
"""

from __future__ import annotations

from orchestrator._compat import TYPE_CHECKING
from orchestrator._compat import lazy_exports as _lazy_exports
from orchestrator.errors import (
    AgentBusyError,
    AgentError,
    AgentRefusal,
    AgentRefusedError,
    AgentSetupError,
    AgentUnreachableError,
    BadRequestError,
    HttpError,
    InvalidArgumentError,
    JournalCorruptError,
    JournalError,
    KeeperError,
    LockedError,
    MetricsExportError,
    OrchestratorError,
    PhaseError,
    PhaseTimeoutError,
    PlaybookError,
    PluginError,
    QmpCommandError,
    QmpConnectionError,
    QmpError,
    QmpTimeoutError,
    TransientError,
    UnfinishedUpdateError,
    UpdateRunningError,
    VmError,
    WorkloadError,
)

if TYPE_CHECKING:
    from orchestrator.engine._context import RunContext, StepContext
    from orchestrator.engine._engine import Engine, Outcome, plugin_manager
    from orchestrator.engine._hookspecs import hookimpl, hookspec
    from orchestrator.engine._options import Option, check_options, option_value
    from orchestrator.engine._phases import Phase, State
    from orchestrator.engine._playbook import Playbook, Step, load_playbook
    from orchestrator.luo._errors import (
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

__all__ = [
    "AbiError",
    "AgentBusyError",
    "AgentError",
    "AgentRefusal",
    "AgentRefusedError",
    "AgentSetupError",
    "AgentUnreachableError",
    "BadRequestError",
    "DeviceBusyError",
    "DeviceUnavailableError",
    "Engine",
    "FileAlreadyPreservedError",
    "HttpError",
    "InvalidArgumentError",
    "JournalCorruptError",
    "JournalError",
    "KeeperError",
    "KernelError",
    "KexecError",
    "LockedError",
    "MetricsExportError",
    "Option",
    "OrchestratorError",
    "Outcome",
    "Phase",
    "PhaseError",
    "PhaseTimeoutError",
    "Playbook",
    "PlaybookError",
    "PluginError",
    "QmpCommandError",
    "QmpConnectionError",
    "QmpError",
    "QmpTimeoutError",
    "RunContext",
    "SessionAlreadyRetrievedError",
    "SessionExistsError",
    "SessionFullError",
    "SessionNotFoundError",
    "SessionStateError",
    "State",
    "StateError",
    "Step",
    "StepContext",
    "TokenExistsError",
    "TokenNotFoundError",
    "TransientError",
    "UnfinishedUpdateError",
    "UnsupportedFileError",
    "UpdateRunningError",
    "VmError",
    "WorkloadError",
    "check_options",
    "hookimpl",
    "hookspec",
    "load_playbook",
    "option_value",
    "plugin_manager",
]

# The rest of the public API is imported on first use (PEP 562): `import
# orchestrator.luo` on the restore path must not pull in anyio, pluggy or yaml.
_LAZY = {
    "hookimpl": ".engine._hookspecs",
    "hookspec": ".engine._hookspecs",
    "StepContext": ".engine._context",
    "RunContext": ".engine._context",
    "Engine": ".engine._engine",
    "Outcome": ".engine._engine",
    "plugin_manager": ".engine._engine",
    "Phase": ".engine._phases",
    "State": ".engine._phases",
    "load_playbook": ".engine._playbook",
    "Playbook": ".engine._playbook",
    "Step": ".engine._playbook",
    "Option": ".engine._options",
    "check_options": ".engine._options",
    "option_value": ".engine._options",
    "AbiError": ".luo._errors",
    "DeviceBusyError": ".luo._errors",
    "DeviceUnavailableError": ".luo._errors",
    "FileAlreadyPreservedError": ".luo._errors",
    "KernelError": ".luo._errors",
    "KexecError": ".luo._errors",
    "SessionAlreadyRetrievedError": ".luo._errors",
    "SessionExistsError": ".luo._errors",
    "SessionFullError": ".luo._errors",
    "SessionNotFoundError": ".luo._errors",
    "SessionStateError": ".luo._errors",
    "StateError": ".luo._errors",
    "TokenExistsError": ".luo._errors",
    "TokenNotFoundError": ".luo._errors",
    "UnsupportedFileError": ".luo._errors",
}

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY)
