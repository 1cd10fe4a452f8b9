"""Plugin options: each plugin's declared schema, checked before anything runs."""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest

from orchestrator import (
    Option,
    PluginError,
    check_options,
    option_value,
    plugin_manager,
)
from orchestrator.cli import main
from orchestrator.engine._engine import check_playbook
from orchestrator.engine._playbook import parse_playbook
from orchestrator.engine._plugins import builtin_entry_points

ROOT = Path(__file__).resolve().parents[2]


def problems(text: str, extra: tuple[object, ...] = ()) -> list[str]:
    pm = plugin_manager(load_entry_points=False, extra=extra)
    return check_playbook(pm, parse_playbook(textwrap.dedent(text), "p.yaml"))


# -- the Option declaration ------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        pytest.param(
            Option("n", int, "d"), True, "expected an integer", id="bool-not-int"
        ),
        pytest.param(Option("n", int, "d"), 1.5, "got a number", id="float-not-int"),
        pytest.param(Option("n", float, "d"), float("nan"), "finite", id="nan"),
        pytest.param(Option("n", int, "d", max=3), 4, "within <= 3", id="above-max"),
        pytest.param(Option("n", int, "d", min=1, max=3), 0, "1 .. 3", id="below-min"),
        pytest.param(Option("s", str, "d"), ["x"], "got a list", id="list-not-str"),
        pytest.param(
            Option("s", list, "d", check=lambda v: None if v else "empty"),
            [],
            "empty",
            id="deeper-check",
        ),
    ],
)
def test_option_refuses(option: Option, value: object, problem: str) -> None:
    found = option.problem(value)
    assert found is not None
    assert problem in found


@pytest.mark.parametrize(
    ("option", "value"),
    [
        pytest.param(Option("n", float, "d"), 3, id="int-is-a-number"),
        pytest.param(Option("b", bool, "d"), False, id="bool"),
        pytest.param(Option("x", (int, str), "d"), "0x10", id="either-type"),
        pytest.param(Option("n", int, "d", min=1, max=3), 3, id="bound-inclusive"),
    ],
)
def test_option_accepts(option: Option, value: object) -> None:
    assert option.problem(value) is None


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Option("x", set, "d"), id="unsupported-type"),
        pytest.param(lambda: Option("", str, "d"), id="empty-key"),
        pytest.param(lambda: Option("x", int, "d", min=3, max=1), id="min-above-max"),
        pytest.param(lambda: Option("x", int, "d", default="2"), id="bad-default"),
    ],
)
def test_option_declaration_is_checked(make: Any) -> None:
    with pytest.raises(ValueError, match="option"):
        make()


def test_check_options_and_option_value() -> None:
    schema = (
        Option("size_mib", int, "d", default=128, min=1),
        Option("target", str, "d", required=True),
    )
    assert check_options(schema, {"size_mb": 2, "size_mib": None}) == [
        (
            "size_mb",
            "unknown option 'size_mb' (known: size_mib, target); "
            "did you mean 'size_mib'?",
        ),
        ("target", "missing required option 'target'"),
    ]
    assert option_value({"size_mib": None}, schema, "size_mib") == 128
    assert option_value({"size_mib": 4}, schema, "size_mib") == 4
    with pytest.raises(KeyError):
        option_value({}, schema, "nope")


# -- the built-in plugins --------------------------------------------------------

_READS = re.compile(
    r"""(?:options|opts)(?:\.get\(|\[)["'](\w+)["']"""
    r"""|option_value\([^,]+,\s*OPTIONS,\s*["'](\w+)["']\)"""
)


