"""Runs read back from the journal: what each update did, when, and for how long.

The journal keeps every run (each starts with a ``run_start`` record); this
module splits it into runs and turns each into spans -- phases, steps,
rollback steps -- with retries, the blackout window and the kexec gap between
the two kernels. The metrics (``_metrics.py``) and the timeline report
(``_report.py``) are both computed from these, after the fact, so they are as
right after the kexec as before it.

How durations are measured: every record carries ``wall`` (``time.time()``),
``mono`` (``time.monotonic()``) and the ``boot_id``. Two records of the same
boot are subtracted on the monotonic clock (immune to NTP steps); two records
of different boots -- the kexec, the blackout -- on the wall clock, because
the monotonic clock restarts with the new kernel. This is the rule
``liveupdate status`` follows, so both report the same numbers: the kexec
"phase" runs from the ``kexec`` record to the new kernel's ``restore``
``phase_start``, the blackout from ``blackout_start`` (freeze begins) to
``blackout_end`` (every workload restored). Except the blackout when the
``blackout_end`` record has ``mono_s``: the old kernel's monotonic time from
the freeze to the ``kexec`` record plus the new kernel's boot time at the end
(no clock jumps, but the kexec itself -- reboot syscall to the new kernel's
clock start -- is not in it; ``wall_s`` is kept as the cross-check).
Timestamps on a time axis are always wall clock.

Standard library only; not on the restore path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.engine._phases import Phase, State

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

PHASE_ORDER = tuple(p.value for p in Phase)
# A failure of the reboot syscall itself cancels too: the kexec counts here.
CANCELLABLE_PHASES = (*(p.value for p in Phase if p.is_reversible), Phase.KEXEC.value)
STATES = tuple(s.value for s in State)
OUTCOMES = ("completed", "cancelled", "failed")


def elapsed(start: dict[str, Any], end: dict[str, Any]) -> float:
    """Seconds from record *start* to record *end*: monotonic within one boot,
    wall clock across a kexec."""
    if start["boot_id"] == end["boot_id"]:
        return float(end["mono"]) - float(start["mono"])
    return float(end["wall"]) - float(start["wall"])


@dataclass(frozen=True, slots=True)
class Span:
    """A phase, a step or a rollback step, placed on the wall clock."""

    kind: str  # "phase", "step" or "rollback"
    phase: str
    name: str  # the phase, the step, or the step being undone
    plugin: str | None
    start: float  # wall clock, seconds since the epoch
    seconds: float  # measured as ``elapsed`` says
    boot_id: str
    ok: bool
    attempts: int = 1
    error: str | None = None

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass(frozen=True, slots=True)
class Retry:
    """A failed attempt of a step that was retried."""

    phase: str
    step: str
    plugin: str | None
    attempt: int
    wall: float
    error: str
    wait: float


@dataclass(slots=True)
class Run:
    """One update, from its ``run_start`` to its ``run_end`` (if it has one yet)."""

    run_id: str
    name: str | None
    kernel: str  # "real" or "sim" (never a path: it becomes a label)
    start: float
    end: float
    abi: str | None = None
    boots: list[str] = field(default_factory=list)
    outcome: str | None = None
    error: str | None = None
    states: list[tuple[str, float]] = field(default_factory=list)
    phases: list[Span] = field(default_factory=list)
    steps: list[Span] = field(default_factory=list)
    rollbacks: list[Span] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    blackout: tuple[float, float] | None = None  # wall clock start, end
    # On the kernels' monotonic clocks (old: freeze -> kexec record; new: its
    # clock start -> the end), when the journal has them; else the wall clock.
    blackout_s: float | None = None
    blackout_wall_s: float | None = None  # the wall clocks' figure: a cross-check
    blackout_open: float | None = None  # blackout_start with no end (yet)
    kexec: float | None = None  # wall clock of the reboot syscall
    next_boot: float | None = None  # first record of the new kernel
    cancel: float | None = None  # wall clock: cancelling began
    failed_phase: str | None = None
    liveupdate_number: int | None = None
    preserved_fds: int = 0
    preserved_bytes: int | None = None
    plugin_blackouts: dict[str, float] = field(default_factory=dict)
    vm_blackouts: dict[str, float] = field(default_factory=dict)  # by VM name

    @property
    def state(self) -> str:
        return self.states[-1][0] if self.states else "NORMAL"

    @property
    def cancelled(self) -> bool:
        """Whether the run went through CANCELLING (whatever the rollback's result)."""
        return any(state == "CANCELLING" for state, _ in self.states)

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Each phase's duration, in phase order (``liveupdate status``'s table)."""
        found = {span.phase: span.seconds for span in self.phases}
        return {p: found[p] for p in PHASE_ORDER if p in found}


def split_runs(records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The journal's records grouped by run, oldest first (records before the
    first ``run_start`` belong to no run and are left out)."""
    runs: list[list[dict[str, Any]]] = []
    for rec in records:
        if rec.get("event") == "run_start":
            runs.append([rec])
        elif runs:
            runs[-1].append(rec)
    return runs


