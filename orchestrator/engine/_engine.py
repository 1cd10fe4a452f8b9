"""The engine: runs a playbook's phases through plugin hooks.

Before the kexec every completed step is remembered; any failure -- a hook
raising or timing out after its retries, the blackout budget running out,
the reboot syscall refusing, a signal -- cancels: the rollback hooks of the
completed steps run in reverse order, shielded and bounded in time, the
sessions are closed (the kernel unpreserves their files) and the host is back
in NORMAL. After the kexec there is no way back: ``resume`` restores and
finishes.
"""

from __future__ import annotations

import errno as E
import functools
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread
import pluggy

from orchestrator.errors import (
    JournalError,
    PhaseError,
    PhaseTimeoutError,
    PluginError,
    UnfinishedUpdateError,
)
from orchestrator.luo import KexecError
from orchestrator.luo._kernel import liveupdate_number
from orchestrator.restore._fast import clocks, read_result
from orchestrator.restore._journal import Journal, last_run, resume_command, unfinished
from orchestrator.restore._resume import Plan, read_plan, remove_plan, write_plan

from ._context import RunContext, StepContext
from ._hookspecs import PROJECT, ROLLBACK_SUFFIX, PhaseSpecs
from ._options import Option, check_options
from ._phases import Phase, State
from ._plugins import ENTRY_POINT_GROUP, builtin_entry_points, load_plugin
from ._preserve import open_preserver

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable
    from pathlib import Path

    from tenacity import RetryCallState

    from orchestrator.luo import Kernel

    from ._playbook import Playbook, Step
    from ._preserve import Retriever, SessionParking

logger = logging.getLogger(__name__)

ROLLBACK_BUDGET = 60.0
"""Seconds the whole rollback may take (each rollback hook: its step timeout)."""


_ANNOUNCE = frozenset({"step_start", "phase_start", "retry", "rollback_start"})


class Outcome(Enum):
    COMPLETED = "completed"  # the new kernel runs, workloads restored, FINISH done
    CANCELLED = "cancelled"  # failed before the kexec; the host is back in NORMAL
    FAILED = "failed"  # a step after the kexec or a rollback failed: operator needed
    NOTHING = "nothing"  # resume found nothing to do


class Reporter(Protocol):
    def __call__(self, rec: dict[str, Any]) -> None: ...


