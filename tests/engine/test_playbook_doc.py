"""``liveupdate plan`` changes nothing on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under *root* with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", ["demo.yaml", "host-update.yaml"])
def test_plan_changes_nothing_on_disk(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    books = tmp_path / "playbooks"
    books.mkdir()
    shutil.copy(ROOT / "playbooks" / name, books / name)
    before = snapshot(tmp_path)
    assert main(["plan", str(books / name)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "kexec (the engine" in out
    assert snapshot(tmp_path) == before
    assert not (tmp_path / ".state").exists()
