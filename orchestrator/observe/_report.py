"""A timeline of one update, from the journal: SVG (or HTML) and a text table.

The time axis is the wall clock, the one clock both kernels share; the
bars' lengths are the durations ``liveupdate status`` reports (monotonic
within a boot, wall clock across the kexec, see ``_runs.py``). Drawn: each
phase and its steps, one row each, in the kernel (boot) they ran in; the gap
between the two kernels (no orchestrator runs there); the blackout window;
retried attempts; and on a cancelled run the moment it cancelled and the
rollback steps, in the order they ran. Self-contained: no scripts, fonts or
images from elsewhere.
"""

from __future__ import annotations

import html
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._runs import Run, Span

logger = logging.getLogger(__name__)

COLORS = {
    "quiesce": "#4e79a7",
    "preserve": "#f28e2b",
    "prepare": "#59a14f",
    "freeze": "#76b7b2",
    "kexec": "#9c755f",
    "restore": "#edc948",
    "finish": "#b07aa1",
}
FAIL = "#d62728"
RETRY = "#ff7f0e"
BLACKOUT = "#7b3294"
WIDTH = 1100
LEFT = 200  # label column
RIGHT = 150  # duration column
ROW = 24
TOP = 96


def fmt_seconds(seconds: float) -> str:
    """``3.4 ms`` or ``1.16 s``."""
    if abs(seconds) < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _tick_step(seconds: float) -> float:
    """A round tick interval (1, 2 or 5 times a power of ten) giving 4 to 10 ticks."""
    scale = 10.0 ** math.floor(math.log10(seconds / 10))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if seconds / (factor * scale) <= 10:
            return factor * scale
    return 10.0 * scale


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _boot_name(run: Run, boot_id: str) -> str:
    index = run.boots.index(boot_id) if boot_id in run.boots else 0
    return ("old kernel", "new kernel")[index] if index < 2 else f"boot {index + 1}"


def _rows(run: Run) -> list[tuple[str, Span]]:
    """(label, span) for every row: phases with their steps under them, in the
    order they started, then rollback steps in the order they ran."""
    rows: list[tuple[str, Span]] = []
    phases = sorted(run.phases, key=lambda s: s.start)
    for phase in phases:
        rows.append((phase.phase, phase))
        for step in sorted(run.steps, key=lambda s: s.start):
            if step.phase == phase.phase and step.boot_id == phase.boot_id:
                plugin = f" [{step.plugin}]" if step.plugin != step.name else ""
                rows.append((f"  {step.name}{plugin}", step))
    # steps of a phase that never ended (an orchestrator that died mid-phase)
    seen = {id(span) for _, span in rows}
    rows.extend(
        (f"  {step.phase}/{step.name}", step)
        for step in run.steps
        if id(step) not in seen
    )
    rows.extend((f"undo {undo.phase}/{undo.name}", undo) for undo in run.rollbacks)
    return rows


