"""Host-side report helpers shared by the e2e scenarios (no QEMU here)."""

from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.vm.harness import Result, SerialLine

LUO_LINES = re.compile(r"^(?!.*ommand line:).*(liveupdate|luo:|KHO)", re.IGNORECASE)
LU_NUMBER = re.compile(r"liveupdate number: (\d+)")
PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def liveupdate_numbers(result: Result, *, echo: bool = True) -> list[int]:
    """The kernel's ``liveupdate number: N`` lines (printed), and the numbers."""
    numbers = []
    for ln in result.kernel_lines(LU_NUMBER):
        m = LU_NUMBER.search(ln.text)
        if m:
            numbers.append(int(m.group(1)))
            if echo:
                print(f"  {ln}")
    if echo and not numbers:
        print("  (no 'liveupdate number' line)")
    return numbers


def first_after(
    result: Result, pattern: str, after: float, before: float = float("inf")
) -> SerialLine | None:
    rx = re.compile(pattern)
    for ln in result.serial:
        if after <= ln.t < before and ln.source == "serial" and rx.search(ln.text):
            return ln
    return None


def clock_offsets(result: Result) -> dict[int, float]:
    """Per boot: median of (host wall - guest wall) over that boot's marks."""
    by_boot: dict[int, list[float]] = {}
    for m in result.marks():
        by_boot.setdefault(m.boot, []).append(m.clock_offset)
    return {b: statistics.median(v) for b, v in by_boot.items() if v}


def host_t(result: Result, boot: int, guest_wall: float) -> float | None:
    """A guest wall-clock time of *boot* as seconds since QEMU start (host clock).

    Uses the clock offset of the nearest marks of that boot (median of the 3
    closest in guest time): under TCG the guest clock drifts (it lost ~7 s in
    70 s of heavy load once), so one offset per kernel is not good enough.
    """
    marks = [m for m in result.marks() if m.boot == boot]
    if not marks or not result.serial:
        return None
    marks.sort(key=lambda m: abs(m.guest_wall - guest_wall))
    offset = statistics.median(m.clock_offset for m in marks[:3])
    ref = result.serial[0]
    start_wall = ref.wall - ref.t
    return guest_wall + offset - start_wall


def kexec_lines(
    result: Result, t_reboot: float
) -> tuple[SerialLine | None, SerialLine | None, SerialLine | None]:
    """After a reboot(KEXEC) at host time *t_reboot*: the old kernel's 'Starting
    new kernel', the next console line (the new kernel's first) and its
    'Run ... as init process'."""
    start = first_after(result, r"Starting new kernel", t_reboot)
    first_new = None
    if start is not None:
        first_new = next(
            (ln for ln in result.serial if ln.t > start.t and ln.source == "serial"),
            None,
        )
    exec_init = first_after(
        result, r"Run .* as init process", start.t if start else t_reboot
    )
    return start, first_new, exec_init


def print_timeline(rows: list[tuple[str, float | None]], t0: float | None) -> None:
    """``label  host t  Δ prev  Δ t0`` for rows of (label, host seconds)."""
    print(f"  {'event':50} {'host t':>9} {'Δ prev':>8} {'Δ t0':>9}")
    prev: float | None = None
    for label, t in rows:
        if t is None:
            print(f"  {label:50} {'(not seen)':>9}")
            continue
        d_prev = f"{t - prev:+8.3f}" if prev is not None else " " * 8
        d_t0 = f"{t - t0:+9.3f}" if t0 is not None else ""
        print(f"  {label:50} {t:9.3f} {d_prev} {d_t0}")
        prev = t