@dataclass(slots=True)
class _Reader:
    """A run being read, and what its later records are matched with."""

    run: Run
    phase_starts: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_starts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    undo_starts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    records_by_plugin: dict[str, dict[str, Any]] = field(default_factory=dict)
    kexec_rec: dict[str, Any] | None = None
    blackout_rec: dict[str, Any] | None = None
    open_phase: str | None = None


def _on_abi(r: _Reader, rec: dict[str, Any]) -> None:
    r.run.abi = rec.get("abi")


def _on_state(r: _Reader, rec: dict[str, Any]) -> None:
    r.run.states.append((rec["state"], float(rec["wall"])))


def _on_phase_start(r: _Reader, rec: dict[str, Any]) -> None:
    r.phase_starts[rec["phase"]] = rec
    r.open_phase = rec["phase"]
    kexec = r.kexec_rec
    if rec["phase"] == "restore" and kexec is not None:
        r.run.phases.append(
            Span(
                "phase",
                "kexec",
                "kexec",
                None,
                float(kexec["wall"]),
                elapsed(kexec, rec),
                kexec["boot_id"],
                True,
            )
        )


def _on_phase_end(r: _Reader, rec: dict[str, Any]) -> None:
    start = r.phase_starts.get(rec["phase"])
    if start is None:
        return
    ok = bool(rec.get("ok", True))
    r.run.phases.append(
        Span(
            "phase",
            rec["phase"],
            rec["phase"],
            None,
            float(start["wall"]),
            elapsed(start, rec),
            start["boot_id"],
            ok,
            error=rec.get("error"),
        )
    )
    r.open_phase = None
    if not ok and r.run.failed_phase is None:
        r.run.failed_phase = rec["phase"]


def _on_step_start(r: _Reader, rec: dict[str, Any]) -> None:
    r.step_starts[(rec["phase"], rec["step"])] = rec


def _on_step_end(r: _Reader, rec: dict[str, Any]) -> None:
    start = r.step_starts.get((rec["phase"], rec["step"]), rec)
    plugin = rec.get("plugin") or start.get("plugin")
    r.run.steps.append(
        Span(
            "step",
            rec["phase"],
            rec["step"],
            plugin,
            float(start["wall"]),
            elapsed(start, rec),
            start["boot_id"],
            bool(rec.get("ok")),
            int(rec.get("attempts") or 1),
            rec.get("error"),
        )
    )
    if not (rec.get("ok") and plugin):
        return
    r.records_by_plugin[plugin] = rec.get("records") or {}
    if rec.get("manifest"):
        r.manifests[plugin] = rec["manifest"]
    if rec["phase"] == "restore":
        # A plugin that brings workloads back may record how long each was
        # paused (the qemu plugin: per VM, stop to cont).
        recorded = rec.get("records") or {}
        if recorded.get("blackout_s") is not None:
            r.run.plugin_blackouts[plugin] = float(recorded["blackout_s"])
        r.run.vm_blackouts.update(
            (str(name), float(v))
            for name, v in (recorded.get("vm_blackout_s") or {}).items()
        )


def _on_retry(r: _Reader, rec: dict[str, Any]) -> None:
    start = r.step_starts.get((rec["phase"], rec["step"]), {})
    r.run.retries.append(
        Retry(
            rec["phase"],
            rec["step"],
            start.get("plugin"),
            int(rec.get("attempt", 0)),
            float(rec["wall"]),
            str(rec.get("error", "")),
            float(rec.get("wait") or 0.0),
        )
    )


def _on_rollback_start(r: _Reader, rec: dict[str, Any]) -> None:
    r.undo_starts[(rec["phase"], rec["step"])] = rec


def _on_rollback_end(r: _Reader, rec: dict[str, Any]) -> None:
    start = r.undo_starts.get((rec["phase"], rec["step"]), rec)
    r.run.rollbacks.append(
        Span(
            "rollback",
            rec["phase"],
            rec["step"],
            None,
            float(start["wall"]),
            elapsed(start, rec),
            start["boot_id"],
            bool(rec.get("ok")),
            error=rec.get("error"),
        )
    )


