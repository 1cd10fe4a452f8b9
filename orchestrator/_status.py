"""The state of the last update, computed from the journal alone.

Durations inside one boot use the monotonic clock; the blackout spans two
kernels, whose monotonic clocks are unrelated, so it is measured on the wall
clock: from ``blackout_start`` (freeze begins, workloads are paused) in the
old kernel to ``blackout_end`` (every workload restored) in the new one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._journal import last_run, lock_holder, read_journal

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
    boots: list[str] = field(default_factory=list)
    liveupdate_number: int | None = None

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
        return "\n".join(lines)


def summarize(state_dir: Path) -> Status:
    records = last_run(read_journal(state_dir))
    status = Status(running=lock_holder(state_dir))
    starts: dict[str, dict[str, Any]] = {}
    blackout_start: float | None = None
    for rec in records:
        ev = rec["event"]
        if rec["boot_id"] not in status.boots:
            status.boots.append(rec["boot_id"])
        if ev == "run_start":
            status.run_id, status.playbook = rec["run"], rec.get("name")
        elif ev == "state":
            status.state = rec["state"]
            if rec.get("liveupdate_number") is not None:
                status.liveupdate_number = rec["liveupdate_number"]
        elif ev == "phase_start":
            starts[rec["phase"]] = rec
        elif ev == "phase_end" and rec["phase"] in starts:
            start = starts[rec["phase"]]
            status.phases[rec["phase"]] = rec["mono"] - start["mono"]
        elif ev == "kexec":
            starts["kexec"] = rec
        elif ev == "step_end":
            status.steps.append(
                {
                    k: rec.get(k)
                    for k in ("phase", "step", "plugin", "ok", "attempts", "error")
                }
            )
        elif ev == "retry":
            status.retries += 1
        elif ev == "blackout_start":
            blackout_start = rec["wall"]
        elif ev == "blackout_end" and blackout_start is not None:
            status.blackout_s = rec["wall"] - blackout_start
        elif ev == "run_end":
            status.outcome, status.error = rec["outcome"], rec.get("error")
    if "kexec" in starts and "restore" in starts:
        # the kexec "phase": reboot syscall in the old kernel to restore start in
        # the new one (wall clock: the monotonic clock restarted)
        status.phases["kexec"] = starts["restore"]["wall"] - starts["kexec"]["wall"]
        order = [
            "quiesce",
            "preserve",
            "prepare",
            "freeze",
            "kexec",
            "restore",
            "finish",
        ]
        status.phases = {p: status.phases[p] for p in order if p in status.phases}
    return status
