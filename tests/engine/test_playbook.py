"""Tests for playbook loading: the shipped playbooks, every error, and fuzzing."""

from __future__ import annotations

import errno
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.engine._phases import Phase
from orchestrator.engine._playbook import (
    NextKernel,
    Playbook,
    RetryPolicy,
    Where,
    format_duration,
    load_playbook,
    parse_duration,
    parse_playbook,
)
from orchestrator.engine._yaml import MAX_BYTES
from orchestrator.errors import OrchestratorError, PlaybookError

if TYPE_CHECKING:
    from collections.abc import Callable

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
KNOWN = frozenset({"workloads", "kexec", "qemu", "faults", "systemd"})
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MINIMAL = """\
name: t
phases:
  quiesce:
    steps:
      - plugin: workloads
"""


def parse(text: str, path: str = "pb.yaml") -> Playbook:
    return parse_playbook(textwrap.dedent(text), path, KNOWN, Path("/base"))


# -- the shipped playbooks -----------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(PLAYBOOKS.glob("*.yaml")), ids=lambda p: str(p.name)
)
def test_shipped_playbooks_load(path: Path) -> None:
    playbook = load_playbook(path, known_plugins=KNOWN)
    assert playbook.path == path
    assert playbook.steps()
    assert Phase.KEXEC not in playbook.phases
    assert list(playbook.phases) == [p for p in Phase if p in playbook.phases]


def test_shipped_playbooks_exist() -> None:
    names = {p.name for p in PLAYBOOKS.glob("*.yaml")}
    assert {"demo.yaml", "host-update.yaml"} <= names


def test_demo_playbook() -> None:
    path = PLAYBOOKS / "demo.yaml"
    playbook = load_playbook(str(path), KNOWN)
    root = PLAYBOOKS.parent
    assert playbook.name == "demo"
    assert playbook.kernel == f"sim:{root / '.state/demo/kernel'}"
    assert playbook.state_dir == root / ".state/demo"
    assert playbook.next_kernel == NextKernel(
        root / ".state/demo/vmlinuz-next", None, "console=ttyS0 liveupdate=on"
    )
    assert playbook.blackout_budget == 5.0
    assert [(s.phase, s.plugin) for s in playbook.steps()] == [
        (Phase.QUIESCE, "workloads"),
        (Phase.PRESERVE, "workloads"),
        (Phase.PREPARE, "kexec"),
        (Phase.FREEZE, "workloads"),
        (Phase.RESTORE, "workloads"),
        (Phase.FINISH, "workloads"),
    ]
    first = playbook.steps()[0]
    assert dict(first.options) == {"count": 2, "size_mib": 128}
    assert first.where == Where(str(path), first.where.line)
    assert str(first.where) == f"{path}:{first.where.line}"


def test_host_update_playbook() -> None:
    playbook = load_playbook(PLAYBOOKS / "host-update.yaml", KNOWN)
    assert playbook.kernel == "real"
    assert playbook.blackout_budget == 20.0
    nk = playbook.next_kernel
    assert nk is not None
    assert nk.image == Path("/boot/vmlinuz-7.2.13-luo")
    assert nk.initrd == Path("/boot/initrd.img-7.2.13-luo")
    assert nk.cmdline is not None
    assert "liveupdate=on" in nk.cmdline
    assert nk.via == "systemd"  # systemd keeps the host services' fd stores
    for phase, plugins in (
        (Phase.QUIESCE, ["qemu", "systemd"]),
        (Phase.PRESERVE, ["qemu"]),
        (Phase.FREEZE, ["qemu"]),
        (Phase.RESTORE, ["qemu", "systemd"]),
    ):
        plan = playbook.plan(phase)
        assert plan is not None
        assert [s.plugin for s in plan.steps] == plugins
    quiesce = playbook.plan(Phase.QUIESCE)
    assert quiesce is not None
    assert "vms" in quiesce.steps[0].options
    assert playbook.plan(Phase.KEXEC) is None


# -- the model -----------------------------------------------------------------


def test_minimal_defaults() -> None:
    playbook = parse(MINIMAL)
    assert playbook.description == ""
    assert playbook.kernel is None
    assert playbook.state_dir is None
    assert playbook.next_kernel is None
    assert playbook.blackout_budget == 10.0
    (step,) = playbook.steps()
    assert step.name == "workloads"
    assert step.timeout == 60.0
    assert step.retry == RetryPolicy()
    assert dict(step.options) == {}
    assert step.index == 0
    assert step.where == Where("pb.yaml", 5)
    plan = playbook.plan(Phase.QUIESCE)
    assert plan is not None
    assert plan.timeout is None
    assert plan.where == Where("pb.yaml", 3)
    assert playbook.plan(Phase.FINISH) is None


