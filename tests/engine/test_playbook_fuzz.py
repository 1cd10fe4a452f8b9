"""A seeded fuzzer over hostile playbooks.

Every case starts from a shipped playbook (or from nothing) and mutates it:
alias bombs, huge and tiny numbers, duplicate keys at depth, bad encodings,
control characters and escapes, deep nesting, random byte flips, truncations
and line splices. Each must give either a valid playbook (which
``check_playbook`` then checks without raising) or a :class:`PlaybookError`
whose message starts with ``file:line``, within a generous time bound: the
loader's work is bounded (:mod:`orchestrator.engine._yaml`), so a case that takes
seconds is a bomb that got through.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator import PlaybookError, plugin_manager
from orchestrator.engine._engine import check_playbook
from orchestrator.engine._playbook import load_playbook

if TYPE_CHECKING:
    from collections.abc import Callable

    import pluggy

    from orchestrator import Playbook

SEED = 0x10_5EED
CASES = 400
PER_CASE_SECONDS = 2.0  # generous: a bounded load takes milliseconds
PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"
SOURCES = [p.read_bytes() for p in sorted(PLAYBOOKS.glob("*.yaml"))]
KNOWN = frozenset({"workloads", "kexec", "qemu", "faults"})

_FIELD = re.compile(
    rb"^(?P<head>\s*(?:- )?(?:timeout|attempts|backoff|max_backoff|blackout_budget"
    rb"|count|size_mib|qmp_timeout):\s*)\S.*$",
    re.MULTILINE,
)
_KEY_AT_DEPTH = re.compile(rb"^ {4,}[a-z_]+:.*$", re.MULTILINE)
_NUMBERS = [
    # Within every bound (a count or size too: 1 .. 64, 1 .. 16384).
    b"1",
    b"2",
    b"1ms",
    b"30s",
    b"1h",
    # Outside some bound, or not a number at all.
    b"0",
    b"-0",
    b"-1",
    b"1e-13",
    b"1.0e-13",
    b"0.0000001",
    b"3.6e+24",
    b"1" + b"0" * 40,
    b"9" * 63,
    b"9" * 65,
    b"9" * 5000,
    b"0x" + b"f" * 60,
    b".inf",
    b"-.inf",
    b".nan",
    b"1_000_000_000_000",
    b"190:20:30",
    b"1e400s",
    b"99999999h",
    b"0.0001ms",
    b"true",
    b"~",
    b"[]",
    b"{}",
]
_BAD_BYTES = [
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\x00",
    b"\x07",
    b"\x1b[31m",
    b"\xef\xbb\xbf",
    b"\xe2\x80\xa8",
    b"\xc2\x85",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
]
_ESCAPES = [r"\x00", r"\ud800", r"\udfff", r"\U0010ffff", r"\e", r"\x85", r"\u2028"]


def _line_positions(data: bytes) -> list[int]:
    return [0, *(i + 1 for i, b in enumerate(data) if b == 0x0A)]


def flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def splice(rng: random.Random, data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    if rng.random() < 0.5:
        return b"".join(lines[:i] + lines[i + 1 :])
    j = rng.randrange(len(lines))
    return b"".join([*lines[:i], lines[j], *lines[i:]])


def duplicate_key(rng: random.Random, data: bytes) -> bytes:
    match = rng.choice(list(_KEY_AT_DEPTH.finditer(data)))
    return data[: match.end()] + b"\n" + match.group() + data[match.end() :]


def number(rng: random.Random, data: bytes) -> bytes:
    match = rng.choice(list(_FIELD.finditer(data)))
    return (
        data[: match.start()]
        + match["head"]
        + rng.choice(_NUMBERS)
        + data[match.end() :]
    )


def bomb(rng: random.Random, data: bytes) -> bytes:
    levels, width = rng.randint(3, 12), rng.randint(2, 10)
    lines = [b"    steps:\n      - plugin: workloads\n        with:\n"]
    lines.append(b"          b0: &a0 [" + b", ".join([b"lol"] * width) + b"]\n")
    lines += [
        b"          b%d: &a%d [" % (i, i)
        + b", ".join([b"*a%d" % (i - 1)] * width)
        + b"]\n"
        for i in range(1, levels)
    ]
    return b"name: bomb\nphases:\n  finish:\n" + b"".join(lines)


def bad_bytes(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + rng.choice(_BAD_BYTES) + data[at:]


def escape(rng: random.Random, data: bytes) -> bytes:
    at = rng.choice(_line_positions(data))
    text = "".join(rng.choice(_ESCAPES) for _ in range(rng.randint(1, 3)))
    return data[:at] + f'description: "x{text}y"\n'.encode() + data[at:]


def deep(rng: random.Random, data: bytes) -> bytes:
    n = rng.randint(20, 200)
    return data.replace(
        b"      - plugin: workloads\n",
        b"      - plugin: workloads\n        with: {registry: "
        + b"[" * n
        + b"]" * n
        + b"}\n",
        1,
    )


def noise(rng: random.Random, data: bytes) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    flip,
    flip,
    truncate,
    splice,
    duplicate_key,
    number,
    number,
    bomb,
    bad_bytes,
    escape,
    deep,
    noise,
]


def _cases() -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    cases = []
    for i in range(CASES):
        mutate = rng.choice(MUTATORS)
        data = rng.choice(SOURCES)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            data = mutate(rng, data) if data else data
        cases.append((f"{i:03d}-{mutate.__name__}", data))
    return cases


FUZZ_CASES = _cases()


def load(path: Path) -> Playbook | PlaybookError:
    try:
        return load_playbook(path, KNOWN)
    except PlaybookError as exc:
        return exc


@pytest.fixture(scope="module")
def pm() -> pluggy.PluginManager:
    return plugin_manager(load_entry_points=False)


@pytest.mark.parametrize("data", [pytest.param(d, id=name) for name, d in FUZZ_CASES])
def test_fuzzed_playbook(data: bytes, tmp_path: Path, pm: pluggy.PluginManager) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    started = time.monotonic()
    outcome = load(path)
    if isinstance(outcome, PlaybookError):
        assert outcome.line is not None, outcome
        assert outcome.line >= 1, outcome
        assert str(outcome).startswith(f"{path}:{outcome.line}: "), outcome
    else:
        for problem in check_playbook(pm, outcome):
            assert re.match(rf"{re.escape(str(path))}:\d+: ", problem), problem
    assert time.monotonic() - started < PER_CASE_SECONDS


def test_fuzzer_reaches_both_outcomes(tmp_path: Path) -> None:
    """The mutations are neither all fatal nor all harmless."""
    valid = 0
    for name, data in FUZZ_CASES:
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(data)
        valid += not isinstance(load(path), PlaybookError)
    assert 0.05 * CASES < valid < 0.95 * CASES, valid
