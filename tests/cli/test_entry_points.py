"""A third-party plugin installed as a real distribution, its entry point in
the ``module:Class`` shape ``orchestrator.engine._hookspecs`` shows: the class is
instantiated, and its hooks run with ``self`` in a real update."""

from __future__ import annotations

import os
import textwrap
from typing import TYPE_CHECKING

from ._util import ROOT, liveupdate, one_line, sim_init, write_playbook

if TYPE_CHECKING:
    from pathlib import Path

PLUGIN = """
    from pathlib import Path

    from orchestrator import hookimpl

    class Plugin:
        name = "acme"

        def __init__(self):
            self.greeting = "hello from an instance"

        def _trace(self, ctx, what):
            with open(ctx.options["trace"], "a") as f:
                f.write(f"{self.greeting}: {what}\\n")

        @hookimpl
        async def lu_quiesce(self, ctx):
            self._trace(ctx, "quiesce")

        @hookimpl
        async def lu_quiesce_rollback(self, ctx):
            self._trace(ctx, "quiesce_rollback")
"""


def install(site: Path, body: str) -> dict[str, str]:
    """Install distribution ``acme`` (module and dist-info) in *site*; the
    environment that finds it."""
    site.mkdir()
    (site / "acme.py").write_text(textwrap.dedent(body))
    info = site / "acme-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[liveupdate.plugins]\nacme = acme:Plugin\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def test_class_entry_point_runs_its_hooks_in_an_update(tmp_path: Path) -> None:
    env = install(tmp_path / "site", PLUGIN)
    trace = tmp_path / "trace"
    playbook = write_playbook(
        tmp_path / "p.yaml",
        {
            "quiesce": {"steps": [{"plugin": "acme", "with": {"trace": str(trace)}}]},
            "prepare": {"steps": [{"plugin": "faults", "with": {"fail": "stop"}}]},
        },
        kernel=sim_init(tmp_path / "k"),
        state_dir=str(tmp_path / "state"),
    )
    done = liveupdate("run", str(playbook), "--no-agent", env=env)
    assert done.returncode == 5, done.stdout + done.stderr  # cancelled in prepare
    assert "acme: ok" in done.stdout
    assert trace.read_text().splitlines() == [
        "hello from an instance: quiesce",
        "hello from an instance: quiesce_rollback",
    ]
    assert "TypeError" not in done.stdout + done.stderr


def test_class_that_cannot_be_instantiated_fails_at_start_up(tmp_path: Path) -> None:
    body = PLUGIN.replace("def __init__(self):", "def __init__(self, needed):")
    env = install(tmp_path / "site", body)
    playbook = write_playbook(
        tmp_path / "p.yaml", {"quiesce": {"steps": [{"plugin": "faults"}]}}
    )
    done = liveupdate("plan", str(playbook), env=env)
    assert done.returncode == 1
    line = one_line(done)
    assert "plugin acme: cannot load 'acme:Plugin'" in line
    assert "missing 1 required positional argument: 'needed'" in line