def test_phases_are_in_enum_order() -> None:
    playbook = parse(
        """\
        name: t
        phases:
          finish: {steps: [{plugin: workloads}]}
          quiesce: {steps: [{plugin: workloads}]}
          freeze: {timeout: 2s, steps: [{plugin: workloads}, {plugin: qemu}]}
        """
    )
    assert list(playbook.phases) == [Phase.QUIESCE, Phase.FREEZE, Phase.FINISH]
    assert [(s.phase, s.index) for s in playbook.steps()] == [
        (Phase.QUIESCE, 0),
        (Phase.FREEZE, 0),
        (Phase.FREEZE, 1),
        (Phase.FINISH, 0),
    ]
    freeze = playbook.plan(Phase.FREEZE)
    assert freeze is not None
    assert freeze.timeout == 2.0


def test_retry_merges_over_defaults() -> None:
    playbook = parse(
        """\
        name: t
        phases:
          quiesce:
            steps:
              - plugin: workloads
                retry: {attempts: 3, on_errno: [EBUSY]}
              - plugin: qemu
              - plugin: kexec
                timeout: 2s
                retry: {max_backoff: 1s}
        defaults:
          timeout: 30s
          retry: {attempts: 2, backoff: 250ms, max_backoff: 5s, on_errno: [EAGAIN]}
        """
    )
    first, second, third = playbook.steps()
    assert first.retry == RetryPolicy(3, 0.25, 5.0, frozenset({errno.EBUSY}))
    assert second.retry == RetryPolicy(2, 0.25, 5.0, frozenset({errno.EAGAIN}))
    assert third.retry == RetryPolicy(2, 0.25, 1.0, frozenset({errno.EAGAIN}))
    assert (first.timeout, second.timeout, third.timeout) == (30.0, 30.0, 2.0)


def test_relative_paths_resolve_against_playbook_dir(tmp_path: Path) -> None:
    sub = tmp_path / "books"
    sub.mkdir()
    path = sub / "p.yaml"
    path.write_text(
        MINIMAL
        + textwrap.dedent(
            """\
            kernel: sim:../state/kernel
            state_dir: state
            next_kernel:
              image: ../boot/vmlinuz
              initrd: /abs/initrd.img
            """
        )
    )
    playbook = load_playbook(path)
    assert playbook.kernel == f"sim:{tmp_path / 'state/kernel'}"
    assert playbook.state_dir == sub / "state"
    assert playbook.next_kernel == NextKernel(
        tmp_path / "boot/vmlinuz", Path("/abs/initrd.img"), None
    )


def test_parse_playbook_base_dir() -> None:
    playbook = parse(MINIMAL + "state_dir: x/../y\n")
    assert playbook.state_dir == Path("/base/y")


