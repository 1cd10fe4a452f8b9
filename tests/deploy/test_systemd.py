"""The systemd units verify with the host's systemd (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="no systemd-analyze"
)
@pytest.mark.parametrize(
    "unit", ["liveupdate-resume.service", "liveupdate-agent.service"]
)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    # The units name the installed command; point them at this checkout's.
    liveupdate = Path(sys.executable).with_name("liveupdate")
    text = (
        (UNITS / unit).read_text().replace("/usr/local/bin/liveupdate", str(liveupdate))
    )
    (tmp_path / unit).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in done.stderr.splitlines() if unit in line]
    assert done.returncode == 0, done.stderr
    assert problems == [], problems


def test_resume_unit_runs_only_with_a_restore_plan() -> None:
    text = (UNITS / "liveupdate-resume.service").read_text()
    assert "ConditionPathExists=/var/lib/liveupdate/restore-plan" in text
    assert "--state-dir /var/lib/liveupdate" in text  # the fast path needs it
    assert "libvirtd.service" in text.split("Before=", 1)[1].splitlines()[0]
