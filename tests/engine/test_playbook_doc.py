"""The playbook reference agrees with the declarations, its example plans
cleanly, and ``liveupdate plan`` changes nothing on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.engine import _playbook_schema as schema
from orchestrator.engine._playbook import RetryPolicy, load_playbook, parse_duration
from orchestrator.engine._playbook_doc import EXAMPLE, render

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "playbook.md"
REGENERATE = "python -m orchestrator.engine._playbook_doc > docs/playbook.md"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under *root* with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def example_from_reference() -> str:
    """The ```yaml block under '## Example', as a reader would copy it."""
    text = REFERENCE.read_text()
    after = text.split("## Example", 1)[1]
    return after.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_reference_matches_the_declarations() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/playbook.md is stale: regenerate it with `{REGENERATE}`"
    )


def test_reference_names_every_builtin_option() -> None:
    from orchestrator.engine._plugins import builtin_entry_points, load_plugin

    text = REFERENCE.read_text()
    for plugin in map(load_plugin, builtin_entry_points()):
        assert f"### `{plugin.name}`" in text  # type: ignore[attr-defined]
        for option in plugin.options:  # type: ignore[attr-defined]
            assert f"| `{option.key}` | {option.type_name} |" in text
    assert "the demo's plugin" in text


def test_example_from_the_reference_plans_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = example_from_reference()
    assert example == EXAMPLE
    book = tmp_path / "example.yaml"
    book.write_text(example)
    before = snapshot(tmp_path)
    assert main(["plan", str(book)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "playbook 'example'" in out
    assert f"kernel sim:{tmp_path / '.state/example/kernel'}" in out
    assert "load-next-kernel [kexec]" in out
    assert snapshot(tmp_path) == before  # plan changes nothing, not even sim:DIR
    playbook = load_playbook(book)
    assert [p.value for p in playbook.phases] == [
        "quiesce",
        "preserve",
        "prepare",
        "freeze",
        "restore",
        "finish",
    ]


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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param(schema.BUDGET, schema.DEFAULT_BLACKOUT_BUDGET, id="budget"),
        pytest.param(schema.DEFAULT_TIMEOUT, schema.DEFAULT_STEP_TIMEOUT, id="timeout"),
        pytest.param(schema.BACKOFF, RetryPolicy().backoff, id="backoff"),
        pytest.param(
            schema.MAX_BACKOFF_KEY, RetryPolicy().max_backoff, id="max-backoff"
        ),
        pytest.param(schema.ATTEMPTS, RetryPolicy().attempts, id="attempts"),
    ],
)
def test_documented_defaults_are_the_loaders(key: schema.Key, value: float) -> None:
    if key.kind == "integer":
        assert int(key.default) == value
    else:
        assert parse_duration(key.default, key.name) == value


def test_example_from_the_reference_runs(tmp_path: Path) -> None:
    """Written from the reference alone, the example goes through a whole
    live update (on the demo's simulated kernel, in the demo's directory)."""
    import subprocess
    import sys

    book = tmp_path / "example.yaml"
    book.write_text(example_from_reference())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "demo",
            str(book),
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("every byte came back") == 2  # count: 2
    assert "outcome completed" in done.stdout