def test_error_str_starts_with_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nphases: {}\n")
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert info.value.path == str(path)
    assert info.value.line == 2
    assert isinstance(info.value, OrchestratorError)
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PlaybookError, match="cannot read") as info:
        load_playbook(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.line is None


def test_all_is_exported() -> None:
    import orchestrator.engine._playbook as module

    public = {n for n in vars(module) if not n.startswith("_") and n[0].isupper()}
    public |= {"load_playbook", "parse_playbook", "parse_duration", "format_duration"}
    public -= {"Any", "Final", "NoReturn", "Path", "PlaybookError", "Phase"}
    public -= {"TYPE_CHECKING"}
    assert set(module.__all__) == public
    assert all(hasattr(module, name) for name in module.__all__)


def test_error_without_line_message() -> None:
    exc = PlaybookError("f.yaml", None, "broken")
    assert str(exc) == "f.yaml: broken"
    assert str(PlaybookError("f.yaml", 3, "broken")) == "f.yaml:3: broken"


# -- errors --------------------------------------------------------------------

ERRORS = [
    pytest.param(
        "name: t\nphases:\n  quiesce: {steps: [{plugin: qemu}]}\n  quiese: {}\n",
        4,
        [
            "unknown phase 'quiese'",
            "valid: quiesce, preserve",
            "did you mean 'quiesce'",
        ],
        id="unknown-phase",
    ),
    pytest.param(
        "name: t\nphases:\n  kexec:\n    steps: [{plugin: kexec}]\n",
        3,
        ["'kexec' cannot be configured", "engine"],
        id="kexec-phase",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: workload\n",
        5,
        [
            "unknown plugin 'workload' (known: faults, kexec, qemu, systemd, workloads)",
            "did you mean 'workloads'",
        ],
        id="unknown-plugin-with-suggestion",
    ),
    pytest.param(
        "name: t\nblackout_budget: 5 seconds\nphases: {}\n",
        2,
        ["blackout_budget", "expected a duration", "'30s'"],
        id="bad-duration",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n"
        "        timeout: -5s\n",
        6,
        ["phases.quiesce.steps[0].timeout", "must not be negative"],
        id="negative-timeout",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    timeout: 0\n    steps: [{plugin: qemu}]\n",
        4,
        ["phases.quiesce.timeout", "greater than zero"],
        id="zero-timeout",
    ),
    pytest.param(
        "name: t\ndefaults:\n  retry:\n    attempts: true\nphases: {}\n",
        4,
        ["defaults.retry.attempts", "whole number"],
        id="bool-attempts",
    ),
    pytest.param(
        "name: t\ndefaults:\n  retry:\n    attempts: 0\nphases: {}\n",
        4,
        ["defaults.retry.attempts", "at least 1"],
        id="zero-attempts",
    ),
    pytest.param(
        "name: t\ndefaults:\n  retry:\n    on_errno:\n      - EAGAIN\n      - EBUSYY\n",
        6,
        ["unknown errno name 'EBUSYY'", "did you mean 'EBUSY'"],
        id="unknown-errno",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps: [{plugin: qemu}\n  freeze: x\n",
        5,
        ["invalid YAML"],
        id="yaml-syntax-error",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce: {steps: [{plugin: qemu}]}\nname: u\n",
        4,
        ["duplicate key 'name'", "line 1"],
        id="duplicate-key",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n"
        "        timout: 1s\n",
        6,
        [
            "unknown key 'timout'",
            "allowed: plugin, name, timeout",
            "did you mean 'timeout'",
        ],
        id="unknown-key-with-suggestion",
    ),
    pytest.param("", 1, ["empty"], id="empty-file"),
    pytest.param("# only a comment\n", 1, ["empty"], id="comments-only"),
    pytest.param(
        "\n- name: t\n- phases: {}\n",
        2,
        ["expected a mapping", "a list"],
        id="not-a-mapping",
    ),
    pytest.param(
        "name: t\nphases: {quiesce: {steps: [{plugin: qemu}]}}\n---\nname: u\n",
        3,
        ["single YAML document"],
        id="multiple-documents",
    ),
    pytest.param(
        "description: x\nphases:\n  quiesce: {steps: [{plugin: qemu}]}\n",
        1,
        ["missing required key 'name'"],
        id="missing-name",
    ),
    pytest.param(
        "name: t\n", 1, ["missing required key 'phases'"], id="missing-phases"
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps: []\n",
        4,
        ["phases.quiesce.steps", "at least one step"],
        id="empty-steps",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      plugin: qemu\n",
        5,
        ["phases.quiesce.steps", "expected a list of steps", "a mapping"],
        id="steps-not-a-list",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    timeout: 1s\n",
        3,
        ["phases.quiesce", "missing required key 'steps'"],
        id="missing-steps",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - name: x\n",
        5,
        ["missing required key 'plugin'"],
        id="missing-plugin",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n"
        "      - plugin: qemu\n",
        6,
        ["duplicate step name 'qemu'", "first on line 5"],
        id="duplicate-step-name",
    ),
    pytest.param(
        "name: [t]\n",
        1,
        ["name: expected a string, got a list"],
        id="name-not-a-string",
    ),
    pytest.param(
        "name: t\nkernel: fake\n", 2, ["expected 'real' or 'sim:DIR'"], id="bad-kernel"
    ),
    pytest.param(
        "name: t\nnext_kernel:\n  initrd: /x\n",
        2,
        ["next_kernel: missing required key 'image'"],
        id="next-kernel-without-image",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n"
        "        with: [1, 2]\n",
        6,
        ["steps[0].with: expected a mapping"],
        id="with-not-a-mapping",
    ),
    pytest.param(
        "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: qemu\n"
        "        with: {when: 2020-13-45}\n",
        6,
        ["steps[0].with.when: timestamp", "not plain data", "quote it"],
        id="with-bad-timestamp",
    ),
    pytest.param(
        "name: t\n1: x\n", 2, ["keys must be strings, got int"], id="non-string-key"
    ),
    pytest.param(
        "name: t\nphases: {}\n", 2, ["at least one of quiesce"], id="no-phases"
    ),
    pytest.param("name: t\tx: \x07\n", 1, ["invalid YAML"], id="control-character"),
    pytest.param(
        "base: {name: t}\nname: t\n", 1, ["unknown key 'base'"], id="unknown-top-key"
    ),
    pytest.param("<<: {name: t}\n", 1, ["merge keys"], id="merge-key"),
]


@pytest.mark.parametrize(("text", "line", "needles"), ERRORS)
def test_errors(text: str, line: int | None, needles: list[str]) -> None:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(text, "pb.yaml", KNOWN)
    message = str(info.value)
    prefix = "pb.yaml: " if line is None else f"pb.yaml:{line}: "
    assert message.startswith(prefix), message
    assert info.value.line == line
    for needle in needles:
        assert needle in message, message


def test_first_error_in_document_order() -> None:
    text = "name: t\nblackout_budget: x\nbogus: 1\n"
    with pytest.raises(PlaybookError) as info:
        parse_playbook(text, "pb.yaml")
    assert info.value.line == 2


def test_unknown_plugins_allowed_without_known_set() -> None:
    playbook = parse_playbook(MINIMAL.replace("workloads", "anything"))
    assert playbook.steps()[0].plugin == "anything"


# -- hostile input -------------------------------------------------------------

STEP_AT_5 = "name: t\nphases:\n  quiesce:\n    steps:\n      - plugin: workloads\n"
"""A playbook whose only step is on line 5; options and timeouts go after it."""


def alias_bomb(levels: int) -> str:
    """*levels* anchors of nine aliases each, inside the step's ``with:``."""
    lines = ["        with:", "          b0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"          b{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
        for i in range(1, levels)
    ]
    return STEP_AT_5 + "\n".join(lines) + "\n"


def error_of(text: str) -> PlaybookError:
    with pytest.raises(PlaybookError) as info:
        parse_playbook(text, "pb.yaml", KNOWN, Path("/base"))
    assert str(info.value).startswith(f"pb.yaml:{info.value.line}: "), info.value
    return info.value


def test_alias_bomb_is_refused_after_bounded_work() -> None:
    text = alias_bomb(9)  # 9**9 values once expanded
    started = time.monotonic()
    error = error_of(text)
    elapsed = time.monotonic() - started
    assert "aliases expand the document to more than 20000 values" in error.problem
    # The first anchor whose expansion crosses the bound holds 9**5 > 20000 values.
    assert error.line == 7 + 4
    assert elapsed < 1.0  # generous: the work is bounded by MAX_VALUES


def test_small_aliases_are_fine() -> None:
    playbook = parse(
        """\
        name: t
        defaults:
          retry: &r {attempts: 2}
        phases:
          quiesce:
            steps:
              - {plugin: workloads, retry: *r, with: {registry: &reg /r}}
          finish:
            steps:
              - {plugin: workloads, retry: *r, with: {registry: *reg}}
        """
    )
    assert [s.retry.attempts for s in playbook.steps()] == [2, 2]
    assert {s.options["registry"] for s in playbook.steps()} == {"/r"}


@pytest.mark.parametrize(
    ("text", "line", "needles"),
    [
        pytest.param(
            STEP_AT_5 + "        with: {a: &x [1, *x]}\n",
            6,
            ["alias *x is inside the collection it names"],
            id="recursive-alias",
        ),
        pytest.param(
            STEP_AT_5 + "        with: {a: " + "[" * 40 + "]" * 40 + "}\n",
            6,
            ["nested more than 32 levels deep"],
            id="too-deep",
        ),
        pytest.param(
            STEP_AT_5
            + "        with:\n          deep: &d "
            + "[" * 20
            + "]" * 20
            + "\n          again: "
            + "[" * 15
            + "*d"
            + "]" * 15
            + "\n",
            8,
            ["alias *d nests the document more than 32 deep"],
            id="too-deep-through-an-alias",
        ),
        pytest.param(
            STEP_AT_5 + "        with: {a: *nope}\n",
            6,
            ["alias *nope names no anchor"],
            id="undefined-alias",
        ),
        pytest.param(
            STEP_AT_5 + "        with: {a: &x 1,\n          b: &x 2}\n",
            7,
            ["anchor &x is already defined on line 6"],
            id="anchor-defined-twice",
        ),
        pytest.param(
            STEP_AT_5 + "        with:\n          a: 1\n          a: 2\n",
            8,
            ["duplicate key 'a' (first given on line 7)"],
            id="duplicate-key-in-with",
        ),
        pytest.param(
            STEP_AT_5
            + "        with:\n          vms:\n            - name: a\n"
            + "              qmp: /x\n              name: b\n",
            10,
            ["duplicate key 'name' (first given on line 8)"],
            id="duplicate-key-deeper",
        ),
        pytest.param(
            STEP_AT_5 + "        with:\n          a: {1: x,\n              0x1: y}\n",
            8,
            ["duplicate key '0x1' (first given on line 7)"],
            id="duplicate-key-equal-as-values",
        ),
        pytest.param(
            STEP_AT_5 + "        with:\n          a: {<<: {b: 1}, b: 2}\n",
            7,
            ["merge keys ('<<') are not supported"],
            id="merge-key-at-depth",
        ),
        pytest.param(
            STEP_AT_5 + "        timeout: " + "9" * 80 + "\n",
            6,
            ["a number of more than 64 characters"],
            id="huge-int",
        ),
        pytest.param(
            STEP_AT_5 + "        timeout: 1" + "0" * 50 + "\n",
            6,
            ["timeout: must be at most 24h"],
            id="timeout-too-long",
        ),
        pytest.param(
            STEP_AT_5 + "        timeout: 1.0e-13\n",
            6,
            ["timeout: must be at least 1ms"],
            id="timeout-too-short",
        ),
        pytest.param(
            STEP_AT_5 + "        timeout: 100us\n",
            6,
            ["timeout: must be at least 1ms"],
            id="timeout-too-short-with-unit",
        ),
        pytest.param(
            STEP_AT_5 + "        retry: {backoff: 3.6e+24}\n",
            6,
            ["retry.backoff: must be at most 1h"],
            id="backoff-too-long",
        ),
        pytest.param(
            STEP_AT_5 + "        retry: {max_backoff: 2h}\n",
            6,
            ["retry.max_backoff: must be at most 1h"],
            id="max-backoff-too-long",
        ),
        pytest.param(
            STEP_AT_5 + "        retry: {attempts: 100000000000000000000}\n",
            6,
            ["retry.attempts: must be at most 100"],
            id="attempts-too-many",
        ),
        pytest.param(
            "name: t\nblackout_budget: 2h\n",
            2,
            ["blackout_budget: must be at most 1h"],
            id="budget-too-long",
        ),
        pytest.param(
            STEP_AT_5 + '        with: {a: "x\\ud800"}\n',
            6,
            ["invalid Unicode character escape"],
            id="escaped-lone-surrogate",
        ),
        pytest.param(
            STEP_AT_5 + "        name: x\ud800y\n",
            6,
            ["lone surrogate U+D800"],
            id="lone-surrogate",
        ),
        pytest.param(
            STEP_AT_5 + '        with: {path: "/tmp/x\\0y"}\n',
            6,
            ["control character U+0000"],
            id="escaped-nul",
        ),
        pytest.param(
            STEP_AT_5 + "        with: {blob: !!binary aGVsbG8=}\n",
            6,
            ["with.blob: binary", "not plain data"],
            id="binary-option",
        ),
        pytest.param(
            STEP_AT_5 + "        with: {a: [1, {2: x}]}\n",
            6,
            ["with.a[1]: keys must be strings"],
            id="non-string-key-in-option",
        ),
        pytest.param(
            STEP_AT_5 + "        with: !!set {a, b}\n",
            6,
            ["with: expected a mapping"],
            id="set-as-options",
        ),
    ],
)
def test_hostile(text: str, line: int, needles: list[str]) -> None:
    error = error_of(text)
    assert error.line == line, error
    for needle in needles:
        assert needle in error.problem, error


def test_too_long_text() -> None:
    text = STEP_AT_5 + "# a comment\n" * (MAX_BYTES // 12 + 1)
    error = error_of(text)
    assert "longer than 128 KiB" in error.problem
    assert error.line is not None
    assert error.line > 5


def test_too_long_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(STEP_AT_5.encode() + b"#" * (4 * MAX_BYTES))
    with pytest.raises(PlaybookError, match="longer than 128 KiB") as info:
        load_playbook(path)
    assert info.value.line == 6


def test_non_utf8_bytes_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(STEP_AT_5.encode() + b"        name: caf\xe9\n")
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    assert str(info.value).startswith(f"{path}:6: not UTF-8 text")
    assert "byte 0xe9, column 18" in str(info.value)


def test_every_bound_is_inclusive() -> None:
    playbook = parse(
        STEP_AT_5
        + "        timeout: 24h\n        retry: {attempts: 100, backoff: 1h}\n"
        + "blackout_budget: 1ms\n"
    )
    (step,) = playbook.steps()
    assert (step.timeout, step.retry.attempts, step.retry.backoff) == (
        86400.0,
        100,
        3600.0,
    )
    assert playbook.blackout_budget == 0.001


def test_option_lines_are_recorded() -> None:
    (step,) = parse(
        STEP_AT_5 + "        with:\n          registry: /r\n          count: 2\n"
    ).steps()
    assert dict(step.option_lines) == {"registry": 7, "count": 8}
    assert dict(step.options) == {"registry": "/r", "count": 2}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        pytest.param(0.0, "0s", id="zero"),
        pytest.param(0.001, "1ms", id="ms"),
        pytest.param(0.1, "100ms", id="100ms"),
        pytest.param(5.0, "5s", id="s"),
        pytest.param(90.0, "90s", id="not-whole-minutes"),
        pytest.param(120.0, "2m", id="m"),
        pytest.param(86400.0, "24h", id="h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "t") == pytest.approx(seconds)


# -- durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(3, 3.0, id="int"),
        pytest.param(0.5, 0.5, id="float"),
        pytest.param(0, 0.0, id="zero"),
        pytest.param("250ms", 0.25, id="ms"),
        pytest.param("30s", 30.0, id="s"),
        pytest.param("1.5m", 90.0, id="m"),
        pytest.param("2h", 7200.0, id="h"),
        pytest.param("100us", 1e-4, id="us"),
        pytest.param(" 5 s ", 5.0, id="spaces"),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "t") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(True, id="bool"),
        pytest.param(-1, id="negative"),
        pytest.param("-1s", id="negative-str"),
        pytest.param("5", id="no-unit"),
        pytest.param("5 days", id="bad-unit"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(None, id="none"),
        pytest.param([1], id="list"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^timeout: "):
        parse_duration(value, "timeout")


# -- fuzzing -------------------------------------------------------------------


def _only_playbook_errors(text: str) -> None:
    try:
        parse_playbook(text, "fuzz.yaml", KNOWN, Path("/base"))
    except PlaybookError as exc:
        error: PlaybookError | None = exc
    else:
        error = None
    assert error is None or str(error).startswith("fuzz.yaml")


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_text(text: str) -> None:
    _only_playbook_errors(text)


SCHEMA_KEYS = [
    "name",
    "description",
    "kernel",
    "state_dir",
    "next_kernel",
    "image",
    "initrd",
    "cmdline",
    "blackout_budget",
    "defaults",
    "timeout",
    "retry",
    "attempts",
    "backoff",
    "max_backoff",
    "on_errno",
    "phases",
    *(p.value for p in Phase),
    "steps",
    "plugin",
    "with",
    *sorted(KNOWN),
]
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["1s", "250ms", "EAGAIN", "real", "sim:x", "workloads", "-1s"])
)
_keys = st.sampled_from(SCHEMA_KEYS) | st.text(max_size=10)
_yamlish = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=6)
    ),
    max_leaves=30,
)


@FUZZ
@given(st.dictionaries(_keys, _yamlish, max_size=8))
def test_fuzz_structures(doc: dict[str, Any]) -> None:
    _only_playbook_errors(yaml.safe_dump(doc, allow_unicode=True))


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a key or list item inside *value*."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return out
    for key, child in items:
        out.append((*here, key))
        out.extend(_paths(child, (*here, key)))
    return out


def _mutate(
    doc: Any, path: tuple[Any, ...], change: Callable[[Any, Any], None]
) -> None:
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    change(parent, path[-1])


def _delete(parent: Any, key: Any) -> None:
    del parent[key]


def _replacer(new: Any) -> Callable[[Any, Any], None]:
    def replace(parent: Any, key: Any) -> None:
        parent[key] = new

    return replace


@FUZZ
@given(st.data())
def test_fuzz_demo_mutations(data: st.DataObject) -> None:
    doc = yaml.safe_load((PLAYBOOKS / "demo.yaml").read_text())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(doc)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        if data.draw(st.booleans(), label="delete"):
            _mutate(doc, path, _delete)
        else:
            _mutate(doc, path, _replacer(data.draw(_yamlish, label="value")))
    _only_playbook_errors(yaml.safe_dump(doc, allow_unicode=True))
