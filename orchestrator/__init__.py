"""luo-orchestrator: whole-host Linux live update as a playbook of phases.

The kernel layer lives in :mod:`orchestrator.luo` and imports nothing heavy;
the rest of the public API is loaded on first use, so that the restore path
after a kexec pays only for what it touches.
"""

from __future__ import annotations

from orchestrator._compat import TYPE_CHECKING
from orchestrator._compat import lazy_exports as _lazy_exports
from orchestrator.errors import InvalidArgumentError, OrchestratorError

if TYPE_CHECKING:
    from orchestrator.engine._context import RunContext, StepContext
    from orchestrator.engine._engine import Engine, Outcome, plugin_manager
    from orchestrator.engine._hookspecs import hookimpl, hookspec
    from orchestrator.engine._options import Option, check_options, option_value
    from orchestrator.engine._phases import Phase, State
    from orchestrator.engine._playbook import Playbook, Step, load_playbook
    from orchestrator.errors import (
        PhaseError,
        PhaseTimeoutError,
        PlaybookError,
        PluginError,
        TransientError,
    )

__all__ = [
    "Engine",
    "InvalidArgumentError",
    "Option",
    "OrchestratorError",
    "Outcome",
    "Phase",
    "PhaseError",
    "PhaseTimeoutError",
    "Playbook",
    "PlaybookError",
    "PluginError",
    "RunContext",
    "State",
    "Step",
    "StepContext",
    "TransientError",
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
    "PlaybookError": ".errors",
    "PluginError": ".errors",
    "PhaseError": ".errors",
    "PhaseTimeoutError": ".errors",
    "TransientError": ".errors",
    "load_playbook": ".engine._playbook",
    "Playbook": ".engine._playbook",
    "Step": ".engine._playbook",
    "Option": ".engine._options",
    "check_options": ".engine._options",
    "option_value": ".engine._options",
}

__getattr__, __dir__ = _lazy_exports(__name__, globals(), _LAZY)
