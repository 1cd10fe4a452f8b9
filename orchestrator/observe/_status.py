"""The state of the last update, computed from the journal alone.

The journal is read into runs by :mod:`._runs` -- the same reading the
metrics and the timeline report use, so all three agree: durations inside one
boot on the monotonic clock, across the kexec (the blackout, the kexec
"phase") on the wall clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.restore._journal import (
    journal_damage,
    lock_holder,
    read_journal,
    resume_command,
    unfinished,
)

from ._runs import read_runs

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(slots=True)
class Status:
    run_id: str | None = None
    playbook: str | None = None
    state: str = "NORMAL"
    outcome: str | None = None
    error: str | None = None
    running: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    blackout_s: float | None = None
    blackout_wall_s: float | None = None
    plugin_blackouts: dict[str, float] = field(default_factory=dict)
    vm_blackouts: dict[str, float] = field(default_factory=dict)  # by VM name
    boots: list[str] = field(default_factory=list)
    liveupdate_number: int | None = None
    interrupted: bool = False  # the last run never ended and nothing runs it
    next_command: str | None = None  # what finishes or cancels it
    journal_damage: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        if self.run_id is None:
            return "no update has run here"
        lines = [
            f"run {self.run_id} ({self.playbook}): state {self.state}"
            + (f", outcome {self.outcome}" if self.outcome else "")
        ]
        if self.running:
            lines.append(f"running: {self.running}")
        if self.interrupted:
            lines.append(
                f"INTERRUPTED: the update stopped in {self.state} and nothing runs "
                f"it; finish or cancel it with: {self.next_command}"
            )
        lines += [f"journal damage: {d}" for d in self.journal_damage]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.phases:
            lines.append(f"{'phase':<10} {'duration':>12}")
            for phase, seconds in self.phases.items():
                lines.append(f"{phase:<10} {seconds * 1e3:>9.1f} ms")
        if self.retries:
            lines.append(f"retries: {self.retries}")
        if self.blackout_s is not None:
            lines.append(
                f"blackout window (workloads paused -> running again): "
                f"{self.blackout_s * 1e3:.1f} ms across {len(self.boots)} boots"
            )
            if self.blackout_wall_s is not None and len(self.boots) > 1:
                lines.append(
                    f"  on the monotonic clocks, not counting the kexec itself; "
                    f"the wall clocks say {self.blackout_wall_s * 1e3:.1f} ms"
                )
        return "\n".join(lines)


def summarize(state_dir: Path) -> Status:
    """The last run of the journal in *state_dir* (see :mod:`._runs` for how
    durations are measured), and who holds the lock now."""
    status = Status(running=lock_holder(state_dir))
    records = read_journal(state_dir)
    status.journal_damage = [str(e) for e in journal_damage(state_dir)]
    left = unfinished(records)
    if left and status.running is None:
        status.interrupted = True
        status.next_command = resume_command(left[0], state_dir)
    runs = read_runs(records)
    if not runs:
        return status
    run = runs[-1]
    status.run_id, status.playbook = run.run_id, run.name
    status.state, status.outcome, status.error = run.state, run.outcome, run.error
    status.phases = run.phase_seconds
    status.steps = [
        {
            "phase": s.phase,
            "step": s.name,
            "plugin": s.plugin,
            "ok": s.ok,
            "attempts": s.attempts,
            "error": s.error,
        }
        for s in run.steps
    ]
    status.retries = len(run.retries)
    status.blackout_s = run.blackout_s
    status.blackout_wall_s = run.blackout_wall_s
    status.plugin_blackouts = dict(run.plugin_blackouts)
    status.vm_blackouts = dict(run.vm_blackouts)
    status.boots = list(run.boots)
    status.liveupdate_number = run.liveupdate_number
    return status
