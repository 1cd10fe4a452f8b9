"""Scenario ``blackout``: the floor and the orchestrator, in turns, in one VM run.

One VM boots 2 x ROUNDS + 3 kernels (:mod:`tests.vm.blackout_guest`): the
floor client and ``liveupdate run``/``resume`` take turns updating the same
demo stores, ROUNDS times each, so that every comparison has the same kernel,
the same workloads and the same host load; :func:`turns` says in which
order (both sides of a round on boots of the same parity, after a round 0
of each side that is checked but not counted: the first update of a run
was among its slowest on each side -- the floor's 16.3 s against 12.8 s
for its later rounds, the medians of seven runs under TCG; the
orchestrator's first resume was the slow one to start its stores in 8 of
the 9 rounds of 32 where that took over 2 s). The blackout of each side is
read on the same clocks (old kernel's monotonic + new kernel's boot time); the
table gives each round, the median and the spread.

What is asserted is what must always hold, never a speed: every byte came
back each time; the orchestrator's blackout is journaled on both clocks and
ended by the restore path; its restores overlapped in time; the window ended
before FINISH; and the journal's figure agrees with the host's serial clock
once the part no guest clock sees (the kexec itself, measured on the serial
console: the old kernel's ``kexec`` record to the new kernel's printk zero)
is added.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from tests.vm.harness import Scenario, Stage, python_argv, run_scenario, venv_python
from tests.vm.report import PRINTK_TIME, kexec_lines, section

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import Result
    from tests.vm.kernel import Kernel

GUEST = ("-S", "-m", "tests.vm.blackout_guest")
SERIAL_TOLERANCE = 0.3
"""Seconds: the serial console's latency (a line waits for the ones before it)."""
SERIAL_RATE = 0.02
"""And a share of the span: under TCG the guest's clocks run up to ~2 % off the
host's (measured: the table prints the difference of each round)."""


