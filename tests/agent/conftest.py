"""A real agent on a simulated kernel, serving from a task of the test's loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator.agent._server import Agent, run_agent
from orchestrator.luo.sim import SimKernel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    kernel = SimKernel(tmp_path / "kernel")
    async with anyio.create_task_group() as tg:
        a: Agent = await tg.start(
            run_agent, tmp_path / "run" / "agent.sock", tmp_path / "state", kernel
        )
        yield a
        tg.cancel_scope.cancel()
