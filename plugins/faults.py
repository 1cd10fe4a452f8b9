"""Fault injection, to rehearse failures in any phase before the kexec.

Options (``with:``):

- ``fail: MESSAGE`` -- raise an error;
- ``transient_failures: N`` -- fail with a transient (retried) error on the
  first N attempts, then succeed;
- ``hang: SECONDS`` -- sleep (to trip a timeout, or to be killed mid-phase);
- ``kill_workload: NAME`` -- SIGKILL a demo workload (a workload dies);
- ``kill_self: true`` -- SIGKILL the orchestrator itself (a crash mid-phase);
- ``trace: PATH`` -- append ``<phase>`` / ``<phase>_rollback`` lines to PATH;
- ``rollback_hang: SECONDS`` -- sleep in the rollback (to signal it meanwhile).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from orchestrator import TransientError, hookimpl

if TYPE_CHECKING:
    from orchestrator import StepContext


class InjectedError(Exception):
    """The failure a playbook asked for."""


class InjectedTransientError(InjectedError, TransientError):
    """A failure that goes away after some attempts."""


def _trace(ctx: StepContext, what: str) -> None:
    path = ctx.options.get("trace")
    if path:
        with open(path, "a") as f:
            f.write(f"{what}\n")


async def _act(ctx: StepContext) -> None:
    opts = ctx.options
    _trace(ctx, ctx.step.phase.value)
    if opts.get("kill_self"):
        os.kill(os.getpid(), signal.SIGKILL)
    if "kill_workload" in opts:
        registry = Path(opts.get("registry") or ctx.state_dir / "workloads")
        info = json.loads((registry / f"{opts['kill_workload']}.json").read_text())
        os.kill(int(info["pid"]), signal.SIGKILL)
    if ctx.attempt <= int(opts.get("transient_failures", 0)):
        raise InjectedTransientError(f"transient failure on attempt {ctx.attempt}")
    if "hang" in opts:
        await anyio.sleep(float(opts["hang"]))
    if "fail" in opts:
        raise InjectedError(str(opts["fail"]))


async def _undo(ctx: StepContext) -> None:
    _trace(ctx, f"{ctx.step.phase.value}_rollback")
    if "rollback_hang" in ctx.options:
        await anyio.sleep(float(ctx.options["rollback_hang"]))
        _trace(ctx, f"{ctx.step.phase.value}_rollback_done")


class FaultsPlugin:
    name = "faults"

    @hookimpl
    async def lu_quiesce(self, ctx: StepContext) -> None:
        await _act(ctx)

    @hookimpl
    async def lu_quiesce_rollback(self, ctx: StepContext) -> None:
        await _undo(ctx)

    @hookimpl
    async def lu_preserve(self, ctx: StepContext) -> None:
        await _act(ctx)

    @hookimpl
    async def lu_preserve_rollback(self, ctx: StepContext) -> None:
        await _undo(ctx)

    @hookimpl
    async def lu_prepare(self, ctx: StepContext) -> None:
        await _act(ctx)

    @hookimpl
    async def lu_prepare_rollback(self, ctx: StepContext) -> None:
        await _undo(ctx)

    @hookimpl
    async def lu_freeze(self, ctx: StepContext) -> None:
        await _act(ctx)

    @hookimpl
    async def lu_freeze_rollback(self, ctx: StepContext) -> None:
        await _undo(ctx)