def render_svg(run: Run) -> str:
    """The timeline of *run* as a standalone SVG document."""
    rows = _rows(run)
    t0 = run.start
    t1 = max([run.end, *(s.end for _, s in rows)])
    span_s = max(t1 - t0, 1e-3)
    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + ROW * max(len(rows), 1) + 110

    def x(t: float) -> float:
        return LEFT + (t - t0) / span_s * plot_w

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, '
        f'Arial, sans-serif" font-size="12">',
        "<defs>"
        '<pattern id="gap" width="8" height="8" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="8" height="8" fill="#eeeeee"/>'
        '<line x1="0" y1="0" x2="0" y2="8" stroke="#bbbbbb" stroke-width="4"/>'
        "</pattern>"
        '<pattern id="undo" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f7c5c5"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{FAIL}" stroke-width="2"/>'
        "</pattern></defs>",
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>',
    ]
    outcome = run.outcome or f"in progress ({run.state})"
    title_color = {"completed": "#2ca02c"}.get(run.outcome or "", FAIL)
    out.append(
        f'<text x="16" y="26" font-size="18" font-weight="bold">live update '
        f"{_esc(run.run_id)} ({_esc(run.name or '-')}): "
        f'<tspan fill="{title_color}">{_esc(outcome)}</tspan></text>'
    )
    facts = [
        f"kernel {run.kernel}",
        f"ABI {run.abi or '-'}",
        f"{len(run.boots)} boot(s)",
    ]
    if run.blackout_s is not None:
        facts.append(f"blackout {fmt_seconds(run.blackout_s)}")
    if run.retries:
        facts.append(f"{len(run.retries)} retried attempt(s)")
    if run.error:
        facts.append(f"error: {run.error}")
    out.append(f'<text x="16" y="46" fill="#444444">{_esc(" · ".join(facts))}</text>')

    # the kernels: one band each, the gap between them hatched
    band_y = 58
    old_end = run.kexec if run.kexec is not None else t1
    out.append(
        f'<rect x="{x(t0):.1f}" y="{band_y}" width="{max(x(old_end) - x(t0), 1):.1f}" '
        f'height="20" fill="#dde6f0"/>'
    )
    old_label = f"old kernel (boot {run.boots[0][:8] if run.boots else '?'})"
    if x(old_end) - x(t0) > 7 * len(old_label) + 8:
        out.append(
            f'<text x="{x(t0) + 4:.1f}" y="{band_y + 14}" fill="#1f3b5a">'
            f"{_esc(old_label)}</text>"
        )
    else:  # too short to hold its name: named in the label column
        out.append(
            f'<text x="{LEFT - 6}" y="{band_y + 14}" text-anchor="end" '
            f'fill="#1f3b5a">{_esc(old_label)} ▸</text>'
        )
    if run.kexec is not None and run.next_boot is not None:
        out.append(
            f'<rect x="{x(run.kexec):.1f}" y="{band_y}" '
            f'width="{max(x(run.next_boot) - x(run.kexec), 1):.1f}" '
            f'height="{TOP - band_y + ROW * len(rows)}" '
            f'fill="url(#gap)" opacity="0.7"/>'
            f'<text x="{(x(run.kexec) + x(run.next_boot)) / 2:.1f}" y="{band_y + 14}" '
            f'text-anchor="middle" fill="#333333">kexec: no orchestrator runs '
            f"({fmt_seconds(run.next_boot - run.kexec)})</text>"
        )
        out.append(
            f'<rect x="{x(run.next_boot):.1f}" y="{band_y}" '
            f'width="{max(x(t1) - x(run.next_boot), 1):.1f}" height="20" '
            f'fill="#e3f0dd"/><text x="{x(t1) - 4:.1f}" y="{band_y + 14}" '
            f'text-anchor="end" fill="#2b4a1f">new kernel '
            f"(boot {_esc(run.boots[-1][:8])})</text>"
        )
    elif run.kexec is not None:
        out.append(
            f'<text x="{x(run.kexec) + 4:.1f}" y="{band_y + 14}" fill="{FAIL}">'
            "kexec: the new kernel has not resumed yet</text>"
        )

    # the blackout window, behind the bars
    rows_h = ROW * len(rows)
    if run.blackout is not None:
        b0, b1 = run.blackout
        label = f"blackout {fmt_seconds(run.blackout_s or b1 - b0)}"
    elif run.blackout_open is not None:
        b0 = run.blackout_open
        b1 = max((u.end for u in run.rollbacks), default=t1)
        label = "blackout (until the rollback resumed the workloads)"
    else:
        b0 = b1 = 0.0
        label = ""
    if label:
        out.append(
            f'<rect x="{x(b0):.1f}" y="{TOP - 4}" width="{max(x(b1) - x(b0), 2):.1f}" '
            f'height="{rows_h + 8}" fill="{BLACKOUT}" fill-opacity="0.12" '
            f'stroke="{BLACKOUT}" stroke-dasharray="4 3"/>'
            f'<text x="{x(b1) - 4:.1f}" y="{TOP + rows_h + 18}" text-anchor="end" '
            f'fill="{BLACKOUT}" font-weight="bold">{_esc(label)}</text>'
        )

    for i, (label, span) in enumerate(rows):
        y = TOP + i * ROW
        if i % 2 == 0:
            out.append(
                f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW}" '
                f'fill="#f4f4f4" fill-opacity="0.6"/>'
            )
        is_phase = span.kind == "phase"
        weight = ' font-weight="bold"' if is_phase else ""
        label_color = FAIL if span.kind == "rollback" else "#222222"
        out.append(
            f'<text x="12" y="{y + 16}"{weight} fill="{label_color}" '
            f'xml:space="preserve">{_esc(label)}</text>'
        )
        color = COLORS.get(span.phase, "#888888")
        if span.kind == "rollback":
            fill, stroke = "url(#undo)", FAIL
        elif span.phase == "kexec":
            fill, stroke = "url(#gap)", color
        else:
            fill, stroke = color, FAIL if not span.ok else color
        bar_h = 16 if is_phase else 10
        bar_y = y + (ROW - bar_h) / 2
        width = max(x(span.end) - x(span.start), 2.5)
        out.append(
            f'<rect x="{x(span.start):.1f}" y="{bar_y:.1f}" width="{width:.1f}" '
            f'height="{bar_h}" rx="2" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="{2 if not span.ok else 1}"><title>{_esc(label.strip())}: '
            f"{fmt_seconds(span.seconds)} ({_boot_name(run, span.boot_id)})"
            f"</title></rect>"
        )
        note = fmt_seconds(span.seconds)
        if span.attempts > 1:
            note += f", {span.attempts} attempts"
        if not span.ok:
            note += ", FAILED"
        out.append(
            f'<text x="{WIDTH - RIGHT + 8}" y="{y + 16}" '
            f'fill="{FAIL if not span.ok else "#222222"}">{_esc(note)}</text>'
        )
        if span.kind == "step":
            for retry in run.retries:
                if (retry.phase, retry.step) == (span.phase, span.name):
                    rx = x(retry.wall)
                    out.append(
                        f'<path d="M{rx:.1f},{y + 3} l5,9 l-10,0 z" fill="{RETRY}" '
                        f'stroke="#7f3f00"><title>attempt {retry.attempt} failed: '
                        f"{_esc(retry.error)}; retried after "
                        f"{fmt_seconds(retry.wait)}</title></path>"
                    )

    if run.cancel is not None:
        cx = x(run.cancel)
        out.append(
            f'<line x1="{cx:.1f}" y1="{band_y}" x2="{cx:.1f}" y2="{TOP + rows_h + 4}" '
            f'stroke="{FAIL}" stroke-width="2" stroke-dasharray="6 3"/>'
            f'<text x="{cx + 4:.1f}" y="{band_y - 2}" fill="{FAIL}" '
            f'font-weight="bold">cancel ({_esc(run.failed_phase or "?")})</text>'
        )

    # the time axis: milliseconds since the run started, wall clock
    axis_y = TOP + rows_h + 30
    out.append(
        f'<line x1="{LEFT}" y1="{axis_y}" x2="{LEFT + plot_w}" y2="{axis_y}" '
        f'stroke="#333333"/>'
    )
    step = _tick_step(span_s)
    k = 0
    while step * k <= span_s * 1.0001:
        tx = x(t0 + step * k)
        out.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 5}" '
            f'stroke="#333333"/><text x="{tx:.1f}" y="{axis_y + 18}" '
            f'text-anchor="middle" fill="#333333">{_esc(fmt_seconds(step * k))}</text>'
        )
        k += 1
    out.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{axis_y + 36}" text-anchor="middle" '
        f'fill="#555555">time since the run started (wall clock, shared by both '
        f"kernels)</text>"
    )
    legend = [(COLORS[p], p) for p in COLORS if p != "kexec"]
    legend += [
        (RETRY, "retried attempt"),
        (FAIL, "failed / undo"),
        (BLACKOUT, "blackout"),
    ]
    lx = 16
    ly = axis_y + 58
    for color, name in legend:
        out.append(
            f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}"/>'
            f'<text x="{lx + 16}" y="{ly}" fill="#333333">{_esc(name)}</text>'
        )
        lx += 22 + 7 * len(name) + 14
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_html(run: Run) -> str:
    """A standalone HTML page: the SVG timeline and the table."""
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>live update {_esc(run.run_id)}</title></head>\n"
        '<body style="font-family: sans-serif">\n'
        f"{render_svg(run)}<pre>{_esc(render_table(run))}</pre>\n</body></html>\n"
    )


