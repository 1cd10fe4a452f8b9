"""``liveupdate report``: the timeline of a demo update and of a cancelled one,
drawn as SVG and rendered to PNG (cairosvg) to check it is a picture."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest

from orchestrator.observe._report import fmt_seconds, render_svg
from orchestrator.observe._runs import read_runs
from orchestrator.restore._journal import read_journal

from ._runs import liveupdate

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Demo

try:
    import cairocffi  # type: ignore[import-untyped]
    import cairosvg  # type: ignore[import-untyped]
except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
    pytest.skip(
        f"cannot render SVG to PNG: {exc} (pip install cairosvg; "
        "apt-get install -y libcairo2)",
        allow_module_level=True,
    )


def distinct_colours(png: bytes) -> int:
    surface = cairocffi.ImageSurface.create_from_png(io.BytesIO(png))
    data = bytes(surface.get_data())
    return len({data[i : i + 4] for i in range(0, len(data), 4)})


def render(svg: str, out: Path) -> bytes:
    png: bytes = cairosvg.svg2png(bytestring=svg.encode(), output_width=1400)
    out.write_bytes(png)
    assert png.startswith(b"\x89PNG")
    assert distinct_colours(png) > 16, "a picture, not a blank"
    return png


def test_demo_timeline(demo: Demo, tmp_path: Path) -> None:
    out = tmp_path / "demo.svg"
    done = liveupdate("report", "--state-dir", str(demo.state), "--output", str(out))
    assert done.returncode == 0, done.stderr
    svg = out.read_text()
    assert svg.startswith("<svg")
    assert "http" in svg.split(">")[0]
    assert demo.status.blackout_s is not None
    assert f"blackout {fmt_seconds(demo.status.blackout_s)}" in svg
    assert "kexec: no orchestrator runs" in svg
    assert "new kernel" in svg
    assert "old kernel" in svg
    assert "<script" not in svg
    assert "<image" not in svg
    assert "xlink:href" not in svg
    render(svg, tmp_path / "demo.png")
    # the table on stdout: every phase, in order, with the journal's durations
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"run {demo.status.run_id} (demo): completed")
    phases = [line.split()[0] for line in lines[2:] if not line.startswith(" ")]
    assert phases[:7] == list(demo.status.phases)
    for phase, seconds in demo.status.phases.items():
        (row,) = [line for line in lines if line.startswith(f"{phase} ")]
        assert fmt_seconds(seconds) in row
    assert "blackout (workloads paused -> running again)" in done.stdout


def test_cancelled_timeline(cancelled: Path, tmp_path: Path) -> None:
    (run,) = read_runs(read_journal(cancelled))
    svg = render_svg(run)
    assert "cancel (freeze)" in svg
    assert svg.count("undo ") >= 4, "the rollback steps"
    assert "attempt 1 failed" in svg, "the retries"
    assert "attempt 2 failed" in svg
    assert "FAILED" in svg
    render(svg, tmp_path / "cancelled.png")
    out = tmp_path / "cancelled.html"
    done = liveupdate(
        "report",
        "--state-dir",
        str(cancelled),
        "--run",
        run.run_id[:6],
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "CANCEL" in done.stdout
    assert "failed in freeze" in done.stdout
    assert "undo freeze/workloads" in done.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        pytest.param(["--run", "nosuchrun"], 1, "no run 'nosuchrun'", id="unknown-run"),
        pytest.param([], 0, "no update has run here", id="empty-journal"),
    ],
)
def test_report_without_a_run(
    tmp_path: Path, args: list[str], code: int, text: str
) -> None:
    done = liveupdate("report", "--state-dir", str(tmp_path), *args)
    assert done.returncode == code
    assert text in done.stdout + done.stderr