def turns(rounds: int) -> list[tuple[str, int]]:
    """Who updates at each kexec: ``("floor", k)`` or ``("orch", k)``.

    Rounds go in blocks of two, F F O O then O O F F and so on (the last
    round of an odd count alone: F O), after round 0, the warm-up (O F:
    the first update of a run was among its slowest on each side). In a
    block each round's two sides are two boots apart, so both have a boot
    of the same parity: in some runs every other kexec'd boot was ~2 s
    slower (the init's Python start, the same code on both sides), and with
    the sides on adjacent boots that showed up as a difference between
    them. A boot that runs the other side than the boot before it was
    slower too, by 2 to 5 s: with round 0 as O F, each side has one such
    boot among its counted rounds per block pair (O1 and F3 of four).
    """
    order: list[tuple[str, int]] = [("orch", 0), ("floor", 0)]
    for k in range(1, rounds + 1, 2):
        pair = [k, k + 1] if k < rounds else [k]
        sides = ["floor", "orch"] if (k // 2) % 2 == 0 else ["orch", "floor"]
        order += [(side, r) for side in sides for r in pair]
    return order


def boot_of(rounds: int, side: str, k: int) -> int:
    """The boot (1 = the first) in which *side*'s round *k* restored."""
    return turns(rounds).index((side, k)) + 2


def blackout_scenario(rounds: int, count: int, mib: int, timeout: float) -> Scenario:
    env = {"BLACKOUT_COUNT": str(count), "BLACKOUT_MIB": str(mib)}
    liveupdate = venv_python().rsplit("/", 1)[0] + "/liveupdate"
    pre = [f"{side}-pre:{k}" for side, k in turns(rounds)]
    stages = [Stage("b1", python_argv(*GUEST, "setup", pre[0]), env)]
    for i, (side, k) in enumerate(turns(rounds)):
        after = [f"{side}-post:{k}", *pre[i + 1 : i + 2]]
        name = f"b{i + 2}"
        if side == "floor":
            stages.append(Stage(name, python_argv(*GUEST, *after), env))
            continue
        # The boot unit's command, first thing in the boot, as its own process.
        script = (
            f'{liveupdate} resume "$LUO_VM_OUT/blackout-playbook.yaml" '
            f'--state-dir "$LUO_VM_OUT/blackout-state"; '
            f"exec {venv_python()} {' '.join(GUEST)} {' '.join(after)}"
        )
        stages.append(Stage(name, ("/bin/sh", "-c", script), env))
    return Scenario("blackout", tuple(stages), memory="3G", timeout=timeout)


def _new_kernel_zero(result: Result, t_reboot: float) -> float | None:
    """Host time of the new kernel's clock start: the earliest (host time -
    printk time) of its console lines up to its init (printk's clock and
    CLOCK_BOOTTIME both start at the kernel's first instants)."""
    _, first_new, exec_init = kexec_lines(result, t_reboot)
    if first_new is None:
        return None
    end = exec_init.t if exec_init else first_new.t + 120
    zeros = []
    for ln in result.serial:
        if first_new.t <= ln.t <= end and ln.source == "serial":
            m = PRINTK_TIME.match(ln.text)
            if m:
                zeros.append(ln.t - float(m.group(1)))
    return min(zeros) if zeros else None


def _check_orch(result: Result, k: int, orch: dict[str, Any]) -> list[str]:
    fails = []
    end = orch.get("blackout_end") or {}
    if orch.get("outcome") != "completed":
        fails.append(f"orchestrator round {k}: outcome {orch.get('outcome')}")
    fails += [
        f"orchestrator round {k}: blackout_end has no {key}"
        for key in ("mono_s", "wall_s", "old_s", "new_s")
        if not isinstance(end.get(key), float)
    ]
    if end.get("ended_by") != "restore-path":
        fails.append(f"orchestrator round {k}: blackout ended by {end.get('ended_by')}")
    finish = orch.get("finish_start_wall")
    if finish is None or end.get("end_wall", finish + 1) > finish:
        fails.append(f"orchestrator round {k}: the window did not end before FINISH")
    actions = (orch.get("restore_path") or {}).get("actions") or []
    starts = [a["started"] for a in actions if a.get("started")]
    readies = [a["ready"] for a in actions if a.get("ready")]
    if len(actions) < 2 or len(readies) != len(actions):
        fails.append(f"orchestrator round {k}: restore path incomplete: {actions}")
    elif max(starts) >= min(readies):
        fails.append(f"orchestrator round {k}: restores did not overlap: {actions}")
    return fails


def _serial_check(
    result: Result, k: int, orch: dict[str, Any]
) -> tuple[str, list[str]]:
    """The journal's blackout against the host's serial clock.

    The host stamps each console line when it arrives: the run's ``> freeze``
    line (printed right after the ``blackout_start`` record), its ``> kexec``
    line (right after the ``kexec`` record) and the restore path's last line
    ("restore path: N of N workloads running again") bound the blackout as
    the host saw it, with no guest clock involved. The unseen part is the
    ``> kexec`` line to the new kernel's clock start (its printk zero).
    """
    end = orch.get("blackout_end") or {}
    freeze = [ln for ln in result.serial if "> freeze" in ln.text]
    jump = [ln for ln in result.serial if "> kexec: jumping" in ln.text]
    done = [ln for ln in result.serial if "restore path:" in ln.text]
    if min(len(freeze), len(jump), len(done)) <= k or "mono_s" not in end:
        return f"  round {k}: (no serial cross-check: console lines missing)", []
    # The orchestrator's round k is its (k+1)-th update of this run (round 0 first).
    t0, t_jump, t1 = freeze[k].t, jump[k].t, done[k].t
    zero = _new_kernel_zero(result, t_jump)
    if zero is None:
        return (
            f"  round {k}: (no serial cross-check: new kernel's console not seen)",
            [],
        )
    serial = t1 - t0
    unseen = zero - t_jump
    diff = serial - (float(end["mono_s"]) + unseen)
    tolerance = SERIAL_TOLERANCE + SERIAL_RATE * serial
    # The new kernel's clocksource: the jiffies clock loses ticks under load.
    clock = [
        ln.text.rsplit(" ", 1)[-1]
        for ln in result.serial
        if t_jump < ln.t < t1 and "Switched to clocksource" in ln.text
    ]
    source = clock[-1] if clock else "?"
    line = (
        f"  round {k}: serial {serial:8.3f} s = journal {end['mono_s']:8.3f} s + "
        f"unseen (kexec -> new kernel's clock) {unseen:6.3f} s {diff:+.3f} s "
        f"(bound {tolerance:.3f}); wall clocks {end.get('wall_s', 0):8.3f} s; "
        f"clocksource {source}"
    )
    fails = []
    if abs(diff) > tolerance or unseen < 0:
        fails.append(
            f"orchestrator round {k}: journal {end['mono_s']:.3f} s + unseen "
            f"{unseen:.3f} s differs from the serial clock's {serial:.3f} s by more "
            f"than {tolerance:.3f} s (new kernel's clocksource: {source})"
        )
    return line, fails


def _spans(
    result: Result, rounds: int, k: int, floor: dict[str, Any], orch: dict[str, Any]
) -> tuple[int, list[float | None], list[float | None]]:
    """Kernel start -> init, init -> first start, first start -> last ready."""

    def init(boot: int) -> float | None:
        """The printk time of the init's first mark: the new kernel's clock."""
        m = result.mark("init.start", boot)
        found = PRINTK_TIME.match(m.line.text) if m is not None else None
        return float(found.group(1)) if found else None

    def three(boot: int, starts: list[float], end: float) -> list[float | None]:
        t = init(boot)
        if t is None or not starts:
            return [None, None, None]
        return [t, min(starts) - t, end - min(starts)]

    f_starts = [float(a) for a, _ in floor.get("intervals", [])]
    actions = (orch.get("restore_path") or {}).get("actions") or []
    o_starts = [float(a["started"]) for a in actions if a.get("started")]
    o_end = float((orch.get("blackout_end") or {}).get("new_s", 0.0))
    return (
        k,
        three(boot_of(rounds, "floor", k), f_starts, float(floor["new_s"])),
        three(boot_of(rounds, "orch", k), o_starts, o_end),
    )


def _fmt(values: list[float | None]) -> str:
    return " ".join(f"{v:7.2f}" if v is not None else "      -" for v in values)


def run_blackout(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    rounds = args.blackout_rounds
    count = args.engine_workloads
    mib = args.blackout_mib
    sc = blackout_scenario(rounds, count, mib, max(args.timeout, 600.0 * rounds))
    result = run_scenario(sc, kernel, echo=not args.quiet, accel=args.accel)
    failures = list(result.failures())
    section(f"blackout: floor vs orchestrator, {rounds} rounds, {count} x {mib} MiB")
    rows, serial_lines = [], []
    spans: list[tuple[int, list[float | None], list[float | None]]] = []
    for k in range(rounds + 1):  # round 0, the warm-up, is checked, not counted
        floor = result.read_json(f"floor-{k}.json")
        orch = result.read_json(f"orch-{k}.json")
        if floor is None or orch is None:
            failures.append(f"round {k}: no result (floor {floor is not None})")
            continue
        for side, data in (("floor", floor), ("orchestrator", orch)):
            sums = data.get("sums_ok")
            if not isinstance(sums, dict) or not sums or not all(sums.values()):
                failures.append(f"{side} round {k}: data differs: {sums}")
        failures += _check_orch(result, k, orch)
        line, fails = _serial_check(result, k, orch)
        serial_lines.append(line)
        failures += fails
        spans.append(_spans(result, rounds, k, floor, orch))
        f_s = float(str(floor["mono_s"]))
        end: dict[str, Any] = orch.get("blackout_end") or {}  # type: ignore[assignment]
        o_s = float(end.get("mono_s", "nan"))
        rows.append((k, f_s, o_s, (o_s - f_s) / f_s * 100))
    print(f"  {'round':>5} {'floor s':>9} {'orch. s':>9} {'over %':>8}")
    for k, f_s, o_s, pct in rows:
        warm = "  (the warm-up: not counted)" if k == 0 else ""
        print(f"  {k:>5} {f_s:9.3f} {o_s:9.3f} {pct:+7.1f}%{warm}")
    rows = [r for r in rows if r[0] > 0]
    if rows:
        pcts = [r[3] for r in rows]
        print(
            f"  median {statistics.median(r[1] for r in rows):9.3f} "
            f"{statistics.median(r[2] for r in rows):9.3f} "
            f"{statistics.median(pcts):+7.1f}%  (spread {min(pcts):+.1f} .. "
            f"{max(pcts):+.1f} %; target <= +10 %)"
        )
    print(
        "\n  where it goes (s; new kernel's clock): kernel start -> init, init -> "
        "first workload started, -> last one running"
    )
    for k, f, o in spans:
        print(f"  {k:>5} floor {_fmt(f)}   orchestrator {_fmt(o)}")
    section("blackout: the journal against the host's serial clock")
    for line in serial_lines:
        print(line)
    return failures
