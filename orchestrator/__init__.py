"""luo-orchestrator: whole-host Linux live update as a playbook of phases.

The kernel layer lives in :mod:`orchestrator.luo` and imports nothing heavy;
the rest of the public API is loaded on first use, so that the restore path
after a kexec pays only for what it touches.
"""

from __future__ import annotations

from ._errors import InvalidArgumentError, OrchestratorError

__all__ = ["InvalidArgumentError", "OrchestratorError"]
