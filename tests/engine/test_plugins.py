"""Plugins: built-ins, third-party ones found through the entry-point group,
and hooks that do not exist failing at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy

from orchestrator import Phase, plugin_manager
from orchestrator.engine._engine import check_playbook, hook_for
from orchestrator.engine._playbook import parse_playbook

ROOT = Path(__file__).resolve().parents[2]


def install_fake_distribution(site: Path, module: str, body: str) -> None:
    """A real (if tiny) installed distribution: a module and its dist-info."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        f"[liveupdate.plugins]\n{module} = {module}:Plugin\n"
    )


def plan(site: Path, playbook: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", str(playbook)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=ROOT,
    )


def playbook_using(tmp_path: Path, plugin: str) -> Path:
    path = tmp_path / "p.yaml"
    doc = {"name": "x", "phases": {"quiesce": {"steps": [{"plugin": plugin}]}}}
    path.write_text(json.dumps(doc))
    return path


def test_only_the_builtins_asked_for_are_loaded() -> None:
    """Resume names its plugins: scanning for third-party ones must not bring
    in the other built-ins (they are entry points of the same group)."""
    pm = plugin_manager(builtins={"kexec"})
    names = {name for name, _ in pm.list_name_plugin()}
    assert "kexec" in names
    assert not names & {"workloads", "qemu", "faults"}


def test_builtin_plugins_have_their_hooks() -> None:
    pm = plugin_manager(load_entry_points=False)
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"workloads", "kexec", "faults"} <= names
    assert hook_for(pm, "kexec", "lu_prepare") is not None
    assert hook_for(pm, "kexec", "lu_prepare_rollback") is not None
    assert hook_for(pm, "kexec", "lu_quiesce") is None


def test_third_party_plugin_through_entry_point(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(
        site,
        "acme_vmm",
        """
        from orchestrator import hookimpl

        class Plugin:
            @hookimpl
            async def lu_quiesce(self, ctx):
                pass
        """,
    )
    done = plan(site, playbook_using(tmp_path, "acme_vmm"))
    assert done.returncode == 0, done.stderr
    assert "[acme_vmm]" in done.stdout


def test_misspelt_hook_fails_at_start_up(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(
        site,
        "typo_plugin",
        """
        from orchestrator import hookimpl

        class Plugin:
            @hookimpl
            async def lu_quiese(self, ctx):
                pass
        """,
    )
    done = plan(site, playbook_using(tmp_path, "workloads"))
    assert done.returncode == 1
    assert "unknown hook 'lu_quiese'" in done.stderr
    assert "Traceback" not in done.stderr


def test_step_naming_a_phase_the_plugin_lacks() -> None:
    pm = plugin_manager(load_entry_points=False)
    book = parse_playbook(
        "name: x\nphases:\n  quiesce:\n    steps:\n      - plugin: kexec\n",
        path="p.yaml",
    )
    (problem,) = check_playbook(pm, book)
    assert problem.startswith("p.yaml:5:")
    assert "plugin 'kexec' has no hook for phase quiesce" in problem


def test_unregistered_plugin_is_reported() -> None:
    pm = pluggy.PluginManager("liveupdate")
    book = parse_playbook(
        "name: x\nphases:\n  freeze:\n    steps:\n      - plugin: ghost\n",
        path="p.yaml",
    )
    (problem,) = check_playbook(pm, book)
    assert "unknown plugin 'ghost'" in problem
    assert Phase.FREEZE in book.phases
