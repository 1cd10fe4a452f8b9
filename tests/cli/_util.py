"""Running ``liveupdate`` as a user would, and small playbooks for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]


def liveupdate(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``liveupdate ARGS`` in a new process, its output captured; *fds* are
    inherited (for ``handover register --fd N``)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        pass_fds=fds,
    )


def listening_line(stdout: IO[str]) -> str:
    """The agent's ``agent listening ...`` line, read past its log lines (they
    go to stdout too); "" if its stdout ends first."""
    for line in stdout:
        if line.startswith("agent listening"):
            return line
    return ""


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command wrote to stderr (and no traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("liveupdate: "), lines[0]
    return lines[0]


def sim_init(path: Path) -> str:
    """A new simulated kernel in *path*; its spec."""
    done = liveupdate("sim", "init", str(path))
    assert done.returncode == 0, done.stderr
    return f"sim:{path}"


def write_playbook(path: Path, phases: dict[str, Any], **top: Any) -> Path:
    """A playbook (JSON is YAML) with *phases* and top-level fields *top*."""
    path.write_text(json.dumps({"name": "t", **top, "phases": phases}))
    return path


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under *root*: (size, mtime_ns), to tell what changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out