def plugin_manager(
    load_entry_points: bool = True,
    extra: Iterable[object] = (),
    builtins: Collection[str] | None = None,
) -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins (all, or those named in
    *builtins*), *extra* ones (each with a ``name``) and the installed
    third-party ones."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PhaseSpecs)
    try:
        for ep in builtin_entry_points(builtins):
            pm.register(load_plugin(ep), name=ep.name)
        for plugin in extra:
            pm.register(plugin, name=getattr(plugin, "name", None))
        if load_entry_points:
            _load_entry_points(pm)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = ", ".join(f"lu_{p.value}" for p in Phase if p.configurable)
        raise PluginError(
            str(exc.plugin), f"{exc} (hooks are {known} and their _rollback)"
        ) from exc
    for name, plugin in pm.list_name_plugin():
        schema = getattr(plugin, "options", None)
        if schema is not None and not (
            isinstance(schema, tuple | list)
            and all(isinstance(o, Option) for o in schema)
        ):
            raise PluginError(
                str(name), "'options' must be a tuple of orchestrator.Option, or absent"
            )
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the third-party plugins of :data:`ENTRY_POINT_GROUP` (every
    installed distribution's but this one's: the built-ins asked for are
    registered already).

    :raises PluginError: an entry point cannot be loaded (see
        :func:`~orchestrator.engine._plugins.load_plugin`).
    """
    from importlib.metadata import entry_points

    # The built-ins are in the group too: those not asked for stay out.
    builtin = {ep.name for ep in builtin_entry_points()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in builtin or pm.get_plugin(ep.name) is not None:
            continue
        if pm.is_blocked(ep.name):
            continue
        pm.register(load_plugin(ep), name=ep.name)


def hook_for(
    pm: pluggy.PluginManager, plugin: str, hook: str
) -> Callable[..., Any] | None:
    """The implementation of *hook* by *plugin*, if it has one."""
    caller = getattr(pm.hook, hook, None)
    if caller is None:
        return None
    for impl in caller.get_hookimpls():
        if impl.plugin_name == plugin:
            return impl.function  # type: ignore[no-any-return]
    return None


def check_playbook(pm: pluggy.PluginManager, playbook: Playbook) -> list[str]:
    """Problems that would stop *playbook*, each starting with ``file:line``.

    Steps naming a plugin that is not loaded or a hook it lacks, and ``with:``
    options the plugin's declared ``options`` refuse (unknown keys, wrong
    types, numbers out of bounds). A plugin that declares no ``options`` gets
    its ``with:`` unchecked.
    """
    problems = []
    for step in playbook.steps():
        plugin = pm.get_plugin(step.plugin)
        if plugin is None:
            known = ", ".join(sorted(n for n, _ in pm.list_name_plugin()))
            problems.append(
                f"{step.where}: unknown plugin {step.plugin!r} (known: {known})"
            )
            continue
        if hook_for(pm, step.plugin, f"lu_{step.phase.value}") is None:
            problems.append(
                f"{step.where}: plugin {step.plugin!r} has no hook for phase "
                f"{step.phase.value} (lu_{step.phase.value})"
            )
        schema = getattr(plugin, "options", None)
        if schema is not None:
            problems.extend(
                f"{step.where.file}:{step.option_lines.get(key, step.where.line)}: "
                f"phases.{step.phase.value}.steps[{step.index}].with.{key}: "
                f"{problem} (plugin {step.plugin!r})"
                for key, problem in check_options(schema, step.options)
            )
    return problems


@dataclass(frozen=True, slots=True)
class Done:
    """A completed step, for the rollback."""

    step: Step


class Engine:
    """Runs one playbook on one kernel, journaling into *state_dir*."""

    def __init__(
        self,
        playbook: Playbook,
        kernel: Kernel,
        state_dir: Path,
        pm: pluggy.PluginManager | None = None,
        reporter: Reporter | None = None,
        owner: str = "cli",
        parking: SessionParking | None = None,
    ) -> None:
        self.playbook = playbook
        self.kernel = kernel
        self.state_dir = state_dir
        self.pm = pm or plugin_manager()
        self.reporter = reporter
        self.owner = owner  # who resumes after the kexec: "cli" or "agent"
        self.parking = parking  # where session fds are parked (the agent's fd store)
        self._handing_off = False  # systemctl kexec asked: signals cannot cancel
        self._handed_off = False  # systemctl kexec said yes: nothing may cancel now
        self._stopped_by: int | None = None  # the signal that came meanwhile
        self.journal = Journal(state_dir, kernel.boot_id())
        self.journal_error: JournalError | None = None
        self._tolerant = False

    # --- journaling --------------------------------------------------------------

    def _log(self, event: str, **fields: Any) -> dict[str, Any]:
        # Records that only announce work need not reach the disk by themselves:
        # recovery looks at what ended. The next durable record flushes them.
        try:
            record = self.journal.append(
                event, durable=event not in _ANNOUNCE, **fields
            )
        except JournalError as exc:
            if not self._tolerant:
                raise
            # Cancelling: the undo matters more than its record. Keep going,
            # and leave the run open in the journal so resume undoes it again.
            if self.journal_error is None:
                logger.error("%s; the rollback goes on without it", exc)
            self.journal_error = exc
            record = {"event": event, **fields}
        if self.reporter is not None:
            try:
                self.reporter(record)
            except OSError as exc:
                # Whoever watched (a closed pipe, a full terminal log) is gone:
                # the update goes on, with the journal as its record.
                logger.warning("progress output stopped: %s", exc)
                self.reporter = None
        return record

    def _state(self, state: State, **fields: Any) -> None:
        self._log("state", state=state.value, **fields)

    # --- steps --------------------------------------------------------------------

    async def _run_step(self, run: RunContext, step: Step) -> None:
        hook = hook_for(self.pm, step.plugin, f"lu_{step.phase.value}")
        if hook is None:
            raise PhaseError(
                step.phase.value, step.name, f"plugin {step.plugin!r} has no hook"
            )
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            try:
                with anyio.fail_after(step.timeout):
                    await hook(ctx=StepContext(step, run, attempts))
            except TimeoutError as exc:
                raise PhaseTimeoutError(
                    step.phase.value,
                    step.name,
                    f"timed out after {step.timeout:g} s (attempt {attempts})",
                ) from exc

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self._log(
                "retry",
                phase=step.phase.value,
                step=step.name,
                attempt=state.attempt_number,
                error=f"{type(exc).__name__}: {exc}",
                wait=state.next_action.sleep if state.next_action else 0.0,
            )

        self._log(
            "step_start",
            phase=step.phase.value,
            step=step.name,
            index=step.index,
            plugin=step.plugin,
        )
        try:
            if step.retry.attempts == 1:
                await attempt()  # no retry loop to build: the common case
            else:
                from ._retry import retrying  # tenacity: only for steps that retry

                async for trying in retrying(step.retry, before_sleep):
                    with trying:
                        await attempt()
        except Exception as exc:
            self._log(
                "step_end",
                phase=step.phase.value,
                step=step.name,
                plugin=step.plugin,
                ok=False,
                attempts=attempts,
                error=_describe(exc),
            )
            if isinstance(exc, PhaseError):
                raise
            raise PhaseError(step.phase.value, step.name, _describe(exc)) from exc
        self._log(
            "step_end",
            phase=step.phase.value,
            step=step.name,
            index=step.index,
            plugin=step.plugin,
            ok=True,
            attempts=attempts,
            records=run.records.get(step.plugin, {}),
            manifest=run.manifest.get(step.plugin, {}),
        )

    async def _run_phase(
        self,
        run: RunContext,
        phase: Phase,
        done: list[Done],
        budget: float | None = None,
    ) -> None:
        plan = self.playbook.plan(phase)
        limits = [t for t in (plan.timeout if plan else None, budget) if t is not None]
        limit = min(limits) if limits else None
        self._log("phase_start", phase=phase.value)
        try:
            with anyio.fail_after(limit):
                for step in plan.steps if plan else ():
                    await self._run_step(run, step)
                    done.append(Done(step))
        except PhaseError as exc:
            # A step failed, or ran out of its own timeout (a PhaseTimeoutError
            # is a TimeoutError too): that is the step's, not the phase's budget.
            self._log("phase_end", phase=phase.value, ok=False, error=str(exc))
            raise
        except TimeoutError as exc:
            what = (
                "the blackout budget"
                if budget is not None and limit == budget
                else "its budget"
            )
            self._log(
                "phase_end", phase=phase.value, ok=False, error=f"exceeded {what}"
            )
            raise PhaseTimeoutError(
                phase.value, "*", f"exceeded {what} of {limit:g} s"
            ) from exc
        except BaseException as exc:
            self._log("phase_end", phase=phase.value, ok=False, error=_describe(exc))
            raise
        self._log("phase_end", phase=phase.value, ok=True)

    # --- the update, old kernel ---------------------------------------------------

    def _new_run(self) -> RunContext:
        return RunContext(
            run_id=uuid.uuid4().hex[:12],
            playbook=self.playbook,
            kernel=self.kernel,
            journal=self.journal,
            state_dir=self.state_dir,
        )

    def _check_no_unfinished(self) -> None:
        """Refuse to start while an earlier update has not ended (any boot)."""
        left = unfinished(self.journal.records())
        if left:
            raise _unfinished_error(left, self.kernel, self.state_dir)

    async def run(self) -> Outcome:
        """Quiesce, preserve, prepare, freeze and kexec; cancel on any failure.

        Returns only when the update was cancelled (the kexec does not return).

        :raises UnfinishedUpdateError: an earlier update must be resumed first.
        :raises JournalError: the journal cannot be read or written.
        """
        with self.journal.locked("run"):
            self._check_no_unfinished()
            self.journal.rotate_if_large()
            run = self._new_run()
            digest = _save_playbook(self.playbook.path, self.state_dir)
            self._log(
                "run_start",
                run=run.run_id,
                playbook=str(self.playbook.path),
                playbook_sha256=digest,
                name=self.playbook.name,
                kernel=self.kernel.spec,
                owner=self.owner,
                pid=os.getpid(),
            )
            self._state(State.NORMAL)
            done: list[Done] = []
            # The receiver stays open through the rollback: a second SIGTERM or
            # SIGINT then lands in it and is ignored, and the undo goes on.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                try:
                    async with anyio.create_task_group() as tg:

                        async def cancel_on_signal() -> None:
                            async for signum in signals:
                                name = signal.Signals(signum).name
                                self._log("signal", signal=name)
                                if self._handing_off:
                                    # systemd's shutdown stopping this process:
                                    # too late to cancel; dealt with below.
                                    self._stopped_by = signum
                                    continue
                                raise PhaseError("*", "*", f"cancelled by {name}")

                        tg.start_soon(cancel_on_signal)
                        await self._forward(run, done)
                        tg.cancel_scope.cancel()
                except BaseException as exc:
                    outcome = await self._cancel(run, done, _describe(exc))
                    if not isinstance(exc, Exception):
                        raise
                    return outcome
            if self._handed_off:
                # systemd is shutting the host down, and stops this process on
                # its way: SIGTERM has its default action again (the receiver
                # is closed), and the sessions are in the fd store. A signal
                # that came while systemctl ran is raised again, to that end.
                if self._stopped_by is not None:
                    signal.raise_signal(self._stopped_by)
                await anyio.sleep_forever()
        raise AssertionError("unreachable: the kexec returned")

    async def _cancel(self, run: RunContext, done: list[Done], error: str) -> Outcome:
        """Undo *done* in reverse order; the journal failing never skips the undo."""
        self._tolerant = True  # from here on a journal failure is reported, not raised
        self._log("cancel_start", error=error)
        self._state(State.CANCELLING)
        ok = False
        with anyio.move_on_after(ROLLBACK_BUDGET, shield=True):
            ok = await self._rollback(run, done)
        self._state(State.NORMAL if ok else State.FAILED)
        outcome = Outcome.CANCELLED if ok else Outcome.FAILED
        self._log("run_end", outcome=outcome.value, error=error)
        if self.journal_error is None:
            remove_plan(self.state_dir)
        self._tolerant = False
        return outcome

    async def _forward(self, run: RunContext, done: list[Done]) -> None:
        nk = self.playbook.next_kernel
        via = nk.via if nk is not None else "syscall"
        if via == "systemd":
            await self._check_via_systemd()
        run.preserver = await anyio.to_thread.run_sync(
            functools.partial(
                open_preserver, self.kernel, self.parking, must_park=via == "systemd"
            )
        )
        self._log("abi", abi=run.preserver.abi)
        if via == "systemd" and run.preserver.abi != "merged":
            raise PhaseError(
                Phase.KEXEC.value,
                "via systemd",
                "systemd keeps only the merged ABI's sessions: use next_kernel.via: syscall",
            )
        await self._run_phase(run, Phase.QUIESCE, done)
        await self._run_phase(run, Phase.PRESERVE, done)
        await self._run_phase(run, Phase.PREPARE, done)
        await anyio.to_thread.run_sync(run.preserver.prepare)
        if via == "systemd":
            await self._check_via_systemd()  # every session is parked by now
        plan = Plan(
            run.run_id,
            self.journal.boot_id,
            self.kernel.spec,
            run.preserver.abi,
            _session_names(run),
            self.owner,
            self._restore_actions(run),
        )
        write_plan(self.state_dir, plan)  # for the restore path: no JSON to parse
        await anyio.to_thread.run_sync(os.sync)  # outside the blackout
        self._state(State.PREPARED)
        self._log("blackout_start")
        await self._run_phase(
            run, Phase.FREEZE, done, budget=self.playbook.blackout_budget
        )
        self._state(State.FROZEN)
        self._log("kexec", phase=Phase.KEXEC.value, via=via)
        if via == "systemd":
            # The shutdown may stop this process before systemctl returns: from
            # the moment it is asked, a signal must not cancel (and unpark).
            self._handing_off = True
            try:
                await anyio.to_thread.run_sync(_sync_and_hand_off)
            except KexecError as exc:
                raise PhaseError(Phase.KEXEC.value, "systemctl", str(exc)) from exc
            self._handed_off = True
            return
        try:
            await anyio.to_thread.run_sync(_sync_and_kexec, self.kernel)
        except KexecError as exc:
            raise PhaseError(Phase.KEXEC.value, "reboot", str(exc)) from exc

    async def _check_via_systemd(self) -> None:
        """Refuse ``via: systemd`` unless systemd will keep the parked sessions."""
        parking = self.parking
        why = (
            "only the agent can (run it with `liveupdate run --agent`)"
            if parking is None
            else await anyio.to_thread.run_sync(parking.kexec_via_systemd_refusal)
        )
        if why is not None:
            raise PhaseError(
                Phase.KEXEC.value,
                "via systemd",
                f"systemctl kexec would lose the sessions: {why}; "
                "use next_kernel.via: syscall",
            )

    def _restore_actions(self, run: RunContext) -> list[str]:
        """The restore steps resolved now, for the restore path to run first.

        A plugin that can say, before the kexec, which commands bring its
        workloads back has a ``lu_restore_plan(ctx)`` method returning spawn
        actions (:mod:`orchestrator.restore._fast`); the others' restores run
        in the engine's restore phase. A plugin that cannot resolve its step
        (an exception) is logged and restored the usual way.
        """
        import json

        plan = self.playbook.plan(Phase.RESTORE)
        out: list[str] = []
        for step in plan.steps if plan else ():
            resolve = getattr(self.pm.get_plugin(step.plugin), "lu_restore_plan", None)
            if resolve is None:
                continue
            try:
                actions = resolve(StepContext(step, run, 1))
                lines = [
                    json.dumps(
                        {**a, "index": step.index, "step": step.name},
                        separators=(",", ":"),
                    )
                    for a in actions or ()
                ]
            except Exception as exc:  # noqa: BLE001  (the restore phase does it)
                logger.warning(
                    "step %s: cannot resolve its restore before the kexec (%s); "
                    "it runs in the restore phase",
                    step.name,
                    _describe(exc),
                )
                continue
            out += lines
        return out

    async def _rollback(self, run: RunContext, done: Iterable[Done]) -> bool:
        """Undo completed steps in reverse order; True when all undo steps succeeded."""
        ok = True
        for item in reversed(list(done)):
            step = item.step
            hook = hook_for(
                self.pm, step.plugin, f"lu_{step.phase.value}{ROLLBACK_SUFFIX}"
            )
            if hook is None:
                continue
            self._log("rollback_start", phase=step.phase.value, step=step.name)
            try:
                with anyio.fail_after(step.timeout):
                    await hook(ctx=StepContext(step, run, 1))
            except Exception as exc:  # noqa: BLE001  (a failed undo is reported, the rest still run)
                ok = False
                self._log(
                    "rollback_end",
                    phase=step.phase.value,
                    step=step.name,
                    ok=False,
                    error=_describe(exc),
                )
            else:
                self._log(
                    "rollback_end", phase=step.phase.value, step=step.name, ok=True
                )
        if run.preserver is not None:
            try:
                await anyio.to_thread.run_sync(run.preserver.cancel)
                self._log("sessions_closed")
            except Exception as exc:  # noqa: BLE001  (a failed undo is reported, the rest still run)
                ok = False
                self._log("sessions_closed", ok=False, error=_describe(exc))
        return ok

    # --- after a crash or a kexec -------------------------------------------------

    async def resume(self, prefetched: tuple[Plan, Retriever] | None = None) -> Outcome:
        """Continue the last run: restore and finish in a new kernel, or cancel
        when the orchestrator died before the kexec.

        Everything that can be checked is checked before anything is undone
        or restored; the sessions are held by the keeper (:mod:`._keeper`)
        meanwhile, so a resume that stops -- refused, failed or killed -- can
        be run again and goes on from where it was.

        :param prefetched: the restore plan and the keeper that
            ``orchestrator.restore._resume`` had retrieve the sessions before anything
            heavy was imported.
        :raises JournalError: the journal cannot be read, is damaged, or does
            not match the restore plan (nothing was touched).
        """
        with self.journal.locked("resume"):
            records = last_run(self.journal.records())
            plan = (
                prefetched[0] if prefetched is not None else read_plan(self.state_dir)
            )
            if plan is not None and (not records or plan.run_id != records[0]["run"]):
                last = records[0]["run"] if records else "none (the journal is empty)"
                raise JournalError(
                    f"the restore plan is for run {plan.run_id}, the journal's last "
                    f"run is {last}: not resuming a run I cannot verify (was the "
                    f"journal {self.journal.path} replaced or emptied?)"
                )
            if not records or any(r["event"] == "run_end" for r in records):
                if prefetched is not None:
                    # The run ended before its plan was removed: whatever the
                    # keeper found then is nothing of this run's to keep.
                    prefetched[1].finish()
                remove_plan(self.state_dir)
                return Outcome.NOTHING
            self._use_recorded_playbook(records[0])
            run, done, _state, kexec = _replay(records, self._new_run())
            now = self.journal.boot_id
            if kexec is not None and kexec["boot_id"] != now:
                keeper = prefetched[1] if prefetched is not None else None
                return await self._restore(run, records, keeper)
            if records[-1]["boot_id"] != now:
                return self._rebooted(
                    "the host rebooted (not through the kexec) before the update "
                    "reached it: nothing of it is left to undo"
                )
            self._log(
                "resume",
                action="cancel",
                reason="the orchestrator stopped before the kexec",
            )
            run.preserver = _DeadSessions(self.kernel, run)
            return await self._cancel(
                run, done, "orchestrator stopped before the kexec"
            )

    def state_after_kexec(self) -> bool:
        """Whether the last run of the journal is past its kexec (in this boot)."""
        records = last_run(self.journal.records())
        return bool(_after_kexec(records))

    def _rebooted(self, why: str) -> Outcome:
        """Close a run that a plain reboot ended: nothing to undo or restore."""
        self._log("resume", action="close", reason=why)
        self._state(State.NORMAL)
        self._log("run_end", outcome=Outcome.CANCELLED.value, error=why)
        remove_plan(self.state_dir)
        return Outcome.CANCELLED

    def _use_recorded_playbook(self, start: dict[str, Any]) -> None:
        """Resume with the playbook the run started with, even if it was edited."""
        recorded = start.get("playbook_sha256")
        if recorded is None or _sha256_of(self.playbook.path) == recorded:
            return
        copy = self.state_dir / RUN_PLAYBOOK
        if _sha256_of(copy) != recorded:
            raise JournalError(
                f"the playbook {self.playbook.path} changed since run {start['run']} "
                f"started, and its copy {copy} is missing or differs: put the "
                "original back, then run resume again"
            )
        from ._playbook import parse_playbook

        self.playbook = parse_playbook(
            copy.read_text(encoding="utf-8"),
            str(self.playbook.path),
            base_dir=self.playbook.path.parent,
        )
        self._log(
            "playbook_changed",
            path=str(self.playbook.path),
            using=str(copy),
            sha256=recorded,
        )

    async def _restore(
        self,
        run: RunContext,
        records: list[dict[str, Any]],
        prefetched: Retriever | None,
    ) -> Outcome:
        abi = next((r["abi"] for r in records if r["event"] == "abi"), "merged")
        names = _session_names(run)
        if prefetched is None:
            from orchestrator.restore._keeper import Keeper

            keeper: Retriever = await anyio.to_thread.run_sync(
                Keeper.ensure, self.kernel, self.state_dir, run.run_id, abi, names
            )
        else:
            keeper = prefetched
        stored = self.parking.stored if self.parking is not None else {}
        for name in [n for n in keeper.missing if n in stored]:
            # systemd retrieved it (``systemctl kexec``) and handed it back
            await anyio.to_thread.run_sync(keeper.adopt, name, stored[name])
            self._log("resume", action="adopt", session=name)
        run.retriever = keeper
        # The kernel's word on this boot: did the planned sessions come through?
        none_came = bool(keeper.missing) and set(keeper.missing) >= set(
            names or ["rfc"]
        )
        after = _after_kexec(records)
        finished = {r["phase"] for r in after if r["event"] == "phase_end" and r["ok"]}
        if any(r["event"] == "kernel_finish" for r in after) or (
            Phase.FINISH.value in finished and none_came
        ):
            # An earlier resume FINISHed and stopped before it said so.
            return self._completed(keeper)
        if none_came:
            return await self._lost(keeper)
        states = [r["state"] for r in after if r["event"] == "state"]
        if states[-1:] != [State.UPDATED.value]:
            self._state(State.UPDATED)
        try:
            # Run again in full after an interrupted resume: restore hooks are
            # idempotent, and owners that live in a process (the agent's
            # registrations) must be restored in this one.
            fast = read_result(self.state_dir, run.run_id)
            if fast is not None and fast.get("boot_id") == self.journal.boot_id:
                # What the restore path did before this engine was loaded.
                self._log(
                    "restore_path",
                    begin_wall=fast["begin"]["wall"],
                    # The actions' started/ready times are on this clock.
                    begin_mono=fast["begin"]["mono"],
                    end_wall=fast["end"]["wall"],
                    seconds=round(fast["end"]["mono"] - fast["begin"]["mono"], 6),
                    done=fast["done"],
                    actions=fast["actions"],
                )
            await self._run_phase(run, Phase.RESTORE, [])
            self._log("blackout_end", **self._blackout(records, fast))
            # Reading the kernel log is not blackout work: only now.
            self._log("kernel", liveupdate_number=liveupdate_number(self.kernel))
            await self._run_phase(run, Phase.FINISH, [])
        except Exception as exc:  # noqa: BLE001  (after the kexec: journaled, kept for a retry)
            self._state(State.FAILED)
            self._log(
                "resume_failed",
                error=_describe(exc),
                keeper_pid=keeper.pid,
            )
            return Outcome.FAILED
        return self._completed(keeper)

    def _blackout(
        self, records: list[dict[str, Any]], fast: dict[str, Any] | None
    ) -> dict[str, Any]:
        """When the blackout ended, and how long it was on each clock.

        It ended when the restore path's spawn actions were all done if every
        restore step was among them (:mod:`orchestrator.restore._fast`), else
        now, after the restore phase. ``mono_s`` adds the old kernel's
        monotonic time from the freeze to the ``kexec`` record and the new
        kernel's boot time (CLOCK_BOOTTIME) at the end: neither clock jumps,
        and what neither sees -- the reboot syscall, purgatory, the new
        kernel's start before its clock -- is ``unseen``: not in ``mono_s``.
        ``wall_s`` is the two kernels' wall clocks subtracted (as good as
        they agree): a cross-check, whose excess over ``mono_s`` estimates
        the unseen part.
        """
        plan = self.playbook.plan(Phase.RESTORE)
        steps = {s.index for s in plan.steps} if plan else set()
        if (
            fast is not None
            and fast.get("boot_id") == self.journal.boot_id
            and (steps <= set(fast.get("done", ())))
        ):
            end, by = fast["end"], "restore-path"
        else:
            end, by = clocks(self.kernel), "restore-phase"
        fields: dict[str, Any] = {"ended_by": by, "end_wall": end["wall"]}
        start = next((r for r in records if r["event"] == "blackout_start"), None)
        kexec = next((r for r in records if r["event"] == "kexec"), None)
        if start is None or kexec is None:
            return fields
        old_s = float(kexec["mono"]) - float(start["mono"])
        new_s = float(end["boottime"])
        fields.update(
            old_s=round(old_s, 6),
            new_s=round(new_s, 6),
            mono_s=round(old_s + new_s, 6),
            wall_s=round(float(end["wall"]) - float(start["wall"]), 6),
        )
        return fields

    def _completed(self, keeper: Retriever) -> Outcome:
        # Every owner holds its fds: the kernel may let go. (After an earlier
        # resume that FINISHed, the keeper holds nothing, and just exits.)
        keeper.finish()
        self._log("kernel_finish")
        self._state(State.NORMAL)
        self._log("run_end", outcome=Outcome.COMPLETED.value)
        remove_plan(self.state_dir)
        return Outcome.COMPLETED

    async def _lost(self, keeper: Retriever) -> Outcome:
        """The new boot has none of the sessions: not a live update's boot."""
        await anyio.to_thread.run_sync(keeper.finish)  # holds nothing; let it go
        why = (
            "this boot has none of the preserved sessions: the host was rebooted "
            "(or kexec'd) without the live update, and its data did not come through"
        )
        self._log("resume", action="close", reason=why)
        self._state(State.FAILED)
        self._log("run_end", outcome=Outcome.FAILED.value, error=why)
        remove_plan(self.state_dir)
        return Outcome.FAILED


