"""The restore path imports nothing of the metrics or report stack."""

from __future__ import annotations

import subprocess
import sys

from ._runs import ROOT


def test_bench_restore_imports() -> None:
    """``python -m bench.restore_imports`` (with the export variables set, as
    on a host that exports metrics) finds none of it loaded by the first
    kernel call of ``liveupdate resume``."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.restore_imports"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "orchestrator.restore._resume" in done.stdout
    assert "prometheus_client" not in done.stdout.split("none of the")[0]
