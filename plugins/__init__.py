"""Built-in plugins of luo-orchestrator."""

from __future__ import annotations