def render_table(run: Run) -> str:
    """The timeline as text: one line per phase, step, retry and undo step."""
    t0 = run.start
    head = (
        f"run {run.run_id} ({run.name or '-'}): "
        f"{run.outcome or 'in progress'}, state {run.state}, "
        f"{len(run.boots)} boot(s), kernel {run.kernel}, ABI {run.abi or '-'}"
    )
    lines = [head, f"{'what':<34} {'kernel':<10} {'at':>10} {'duration':>11}  result"]
    events: list[tuple[float, str]] = []
    for label, span in _rows(run):
        result = "ok" if span.ok else f"FAILED {span.error or ''}".rstrip()
        if span.attempts > 1:
            result += f" ({span.attempts} attempts)"
        events.append(
            (
                span.start,
                f"{label:<34} {_boot_name(run, span.boot_id):<10} "
                f"{fmt_seconds(span.start - t0):>10} "
                f"{fmt_seconds(span.seconds):>11}  {result}",
            )
        )
    events.extend(
        (
            retry.wall,
            f"{'  retry ' + retry.step:<34} {'':<10} "
            f"{fmt_seconds(retry.wall - t0):>10} {'':>11}  "
            f"attempt {retry.attempt} failed: {retry.error}",
        )
        for retry in run.retries
    )
    if run.cancel is not None:
        events.append(
            (
                run.cancel,
                f"{'CANCEL':<34} {'':<10} {fmt_seconds(run.cancel - t0):>10} "
                f"{'':>11}  failed in {run.failed_phase}",
            )
        )
    lines.extend(line for _, line in sorted(events, key=lambda e: e[0]))
    if run.blackout_s is not None:
        lines.append(
            f"blackout (workloads paused -> running again): "
            f"{fmt_seconds(run.blackout_s)} across {len(run.boots)} boots"
        )
    if run.error:
        lines.append(f"error: {run.error}")
    return "\n".join(lines)
