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

from ._context import RunContext, StepContext
from ._errors import PhaseError, PhaseTimeoutError, PluginError
from ._hookspecs import PROJECT, ROLLBACK_SUFFIX, PhaseSpecs
from ._journal import Journal, JournalError, last_run, read_journal
from ._phases import Phase, State
from ._preserve import Retriever, open_preserver
from ._resume import Plan, remove_plan, write_plan
from .luo import KexecError

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable
    from pathlib import Path

    from tenacity import RetryCallState

    from ._playbook import Playbook, Step
    from .luo import Kernel

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "liveupdate.plugins"
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
    from plugins import BUILTINS

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PhaseSpecs)
    try:
        for plugin in [*BUILTINS(builtins), *extra]:
            pm.register(plugin, name=getattr(plugin, "name", None))
        if load_entry_points:
            _load_entry_points(pm)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = ", ".join(f"lu_{p.value}" for p in Phase if p.configurable)
        raise PluginError(
            str(exc.plugin), f"{exc} (hooks are {known} and their _rollback)"
        ) from exc
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the third-party plugins of :data:`ENTRY_POINT_GROUP`.

    An entry point names a module, an object, or a class (``module:Class``,
    the shape ``_hookspecs`` shows). A class is instantiated here: pluggy's
    ``load_setuptools_entrypoints`` would register the class itself, and every
    hook would then be called without ``self``.

    :raises PluginError: an entry point cannot be imported, or its class
        cannot be instantiated without arguments.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            if isinstance(plugin, type):
                plugin = plugin()
        except Exception as exc:
            raise PluginError(
                ep.name, f"cannot load {ep.value!r}: {type(exc).__name__}: {exc}"
            ) from exc
        pm.register(plugin, name=ep.name)


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
    """Problems that would stop *playbook* (steps naming hooks no plugin has)."""
    problems = []
    for step in playbook.steps():
        if pm.get_plugin(step.plugin) is None:
            known = ", ".join(sorted(n for n, _ in pm.list_name_plugin()))
            problems.append(
                f"{step.where}: unknown plugin {step.plugin!r} (known: {known})"
            )
        elif hook_for(pm, step.plugin, f"lu_{step.phase.value}") is None:
            problems.append(
                f"{step.where}: plugin {step.plugin!r} has no hook for phase "
                f"{step.phase.value} (lu_{step.phase.value})"
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
    ) -> None:
        self.playbook = playbook
        self.kernel = kernel
        self.state_dir = state_dir
        self.pm = pm or plugin_manager()
        self.reporter = reporter
        self.journal = Journal(state_dir, kernel.boot_id())

    # --- journaling --------------------------------------------------------------

    def _log(self, event: str, **fields: Any) -> dict[str, Any]:
        # Records that only announce work need not reach the disk by themselves:
        # recovery looks at what ended. The next durable record flushes them.
        record = self.journal.append(event, durable=event not in _ANNOUNCE, **fields)
        if self.reporter is not None:
            self.reporter(record)
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
                error=f"{type(exc).__name__}: {exc}",
            )
            if isinstance(exc, PhaseError):
                raise
            raise PhaseError(
                step.phase.value, step.name, f"{type(exc).__name__}: {exc}"
            ) from exc
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

    async def run(self) -> Outcome:
        """Quiesce, preserve, prepare, freeze and kexec; cancel on any failure.

        Returns only when the update was cancelled (the kexec does not return).
        """
        with self.journal.locked("run"):
            run = self._new_run()
            self._log(
                "run_start",
                run=run.run_id,
                playbook=str(self.playbook.path),
                name=self.playbook.name,
                kernel=self.kernel.spec,
                pid=os.getpid(),
            )
            self._state(State.NORMAL)
            done: list[Done] = []
            try:
                with anyio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT
                ) as signals:
                    async with anyio.create_task_group() as tg:

                        async def cancel_on_signal() -> None:
                            async for signum in signals:
                                self._log("signal", signal=signal.Signals(signum).name)
                                raise PhaseError(
                                    "*",
                                    "*",
                                    f"cancelled by {signal.Signals(signum).name}",
                                )

                        tg.start_soon(cancel_on_signal)
                        await self._forward(run, done)
                        tg.cancel_scope.cancel()
            except BaseException as exc:
                error = _describe(exc)
                self._log("cancel_start", error=error)
                self._state(State.CANCELLING)
                ok = False
                with anyio.move_on_after(ROLLBACK_BUDGET, shield=True):
                    ok = await self._rollback(run, done)
                self._state(State.NORMAL if ok else State.FAILED)
                remove_plan(self.state_dir)
                outcome = Outcome.CANCELLED if ok else Outcome.FAILED
                self._log("run_end", outcome=outcome.value, error=error)
                if not isinstance(exc, Exception):
                    raise
                return outcome
        raise AssertionError("unreachable: the kexec returned")

    async def _forward(self, run: RunContext, done: list[Done]) -> None:
        run.preserver = await anyio.to_thread.run_sync(open_preserver, self.kernel)
        self._log("abi", abi=run.preserver.abi)
        await self._run_phase(run, Phase.QUIESCE, done)
        await self._run_phase(run, Phase.PRESERVE, done)
        await self._run_phase(run, Phase.PREPARE, done)
        await anyio.to_thread.run_sync(run.preserver.prepare)
        sessions = sorted(
            {
                e["session"]
                for m in run.manifest.values()
                for e in m.values()
                if "session" in e
            }
        )
        plan = Plan(
            run.run_id,
            self.journal.boot_id,
            self.kernel.spec,
            run.preserver.abi,
            sessions,
        )
        write_plan(self.state_dir, plan)  # for the restore path: no JSON to parse
        await anyio.to_thread.run_sync(os.sync)  # outside the blackout
        self._state(State.PREPARED)
        self._log("blackout_start")
        await self._run_phase(
            run, Phase.FREEZE, done, budget=self.playbook.blackout_budget
        )
        self._state(State.FROZEN)
        self._log("kexec", phase=Phase.KEXEC.value)
        try:
            await anyio.to_thread.run_sync(self.kernel.reboot_kexec)
        except KexecError as exc:
            raise PhaseError(Phase.KEXEC.value, "reboot", str(exc)) from exc

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

        :param prefetched: the sessions ``orchestrator._resume`` retrieved from
            the restore plan before anything heavy was imported.
        """
        with self.journal.locked("resume"):
            records = last_run(read_journal(self.state_dir))
            run, done, _state, kexec = _replay(records, self._new_run())
            retriever = None
            if prefetched is not None:
                plan, retriever = prefetched
                if plan.run_id != run.run_id:
                    raise JournalError(
                        f"the restore plan is for run {plan.run_id}, the journal's "
                        f"last run is {run.run_id}: not resuming a run I cannot verify"
                    )
            if not records or any(r["event"] == "run_end" for r in records):
                remove_plan(self.state_dir)
                return Outcome.NOTHING
            if kexec is not None and kexec["boot_id"] != self.journal.boot_id:
                return await self._restore(run, records, retriever)
            self._log(
                "resume",
                action="cancel",
                reason="the orchestrator stopped before the kexec",
            )
            self._state(State.CANCELLING)
            run.preserver = _DeadSessions(self.kernel, run)
            with anyio.move_on_after(ROLLBACK_BUDGET, shield=True):
                ok = await self._rollback(run, done)
            self._state(State.NORMAL if ok else State.FAILED)
            remove_plan(self.state_dir)
            outcome = Outcome.CANCELLED if ok else Outcome.FAILED
            self._log(
                "run_end",
                outcome=outcome.value,
                error="orchestrator stopped before the kexec",
            )
            return outcome

    async def _restore(
        self,
        run: RunContext,
        records: list[dict[str, Any]],
        retriever: Retriever | None,
    ) -> Outcome:
        abi = next((r["abi"] for r in records if r["event"] == "abi"), "merged")
        if retriever is None:
            retriever = Retriever(self.kernel, abi)
            names = sorted(
                {
                    e["session"]
                    for m in run.manifest.values()
                    for e in m.values()
                    if "session" in e
                }
            )
            await anyio.to_thread.run_sync(retriever.open_sessions, names)
        run.retriever = retriever
        self._state(State.UPDATED)
        try:
            await self._run_phase(run, Phase.RESTORE, [])
            self._log("blackout_end")
            # Reading the kernel log is not blackout work: only now.
            self._log("kernel", liveupdate_number=_number(self.kernel))
            await self._run_phase(run, Phase.FINISH, [])
            await anyio.to_thread.run_sync(retriever.finish)
            self._log("kernel_finish")
        except Exception as exc:  # noqa: BLE001  (after the kexec: journaled as FAILED)
            remove_plan(self.state_dir)
            self._state(State.FAILED)
            self._log("run_end", outcome=Outcome.FAILED.value, error=_describe(exc))
            return Outcome.FAILED
        self._state(State.NORMAL)
        remove_plan(self.state_dir)
        self._log("run_end", outcome=Outcome.COMPLETED.value)
        return Outcome.COMPLETED


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

    def preserve(self, owner: str, key: str, fd: int) -> dict[str, Any]:
        raise RuntimeError("cannot preserve while cancelling")

    def prepare(self) -> None:
        raise RuntimeError("cannot prepare while cancelling")

    def close_device(self) -> None:
        pass

    def cancel(self) -> None:
        if not self.tokens:
            return
        from .luo import RfcDevice, RfcState, TokenNotFoundError

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
            if step is not None and step.phase.is_reversible:
                done.append(Done(step))
    return run, done, state, kexec


def _number(kernel: Kernel) -> int | None:
    for line in kernel.log_lines():
        if "liveupdate number:" in line:
            try:
                return int(line.rsplit(":", 1)[1])
            except ValueError:
                return None
    return None


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
