"""Fault injection, to rehearse failures in any phase, before the kexec or after.

After the kexec (restore, finish) it stands for a third-party plugin too: its
restore step is not resolved before the kexec, so it runs in the engine's
restore phase and the blackout window stays open until it is done.

Options (``with:``, declared in :data:`OPTIONS`):

- ``fail: MESSAGE`` -- raise an error;
- ``transient_failures: N`` -- fail with a transient (retried) error on the
  first N attempts, then succeed;
- ``hang: SECONDS`` -- sleep (to trip a timeout, or to be killed mid-phase);
  with ``until: FILE``, stop as soon as that file exists;
- ``kill_workload: NAME`` -- SIGKILL a demo workload (a workload dies);
- ``kill_self: true`` -- SIGKILL the orchestrator itself (a crash mid-phase);
- ``trace: PATH`` -- append ``<phase>`` / ``<phase>_rollback`` lines to PATH;
- ``registry: DIR`` -- where ``kill_workload`` finds the workload;
- ``rollback_hang: SECONDS`` -- sleep in the rollback (to signal it meanwhile).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from orchestrator import Option, TransientError, hookimpl, option_value

if TYPE_CHECKING:
    from orchestrator import StepContext


OPTIONS = (
    Option("fail", str, "raise an error with this message"),
    Option(
        "transient_failures",
        int,
        "fail with a transient (retried) error on the first N attempts",
        default=0,
        min=0,
        max=100,
    ),
    Option("hang", float, "sleep this many seconds first", min=0, max=86400),
    Option(
        "until",
        str,
        "with hang: stop sleeping as soon as this file exists (a test's cue)",
    ),
    Option(
        "rollback_hang",
        float,
        "sleep this many seconds in the rollback (to signal it meanwhile)",
        min=0,
        max=3600,
    ),
    Option("kill_workload", str, "SIGKILL this demo workload"),
    Option("kill_self", bool, "SIGKILL the orchestrator itself", default=False),
    Option("trace", str, "append `<phase>` and `<phase>_rollback` lines to this file"),
    Option(
        "registry",
        str,
        "where kill_workload finds the workload",
        default_doc="STATE_DIR/workloads",
    ),
)


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
    if opts.get("kill_workload") is not None:
        registry = Path(
            option_value(opts, OPTIONS, "registry") or ctx.state_dir / "workloads"
        )
        info = json.loads((registry / f"{opts['kill_workload']}.json").read_text())
        await _kill_and_wait(int(info["pid"]))
    if ctx.attempt <= int(option_value(opts, OPTIONS, "transient_failures")):
        raise InjectedTransientError(f"transient failure on attempt {ctx.attempt}")
    if opts.get("hang") is not None and opts.get("until") is None:
        await anyio.sleep(float(opts["hang"]))
    elif opts.get("hang") is not None:
        with anyio.move_on_after(float(opts["hang"])):
            while not await anyio.Path(opts["until"]).exists():  # noqa: ASYNC110  (a file)
                await anyio.sleep(0.1)
    if opts.get("fail") is not None:
        raise InjectedError(str(opts["fail"]))


async def _kill_and_wait(pid: int) -> None:
    """SIGKILL *pid* and return once it is dead (at most 10 s): the kill is
    asynchronous, and the next step must find the workload gone, not dying.
    A pidfd becomes readable when its process exits."""
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with anyio.move_on_after(10.0):
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def _undo(ctx: StepContext) -> None:
    _trace(ctx, f"{ctx.step.phase.value}_rollback")
    if ctx.options.get("rollback_hang") is not None:
        await anyio.sleep(float(ctx.options["rollback_hang"]))
        _trace(ctx, f"{ctx.step.phase.value}_rollback_done")


class FaultsPlugin:
    """Fails, hangs or kills on demand, in any phase."""

    name = "faults"
    options = OPTIONS

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

    @hookimpl
    async def lu_restore(self, ctx: StepContext) -> None:
        await _act(ctx)

    @hookimpl
    async def lu_finish(self, ctx: StepContext) -> None:
        await _act(ctx)
