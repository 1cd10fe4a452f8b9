"""Client of the host agent, for workloads: see :mod:`orchestrator.agent.client`.

A thin re-export, kept where workloads import it from. Standard library only.
"""

from __future__ import annotations

from orchestrator.agent.client import (
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT,
    MAX_PACKET,
    AgentClient,
)
from orchestrator.errors import AgentError, AgentRefusedError, AgentUnreachableError

__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_TIMEOUT",
    "MAX_PACKET",
    "AgentClient",
    "AgentError",
    "AgentRefusedError",
    "AgentUnreachableError",
]