class _DeadSessions:
    """The sessions of an orchestrator that died: the kernel dropped them when
    their fds closed (merged ABI); on the RFC ABI they must be cancelled."""

    abi = "merged"

    def __init__(self, kernel: Kernel, run: RunContext) -> None:
        self.kernel = kernel
        self.tokens = [
            int(e["token"])
            for m in run.manifest.values()
            for e in m.values()
            if "session" not in e
        ]

    def preserve(
        self, owner: str, key: str, fd: int, group: str | None = None
    ) -> dict[str, Any]:
        raise RuntimeError("cannot preserve while cancelling")

    def prepare(self) -> None:
        raise RuntimeError("cannot prepare while cancelling")

    def close_device(self) -> None:
        pass

    def cancel(self) -> None:
        if not self.tokens:
            return
        from orchestrator.luo import RfcDevice, RfcState, TokenNotFoundError

        with RfcDevice.open(self.kernel) as dev:
            if dev.state() in (RfcState.PREPARED, RfcState.FROZEN):
                dev.cancel()
            for token in self.tokens:
                try:
                    dev.unpreserve_fd(token)
                except TokenNotFoundError:
                    pass


def _replay(
    records: list[dict[str, Any]], run: RunContext
) -> tuple[RunContext, list[Done], str | None, dict[str, Any] | None]:
    """Rebuild a run's records, manifest, completed steps and state from its journal."""
    steps = {(s.phase.value, s.index): s for s in run.playbook.steps()}
    done: list[Done] = []
    state: str | None = None
    kexec: dict[str, Any] | None = None
    for rec in records:
        event = rec["event"]
        if event == "run_start":
            run.run_id = rec["run"]
        elif event == "state":
            state = rec["state"]
        elif event == "kexec":
            kexec = rec
        elif event == "step_end" and rec.get("ok"):
            plugin = rec["plugin"]
            run.records[plugin] = rec.get("records", {})
            if rec.get("manifest"):
                run.manifest[plugin] = rec["manifest"]
            step = steps.get((str(rec["phase"]), int(rec.get("index", -1))))
            if step is not None and step.name != rec["step"]:
                raise JournalError(
                    f"the journal's step {rec['step']!r} ({rec['phase']} "
                    f"#{rec.get('index')}) is not the playbook's {step.name!r}: "
                    "the playbook does not match the run"
                )
            if step is not None and step.phase.is_reversible:
                done.append(Done(step))
    return run, done, state, kexec