BUILTIN_PLUGINS = {ep.name: ep.value for ep in builtin_entry_points()}


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_plugin_declares_every_option_it_reads(name: str) -> None:
    module_name, _, class_name = BUILTIN_PLUGINS[name].partition(":")
    module = importlib.import_module(module_name)
    plugin = getattr(module, class_name)
    declared = {option.key for option in plugin.options}
    read = {a or b for a, b in _READS.findall(inspect.getsource(module))}
    if name == "workloads":
        # `liveupdate demo` reads these from the first quiesce step.
        source = (ROOT / "orchestrator/cli/_update.py").read_text()
        read |= {a or b for a, b in _READS.findall(source)} & {"count", "size_mib"}
        assert {"count", "size_mib"} <= read
    assert read, name
    assert read <= declared, f"{name} reads undeclared options {read - declared}"


def test_workloads_is_the_demos_plugin() -> None:
    module = importlib.import_module("plugins.workloads")
    assert "the demo's plugin" in (module.__doc__ or "")


STEP = (
    "name: x\nphases:\n  quiesce:\n    steps:\n      - plugin: workloads\n"
    "        with:\n          count: 2\n"
)


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        pytest.param(
            "          size_mb: 64\n",
            ["p.yaml:8:", "with.size_mb", "did you mean 'size_mib'?"],
            id="typo",
        ),
        pytest.param(
            "          size_mib: lots\n",
            ["p.yaml:8:", "with.size_mib", "expected an integer, got a string"],
            id="wrong-type",
        ),
        pytest.param(
            "          size_mib: 100000\n",
            ["p.yaml:8:", "with.size_mib", "within 1 .. 16384"],
            id="out-of-bounds",
        ),
        pytest.param(
            "          registry: [a]\n",
            ["p.yaml:8:", "with.registry", "got a list"],
            id="registry-not-a-string",
        ),
    ],
)
def test_bad_options_are_reported_at_their_line(extra: str, needles: list[str]) -> None:
    (problem,) = problems(STEP + extra)
    for needle in needles:
        assert needle in problem, problem


def test_null_means_the_default() -> None:
    assert problems(STEP + "          size_mib: null\n") == []


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(
            "{plugin: qemu, with: {vms: [a, {name: b, qmp: /q}], probe: [0x10, '0x20']}}",
            id="qemu",
        ),
        pytest.param(
            "{plugin: faults, with: {hang: 1, fail: x, kill_self: false}}", id="faults"
        ),
    ],
)
def test_good_options_pass(step: str) -> None:
    assert problems(f"name: x\nphases:\n  quiesce:\n    steps:\n      - {step}\n") == []


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        pytest.param(
            "{vms: [{name: a, qmpp: /q}]}", "item 0: expected a VM name", id="vm-key"
        ),
        pytest.param("{probe: [nope]}", "guest-physical addresses", id="probe"),
        pytest.param("{qmp_timeout: 0}", "within 0.001 .. 3600", id="qmp-timeout"),
    ],
)
def test_qemu_options_are_checked_deeply(options: str, needle: str) -> None:
    text = f"name: x\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n        with: {options}\n"
    (problem,) = problems(text)
    assert problem.startswith("p.yaml:6:"), problem
    assert needle in problem


def test_plugin_without_schema_gets_options_unchecked() -> None:
    from orchestrator import hookimpl

    class Plugin:
        name = "acme"

        @hookimpl
        async def lu_quiesce(self, ctx: object) -> None:
            pass

    text = (
        "name: x\nphases:\n  quiesce:\n    steps:\n      - plugin: acme\n"
        "        with: {anything: [1, {deep: true}]}\n"
    )
    assert problems(text, extra=(Plugin(),)) == []


def test_malformed_schema_fails_at_start_up() -> None:
    class Plugin:
        name = "broken"
        options: ClassVar[dict[str, type]] = {"size": int}

    with pytest.raises(PluginError, match="'options' must be a tuple"):
        plugin_manager(load_entry_points=False, extra=[Plugin()])


def test_plan_refuses_a_typo_in_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    book = tmp_path / "p.yaml"
    book.write_text(STEP + "          size_mb: 64\n")
    assert main(["plan", str(book)]) == 2
    err = capsys.readouterr().err
    assert f"error: {book}:8: phases.quiesce.steps[0].with.size_mb" in err
    assert "did you mean 'size_mib'?" in err