def _on_blackout_start(r: _Reader, rec: dict[str, Any]) -> None:
    r.blackout_rec = rec
    r.run.blackout_open = float(rec["wall"])


def _on_blackout_end(r: _Reader, rec: dict[str, Any]) -> None:
    start = r.blackout_rec
    if start is None:
        return
    end = float(rec.get("end_wall", rec["wall"]))
    r.run.blackout = (float(start["wall"]), end)
    r.run.blackout_wall_s = end - float(start["wall"])
    mono = rec.get("mono_s")
    r.run.blackout_s = float(mono) if mono is not None else elapsed(start, rec)
    r.run.blackout_open = None


def _on_kexec(r: _Reader, rec: dict[str, Any]) -> None:
    r.kexec_rec = rec
    r.run.kexec = float(rec["wall"])


def _on_cancel(r: _Reader, rec: dict[str, Any]) -> None:
    if r.run.cancel is not None:
        return
    r.run.cancel = float(rec["wall"])
    if r.run.failed_phase is None:
        # the phase the update was in when it failed: one that ended badly
        # (phase_end), else the reboot syscall, else one left open by an
        # orchestrator that died
        r.run.failed_phase = (
            "kexec" if r.kexec_rec is not None else r.open_phase or "unknown"
        )


def _on_resume(r: _Reader, rec: dict[str, Any]) -> None:
    if rec.get("action") == "cancel":
        _on_cancel(r, rec)


def _on_run_end(r: _Reader, rec: dict[str, Any]) -> None:
    r.run.outcome, r.run.error = rec.get("outcome"), rec.get("error")


# What each kind of record adds to a run; other events add nothing.
_HANDLERS: dict[str, Callable[[_Reader, dict[str, Any]], None]] = {
    "abi": _on_abi,
    "state": _on_state,
    "phase_start": _on_phase_start,
    "phase_end": _on_phase_end,
    "step_start": _on_step_start,
    "step_end": _on_step_end,
    "retry": _on_retry,
    "rollback_start": _on_rollback_start,
    "rollback_end": _on_rollback_end,
    "blackout_start": _on_blackout_start,
    "blackout_end": _on_blackout_end,
    "kexec": _on_kexec,
    "cancel_start": _on_cancel,
    "resume": _on_resume,
    "run_end": _on_run_end,
}


def parse_run(records: list[dict[str, Any]]) -> Run:
    """A :class:`Run` from the records of one run (``records[0]`` is ``run_start``)."""
    first = records[0]
    spec = str(first.get("kernel") or "real")
    run = Run(
        run_id=str(first.get("run")),
        name=first.get("name"),
        kernel="sim" if spec.startswith("sim") else "real",
        start=float(first["wall"]),
        end=float(records[-1]["wall"]),
    )
    reader = _Reader(run)
    for rec in records:
        if rec["boot_id"] not in run.boots:
            run.boots.append(rec["boot_id"])
            if len(run.boots) > 1 and run.next_boot is None:
                run.next_boot = float(rec["wall"])
        if rec.get("liveupdate_number") is not None:  # the "kernel" record
            run.liveupdate_number = int(rec["liveupdate_number"])
        handler = _HANDLERS.get(rec["event"])
        if handler is not None:
            handler(reader, rec)
    if run.outcome == "failed" and run.failed_phase is None:
        run.failed_phase = reader.open_phase or "unknown"
    run.preserved_fds, run.preserved_bytes = _preserved(
        reader.manifests, reader.records_by_plugin
    )
    return run


def _preserved(
    manifests: dict[str, dict[str, Any]], records: dict[str, dict[str, Any]]
) -> tuple[int, int | None]:
    """How many fds the run's manifests hold, and their bytes where known.

    The manifest says where each fd went (session, token), not its size. The
    sizes come from what plugins recorded: a ``workloads`` list of entries
    with ``name`` and ``size`` (the workloads plugin records one). ``None``
    when no preserved fd has a recorded size.
    """
    fds = 0
    total: int | None = None
    for plugin, manifest in manifests.items():
        fds += len(manifest)
        sizes = {
            str(entry.get("name")): int(entry["size"])
            for entry in records.get(plugin, {}).get("workloads") or ()
            if isinstance(entry, dict) and "size" in entry
        }
        for key in manifest:
            if key in sizes:
                total = (total or 0) + sizes[key]
    return fds, total


def read_runs(records: Iterable[dict[str, Any]]) -> list[Run]:
    """Every run of a journal's *records*, oldest first."""
    return [parse_run(group) for group in split_runs(records)]
