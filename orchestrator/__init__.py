"""luo-orchestrator: whole-host Linux live update as a playbook of phases.

The kernel layer lives in :mod:`orchestrator.luo` and imports nothing heavy;
the rest of the public API is loaded on first use, so that the restore path
after a kexec pays only for what it touches.
"""

from __future__ import annotations

from orchestrator._compat import TYPE_CHECKING

from ._errors import InvalidArgumentError, OrchestratorError

if TYPE_CHECKING:
    from ._context import RunContext, StepContext
    from ._engine import Engine, Outcome, plugin_manager
    from ._errors import (
        PhaseError,
        PhaseTimeoutError,
        PlaybookError,
        PluginError,
        TransientError,
    )
    from ._hookspecs import hookimpl, hookspec
    from ._options import Option, check_options, option_value
    from ._phases import Phase, State
    from ._playbook import Playbook, Step, load_playbook

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
    "hookimpl": "._hookspecs",
    "hookspec": "._hookspecs",
    "StepContext": "._context",
    "RunContext": "._context",
    "Engine": "._engine",
    "Outcome": "._engine",
    "plugin_manager": "._engine",
    "Phase": "._phases",
    "State": "._phases",
    "PlaybookError": "._errors",
    "PluginError": "._errors",
    "PhaseError": "._errors",
    "PhaseTimeoutError": "._errors",
    "TransientError": "._errors",
    "load_playbook": "._playbook",
    "Playbook": "._playbook",
    "Step": "._playbook",
    "Option": "._options",
    "check_options": "._options",
    "option_value": "._options",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
