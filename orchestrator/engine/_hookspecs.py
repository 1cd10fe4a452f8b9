"""Hook specifications: one async hook per phase, and its rollback.

A plugin implements the hooks of the phases it takes part in::

    from orchestrator import hookimpl, StepContext

    class MyPlugin:
        name = "my-plugin"

        @hookimpl
        async def lu_freeze(self, ctx: StepContext) -> None: ...

        @hookimpl
        async def lu_freeze_rollback(self, ctx: StepContext) -> None: ...

The engine calls only the plugin a playbook step names, awaits it under the
step's timeout and retry policy, and on CANCEL calls the ``_rollback`` hook
of every completed step in reverse order. Rollback hooks must be idempotent:
after a crash, ``liveupdate resume`` may run them again from the journal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._context import StepContext

PROJECT = "liveupdate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PhaseSpecs:
    """The hooks of every phase (the kexec itself belongs to the engine)."""

    @hookspec
    async def lu_quiesce(self, ctx: StepContext) -> None:
        """Bring workloads to a state that can be preserved (e.g. flush, pause I/O).

        Runs first, in the old kernel, workloads still running. Idempotent.
        """

    @hookspec
    async def lu_quiesce_rollback(self, ctx: StepContext) -> None:
        """Undo :meth:`lu_quiesce`: workloads back to normal service."""

    @hookspec
    async def lu_preserve(self, ctx: StepContext) -> None:
        """Hand fds to preserve to ``ctx.preserve()``; the heavy step, before the blackout."""

    @hookspec
    async def lu_preserve_rollback(self, ctx: StepContext) -> None:
        """Undo :meth:`lu_preserve` beyond what the engine does (it closes the sessions)."""

    @hookspec
    async def lu_prepare(self, ctx: StepContext) -> None:
        """Everything heavy left before the freeze, e.g. load the next kernel."""

    @hookspec
    async def lu_prepare_rollback(self, ctx: StepContext) -> None:
        """Undo :meth:`lu_prepare`, e.g. unload the next kernel."""

    @hookspec
    async def lu_freeze(self, ctx: StepContext) -> None:
        """Pause workloads: the blackout window starts. Bounded by the blackout budget."""

    @hookspec
    async def lu_freeze_rollback(self, ctx: StepContext) -> None:
        """Resume paused workloads (the update was cancelled)."""

    @hookspec
    async def lu_restore(self, ctx: StepContext) -> None:
        """In the new kernel: take fds back with ``ctx.retrieve()`` and restart workloads.

        Must be idempotent: a resume that was interrupted runs the whole
        restore phase again, and ``ctx.retrieve()`` then hands back the same
        files (the keeper holds them), so adopt what an earlier attempt
        started rather than starting it twice.
        """

    @hookspec
    async def lu_finish(self, ctx: StepContext) -> None:
        """In the new kernel, after every restore: final checks and clean-up.

        Idempotent too (run again after an interrupted resume). The kernel
        FINISHes the sessions after this phase: files not taken by then are
        gone.
        """


ROLLBACK_SUFFIX = "_rollback"