def _session_names(run: RunContext) -> list[str]:
    return sorted(
        {
            e["session"]
            for m in run.manifest.values()
            for e in m.values()
            if "session" in e
        }
    )


def _after_kexec(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, rec in enumerate(records):
        if rec["event"] == "kexec":
            return [r for r in records[i + 1 :] if r["boot_id"] != rec["boot_id"]]
    return []


RUN_PLAYBOOK = "run-playbook.yaml"
"""The copy of the running update's playbook, in the state dir."""


def _sha256_of(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _save_playbook(path: Path, state_dir: Path) -> str | None:
    """Keep a copy of the playbook for resume; its SHA-256 (None: no file)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    import hashlib

    tmp = state_dir / (RUN_PLAYBOOK + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(E.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, state_dir / RUN_PLAYBOOK)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise JournalError(
            f"cannot keep a copy of the playbook in {state_dir}: "
            f"{exc.strerror or exc}; nothing was started"
        ) from exc
    return hashlib.sha256(data).hexdigest()


def _unfinished_error(
    records: list[dict[str, Any]], kernel: Kernel, state_dir: Path
) -> UnfinishedUpdateError:
    state = next(
        (r["state"] for r in reversed(records) if r["event"] == "state"), "NORMAL"
    )
    kexec = next((r for r in records if r["event"] == "kexec"), None)
    after = kexec is not None and kexec["boot_id"] != kernel.boot_id()
    return UnfinishedUpdateError(
        records[0]["run"], state, after, resume_command(records[0], state_dir)
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        # Not the library's words ("Cancelled via cancel scope 7f..."): what
        # cancelled it (a signal, a failure elsewhere) is reported on its own.
        return "cancelled"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.errno is not None and not str(exc):
        return E.errorcode.get(exc.errno, str(exc.errno))
    return (
        f"{type(exc).__name__}: {exc}" if not isinstance(exc, PhaseError) else str(exc)
    )


#: How the kexec is handed to systemd: queued, not waited for (the shutdown
#: stops this process).
SYSTEMCTL_KEXEC: tuple[str, ...] = ("systemctl", "--no-block", "kexec")


def _sync_and_hand_off() -> None:
    """Have systemd start the loaded kernel after an orderly shutdown.

    :raises KexecError: systemctl refused (nothing was started).
    """
    import subprocess

    os.sync()
    try:
        done = subprocess.run(
            SYSTEMCTL_KEXEC, capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KexecError(E.EIO, " ".join(SYSTEMCTL_KEXEC), str(exc)) from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise KexecError(E.EIO, " ".join(SYSTEMCTL_KEXEC), said)


def _sync_and_kexec(kernel: Kernel) -> None:
    """Start the next kernel, with what was written since PREPARE's sync on disk.

    ``reboot(LINUX_REBOOT_CMD_KEXEC)``, unlike ``kexec -e``, does not sync:
    a file written during the freeze (a service's log, a file a workload
    wrote before it stopped) would be lost with the page cache. The bulk went
    out at PREPARE, outside the window, so this one is short.
    """
    os.sync()
    kernel.reboot_kexec()
