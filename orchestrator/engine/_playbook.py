"""Load and validate a YAML playbook into frozen dataclasses.

A playbook names the plugins that run in each phase of a live update, with
their options, timeouts and retry policies. Loading walks the YAML *node* tree
rather than the constructed objects, so every problem is reported as a
:class:`~orchestrator.PlaybookError` naming ``file:line`` and what was
expected there. Only the first problem, in document order, is raised.

The tree comes from :mod:`orchestrator.engine._yaml`, which bounds the document
(size, nesting, alias expansion) and refuses duplicate and merge keys at every
depth; the keys of each section and their bounds (timeouts 1ms .. 24h,
attempts 1 .. 100, ...) are declared in :mod:`orchestrator.engine._playbook_schema`,
which ``docs/playbook.md`` is generated from. A step's ``with:`` must be plain
data; the plugin's declared options are checked by
:func:`orchestrator.engine._engine.check_playbook`, which knows the plugins.

.. versionadded:: 0.1
.. versionchanged:: 0.2
   Bounded composition, bounds on every number, plain-data options.
"""

from __future__ import annotations

import difflib
import errno
import logging
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, final

import yaml

from orchestrator.errors import PlaybookError

from . import _playbook_schema as _schema
from ._phases import Phase
from ._yaml import MAX_BYTES as _MAX_BYTES
from ._yaml import compose

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

__all__ = [
    "KEXEC_VIA",
    "NextKernel",
    "PhasePlan",
    "Playbook",
    "RetryPolicy",
    "Step",
    "Where",
    "format_duration",
    "load_playbook",
    "parse_duration",
    "parse_playbook",
]

logger = logging.getLogger(__name__)

_DURATION_EXAMPLE: Final = (
    "a number of seconds or a string such as '30s', '250ms', '1.5m'"
)
_UNITS: Final[Mapping[str, float]] = types.MappingProxyType(
    {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
)
_DURATION_RE: Final = re.compile(
    r"\s*(?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>us|µs|ms|s|m|h)\s*"
)


def _names(section: str) -> tuple[str, ...]:
    return tuple(key.name for key in _schema.SECTIONS[section])


_TOP_KEYS: Final = _names("playbook")
_NEXT_KERNEL_KEYS: Final = _names("next_kernel")
#: The ways to start the next kernel (``next_kernel.via``).
KEXEC_VIA: Final = ("syscall", "systemd")
_DEFAULTS_KEYS: Final = _names("defaults")
_RETRY_KEYS: Final = _names("retry")
_PHASE_KEYS: Final = _names("phases.PHASE")
_STEP_KEYS: Final = _names("step")

_STR_TAG: Final = "tag:yaml.org,2002:str"
_NULL_TAG: Final = "tag:yaml.org,2002:null"
_SEQ_TAG: Final = "tag:yaml.org,2002:seq"
_PLAIN_TAGS: Final = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null")
)
_CONFIGURABLE: Final = tuple(p for p in Phase if p.configurable)


# -- the model -----------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Where:
    """A place in a playbook file, for messages.

    :param file: the playbook's path as it was given.
    :param line: the 1-based line number.
    """

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@final
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step is retried when it fails with a transient error.

    :param attempts: total tries, at least 1 (1 means no retry).
    :param backoff: first wait between tries, in seconds.
    :param max_backoff: the longest wait between tries, in seconds.
    :param on_errno: errno numbers worth retrying on (empty: any transient error).
    """

    attempts: int = 1
    backoff: float = 0.1
    max_backoff: float = 5.0
    on_errno: frozenset[int] = frozenset()


@final
@dataclass(frozen=True, slots=True)
class NextKernel:
    """The kernel to kexec into.

    :param image: absolute path of the kernel image.
    :param initrd: absolute path of the initramfs, or ``None`` for none.
    :param cmdline: the command line, or ``None`` for the running kernel's.
    """

    image: Path
    initrd: Path | None
    cmdline: str | None
    #: How the kexec is started: ``"syscall"`` (``reboot(KEXEC)``, the
    #: fastest) or ``"systemd"`` (``systemctl kexec``: an orderly shutdown).
    via: str = "syscall"


@final
@dataclass(frozen=True, slots=True)
class Step:
    """One plugin call in one phase.

    :param phase: the phase the step runs in.
    :param plugin: the plugin's registered name.
    :param name: a label for logs and metrics (the plugin name by default).
    :param options: the step's ``with:`` mapping, as plain Python values.
    :param timeout: seconds one try may take.
    :param retry: the retry policy, merged over ``defaults.retry``.
    :param where: where the step is written.
    :param index: the step's position within its phase, from 0.
    :param option_lines: the line of each key of ``with:``, for messages about
        an option (see :func:`orchestrator.check_options`).
    """

    phase: Phase
    plugin: str
    name: str
    options: Mapping[str, Any]
    timeout: float
    retry: RetryPolicy
    where: Where
    index: int
    option_lines: Mapping[str, int] = field(
        default_factory=lambda: types.MappingProxyType({})
    )


@final
@dataclass(frozen=True, slots=True)
class PhasePlan:
    """The steps of one phase, in the order they run.

    :param phase: the phase.
    :param timeout: the budget for the whole phase in seconds, or ``None``.
    :param steps: the steps, at least one.
    :param where: where the phase is written.
    """

    phase: Phase
    timeout: float | None
    steps: tuple[Step, ...]
    where: Where


@final
@dataclass(frozen=True, slots=True)
class Playbook:
    """A validated playbook.

    :param name: the playbook's name.
    :param description: free text, ``""`` by default.
    :param path: the file it was loaded from.
    :param kernel: ``"real"``, ``"sim:/abs/dir"``, or ``None`` (the caller decides).
    :param state_dir: absolute directory for the journal and state, or ``None``.
    :param next_kernel: the kernel to kexec into, or ``None``.
    :param blackout_budget: seconds workloads may stay frozen across the kexec.
    :param phases: the configured phases, in :class:`Phase` order.
    """

    name: str
    description: str
    path: Path
    kernel: str | None
    state_dir: Path | None
    next_kernel: NextKernel | None
    blackout_budget: float
    phases: Mapping[Phase, PhasePlan]

    def steps(self) -> tuple[Step, ...]:
        """Return every step, in phase order and then in file order."""
        return tuple(step for plan in self.phases.values() for step in plan.steps)

    def plan(self, phase: Phase) -> PhasePlan | None:
        """Return the plan for *phase*, or ``None`` if the playbook has none."""
        return self.phases.get(phase)


# -- durations -----------------------------------------------------------------


def parse_duration(value: object, what: str) -> float:
    """Convert a playbook duration to seconds.

    :param value: a non-negative number of seconds, or a string with a unit
        (``us``, ``ms``, ``s``, ``m``, ``h``), e.g. ``"250ms"`` or ``"1.5m"``.
    :param what: the field's name, for the message.
    :raises ValueError: for booleans, negative or non-finite values, and
        anything else that is not a duration.
    :return: the duration in seconds.

    .. versionadded:: 0.1
    """
    seconds: float
    if isinstance(value, bool):
        raise ValueError(
            f"{what}: expected a duration ({_DURATION_EXAMPLE}), got {value!r}"
        )
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{what}: {value} seconds is too long") from None
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{what}: expected a duration ({_DURATION_EXAMPLE}), got {value!r}"
            )
        seconds = float(match["num"]) * _UNITS[match["unit"]]
    else:
        raise ValueError(
            f"{what}: expected a duration ({_DURATION_EXAMPLE}), "
            f"got {type(value).__name__}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what}: expected a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    return seconds


# -- loading -------------------------------------------------------------------


def load_playbook(
    path: str | os.PathLike[str], known_plugins: Collection[str] | None = None
) -> Playbook:
    """Read and validate the playbook at *path*.

    Relative paths in the playbook are resolved against its directory.

    :param path: the YAML file.
    :param known_plugins: if given, step plugins must be among these names.
    :raises PlaybookError: if the file cannot be read or is malformed; the
        message names ``file:line`` and what was expected.
    :return: the playbook.

    .. versionadded:: 0.1
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise PlaybookError(name, None, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > _MAX_BYTES:
        line = data.count(b"\n", 0, _MAX_BYTES) + 1
        raise PlaybookError(
            name, line, f"the playbook is longer than {_MAX_BYTES // 1024} KiB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PlaybookError(
            name,
            line,
            f"not UTF-8 text: {exc.reason} (byte 0x{data[exc.start]:02x}, "
            f"column {column})",
        ) from exc
    base = Path(os.path.abspath(name)).parent
    return parse_playbook(text, name, known_plugins, base)


def parse_playbook(
    text: str,
    path: str = "<string>",
    known_plugins: Collection[str] | None = None,
    base_dir: Path | None = None,
) -> Playbook:
    """Validate playbook *text*.

    :param text: the YAML.
    :param path: the name to use in messages and :attr:`Playbook.path`.
    :param known_plugins: if given, step plugins must be among these names.
    :param base_dir: the directory relative paths are resolved against; by
        default the directory of *path*, or the current one for ``<string>``.
    :raises PlaybookError: at the first problem, naming ``file:line``.
    :return: the playbook.

    .. versionadded:: 0.1
    """
    if base_dir is None:
        base_dir = Path.cwd() if path.startswith("<") else Path(path).parent
    root = compose(text, path)
    if root is None:
        raise PlaybookError(
            path, 1, "the file is empty; expected a mapping with 'name' and 'phases'"
        )
    known = None if known_plugins is None else frozenset(known_plugins)
    playbook = _Parser(path, Path(os.path.abspath(base_dir)), known).playbook(root)
    logger.debug("loaded playbook %r from %s", playbook.name, path)
    return playbook


def format_duration(seconds: float) -> str:
    """Write *seconds* the way a playbook would: ``"100ms"``, ``"5s"``, ``"24h"``.

    .. versionadded:: 0.2
    """
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds == 0 or seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _close(word: str, choices: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    tag = str(node.tag).rsplit(":", 1)[-1]
    return f"{tag} {node.value!r}" if tag in ("str", "int", "float", "bool") else tag


@dataclass(slots=True)
class _StepDraft:
    """A step before ``defaults`` (which may come later in the file) is applied."""

    phase: Phase
    plugin: str
    name: str
    options: Mapping[str, Any]
    option_lines: Mapping[str, int]
    timeout: float | None
    retry: dict[str, Any]
    where: Where
    index: int


class _Parser:
    """Walks one document's node tree; raises at the first problem."""

    def __init__(self, path: str, base: Path, known: frozenset[str] | None) -> None:
        self.path = path
        self.base = base
        self.known = known

    def fail(self, node: yaml.Node, problem: str) -> NoReturn:
        raise PlaybookError(self.path, _line(node), problem)

    def where(self, node: yaml.Node) -> Where:
        return Where(self.path, _line(node))

    # -- structure ----------------------------------------------------------

    def items(
        self, node: yaml.Node, what: str, allowed: Sequence[str] | None
    ) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
        """Yield ``(key, key_node, value_node)`` in file order, checking keys.

        :param allowed: the valid keys, or ``None`` to accept any string key.
        """
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what}: expected a mapping, got {_describe(node)}")
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.fail(key_node, f"{what}: merge keys ('<<') are not supported")
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG):
                self.fail(
                    key_node, f"{what}: keys must be strings, got {_describe(key_node)}"
                )
            key = str(key_node.value)
            if key in seen:
                self.fail(
                    key_node,
                    f"{what}: duplicate key {key!r} (first given on line {seen[key]})",
                )
            seen[key] = _line(key_node)
            if allowed is not None and key not in allowed:
                self.fail(
                    key_node,
                    f"{what}: unknown key {key!r} (allowed: {', '.join(allowed)})"
                    + _close(key, allowed),
                )
            yield key, key_node, value_node

    def need(
        self, node: yaml.Node, what: str, given: Collection[str], key: str
    ) -> None:
        if key not in given:
            self.fail(node, f"{what}: missing required key {key!r}")

    def construct(self, node: yaml.Node, what: str) -> Any:
        """Build plain Python values from *node*, as ``yaml.safe_load`` would."""
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_document(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            detail = getattr(exc, "problem", None) or str(exc)
            self.fail(node, f"{what}: invalid value: {detail}")
        finally:
            loader.dispose()

    # -- scalars ------------------------------------------------------------

    def string(self, node: yaml.Node, what: str, *, empty: bool = True) -> str:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG):
            self.fail(node, f"{what}: expected a string, got {_describe(node)}")
        value = str(node.value)
        if not empty and not value.strip():
            self.fail(node, f"{what}: must not be empty")
        return value

    def path_of(self, node: yaml.Node, what: str) -> Path:
        raw = self.string(node, what, empty=False)
        return Path(os.path.abspath(self.base / raw))

    def duration(self, node: yaml.Node, what: str, key: _schema.Key) -> float:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(
                node,
                f"{what}: expected a duration ({_DURATION_EXAMPLE}), "
                f"got {_describe(node)}",
            )
        value = self.construct(node, what)
        try:
            seconds = parse_duration(value, what)
        except ValueError as exc:
            self.fail(node, str(exc))
        self.bounded(node, what, key, seconds, format_duration)
        return seconds

    def bounded(
        self,
        node: yaml.Node,
        what: str,
        key: _schema.Key,
        number: float,
        show: Callable[[float], str],
    ) -> None:
        """Refuse *number* outside the bounds *key* declares."""
        if key.low is not None and number < key.low:
            self.fail(
                node,
                f"{what}: must be at least {show(key.low)}, got {node.value}"
                + (" (it must be greater than zero)" if key.low > 0 >= number else ""),
            )
        if key.high is not None and number > key.high:
            self.fail(
                node, f"{what}: must be at most {show(key.high)}, got {node.value}"
            )

    # -- sections -----------------------------------------------------------

    def playbook(self, root: yaml.Node) -> Playbook:
        if not isinstance(root, yaml.MappingNode):
            self.fail(
                root,
                "expected a mapping with 'name' and 'phases' at the top level, "
                f"got {_describe(root)}",
            )
        name = ""
        description = ""
        kernel: str | None = None
        state_dir: Path | None = None
        next_kernel: NextKernel | None = None
        budget = _schema.DEFAULT_BLACKOUT_BUDGET
        step_timeout = _schema.DEFAULT_STEP_TIMEOUT
        retry: dict[str, Any] = {}
        drafts: dict[Phase, tuple[float | None, list[_StepDraft], Where]] = {}
        given: list[str] = []
        for key, key_node, value in self.items(root, "playbook", _TOP_KEYS):
            given.append(key)
            if key == "name":
                name = self.string(value, "name", empty=False)
            elif _is_null(value):
                continue
            elif key == "description":
                description = self.string(value, "description")
            elif key == "kernel":
                kernel = self.kernel(value)
            elif key == "state_dir":
                state_dir = self.path_of(value, "state_dir")
            elif key == "next_kernel":
                next_kernel = self.next_kernel(key_node, value)
            elif key == "blackout_budget":
                budget = self.duration(value, "blackout_budget", _schema.BUDGET)
            elif key == "defaults":
                step_timeout, retry = self.defaults(value)
            else:
                drafts = self.phases(value)
        self.need(root, "playbook", given, "name")
        self.need(root, "playbook", given, "phases")
        phases: dict[Phase, PhasePlan] = {}
        for phase in Phase:
            if phase not in drafts:
                continue
            timeout, steps, where = drafts[phase]
            phases[phase] = PhasePlan(
                phase,
                timeout,
                tuple(self.finish(s, step_timeout, retry) for s in steps),
                where,
            )
        return Playbook(
            name=name,
            description=description,
            path=Path(self.path),
            kernel=kernel,
            state_dir=state_dir,
            next_kernel=next_kernel,
            blackout_budget=budget,
            phases=types.MappingProxyType(phases),
        )

    def kernel(self, node: yaml.Node) -> str:
        value = self.string(node, "kernel")
        if value == "real":
            return value
        if value.startswith("sim:") and value[4:].strip():
            return f"sim:{os.path.abspath(self.base / value[4:])}"
        self.fail(
            node,
            f"kernel: expected 'real' or 'sim:DIR' (e.g. 'sim:.state/kernel'), got {value!r}",
        )

    def next_kernel(self, key_node: yaml.Node, node: yaml.Node) -> NextKernel:
        image: Path | None = None
        initrd: Path | None = None
        cmdline: str | None = None
        via = "syscall"
        for key, _, value in self.items(node, "next_kernel", _NEXT_KERNEL_KEYS):
            if key == "image":
                image = self.path_of(value, "next_kernel.image")
            elif _is_null(value):
                continue
            elif key == "initrd":
                initrd = self.path_of(value, "next_kernel.initrd")
            elif key == "via":
                via = self.string(value, "next_kernel.via")
                if via not in KEXEC_VIA:
                    self.fail(
                        value,
                        f"next_kernel.via: expected one of {', '.join(KEXEC_VIA)}, "
                        f"got {via!r}",
                    )
            else:
                cmdline = self.string(value, "next_kernel.cmdline")
        if image is None:
            self.fail(key_node, "next_kernel: missing required key 'image'")
        return NextKernel(image, initrd, cmdline, via)

    def defaults(self, node: yaml.Node) -> tuple[float, dict[str, Any]]:
        timeout = _schema.DEFAULT_STEP_TIMEOUT
        retry: dict[str, Any] = {}
        for key, _, value in self.items(node, "defaults", _DEFAULTS_KEYS):
            if _is_null(value):
                continue
            if key == "timeout":
                timeout = self.duration(
                    value, "defaults.timeout", _schema.DEFAULT_TIMEOUT
                )
            else:
                retry = self.retry(value, "defaults.retry")
        return timeout, retry

    def retry(self, node: yaml.Node, what: str) -> dict[str, Any]:
        """Parse a (partial) retry mapping; only the keys given are returned."""
        out: dict[str, Any] = {}
        for key, _, value in self.items(node, what, _RETRY_KEYS):
            field = f"{what}.{key}"
            if key == "attempts":
                attempts = self.construct(value, field)
                if isinstance(attempts, bool) or not isinstance(attempts, int):
                    self.fail(
                        value,
                        f"{field}: expected a whole number >= 1, e.g. 3, got {_describe(value)}",
                    )
                self.bounded(value, field, _schema.ATTEMPTS, attempts, "{:g}".format)
                out[key] = attempts
            elif key == "backoff":
                out[key] = self.duration(value, field, _schema.BACKOFF)
            elif key == "max_backoff":
                out[key] = self.duration(value, field, _schema.MAX_BACKOFF_KEY)
            else:
                out[key] = self.errnos(value, field)
        return out

    def errnos(self, node: yaml.Node, what: str) -> frozenset[int]:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(
                node, f"{what}: expected a list of errno names such as [EAGAIN, EBUSY]"
            )
        names = sorted(set(errno.errorcode.values()))
        numbers: set[int] = set()
        for item in node.value:
            name = self.string(item, what)
            number = getattr(errno, name, None) if name.isidentifier() else None
            if not name.startswith("E") or not isinstance(number, int):
                self.fail(
                    item, f"{what}: unknown errno name {name!r}" + _close(name, names)
                )
            numbers.add(number)
        return frozenset(numbers)

    def phases(
        self, node: yaml.Node
    ) -> dict[Phase, tuple[float | None, list[_StepDraft], Where]]:
        valid = [p.value for p in _CONFIGURABLE]
        out: dict[Phase, tuple[float | None, list[_StepDraft], Where]] = {}
        for key, key_node, value in self.items(node, "phases", None):
            if key == Phase.KEXEC.value:
                self.fail(
                    key_node,
                    "phases: 'kexec' cannot be configured: the engine performs the "
                    "kexec itself between 'freeze' and 'restore' (load the kernel "
                    "with a step in 'prepare' and set next_kernel)",
                )
            if key not in valid:
                self.fail(
                    key_node,
                    f"phases: unknown phase {key!r} (valid: {', '.join(valid)})"
                    + _close(key, valid),
                )
            phase = Phase(key)
            out[phase] = self.phase(phase, key_node, value)
        if not out:
            self.fail(node, f"phases: expected at least one of {', '.join(valid)}")
        return out

    def phase(
        self, phase: Phase, key_node: yaml.Node, node: yaml.Node
    ) -> tuple[float | None, list[_StepDraft], Where]:
        what = f"phases.{phase.value}"
        timeout: float | None = None
        steps: list[_StepDraft] | None = None
        for key, _, value in self.items(node, what, _PHASE_KEYS):
            if key == "timeout":
                if not _is_null(value):
                    timeout = self.duration(
                        value, f"{what}.timeout", _schema.PHASE_TIMEOUT
                    )
                continue
            if not isinstance(value, yaml.SequenceNode):
                self.fail(
                    value,
                    f"{what}.steps: expected a list of steps (- plugin: NAME), "
                    f"got {_describe(value)}",
                )
            if not value.value:
                self.fail(value, f"{what}.steps: must list at least one step")
            steps = []
            names: dict[str, int] = {}
            for i, item in enumerate(value.value):
                step = self.step(phase, item, f"{what}.steps[{i}]", i)
                # The journal keys completed steps by (phase, name), so a resumed
                # run could not tell two steps with the same name apart.
                if step.name in names:
                    self.fail(
                        item,
                        f"{what}.steps[{i}]: duplicate step name {step.name!r} "
                        f"(first on line {names[step.name]}); give each step in a "
                        "phase a distinct 'name'",
                    )
                names[step.name] = step.where.line
                steps.append(step)
        if steps is None:
            self.fail(key_node, f"{what}: missing required key 'steps'")
        return timeout, steps, self.where(key_node)

    def step(self, phase: Phase, node: yaml.Node, what: str, index: int) -> _StepDraft:
        plugin: str | None = None
        name: str | None = None
        timeout: float | None = None
        retry: dict[str, Any] = {}
        options: dict[str, Any] = {}
        option_lines: dict[str, int] = {}
        for key, _, value in self.items(node, what, _STEP_KEYS):
            if key == "plugin":
                plugin = self.plugin(value, f"{what}.plugin")
            elif _is_null(value):
                continue
            elif key == "name":
                name = self.string(value, f"{what}.name", empty=False)
            elif key == "timeout":
                timeout = self.duration(value, f"{what}.timeout", _schema.STEP_TIMEOUT)
            elif key == "retry":
                retry = self.retry(value, f"{what}.retry")
            else:
                options, option_lines = self.options(value, f"{what}.with")
        if plugin is None:
            self.fail(node, f"{what}: missing required key 'plugin'")
        return _StepDraft(
            phase=phase,
            plugin=plugin,
            name=plugin if name is None else name,
            options=types.MappingProxyType(options),
            option_lines=types.MappingProxyType(option_lines),
            timeout=timeout,
            retry=retry,
            where=self.where(node),
            index=index,
        )

    def plugin(self, node: yaml.Node, what: str) -> str:
        plugin = self.string(node, what, empty=False)
        if self.known is not None and plugin not in self.known:
            known = sorted(self.known)
            self.fail(
                node,
                f"{what}: unknown plugin {plugin!r} (known: {', '.join(known)})"
                + _close(plugin, known),
            )
        return plugin

    def options(
        self, node: yaml.Node, what: str
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The ``with:`` mapping's values and the line of each of its keys."""
        lines: dict[str, int] = {}
        for key, key_node, value_node in self.items(node, what, None):
            lines[key] = _line(key_node)
            self.plain(value_node, f"{what}.{key}")
        value = self.construct(node, what)
        if not isinstance(value, dict):  # pragma: no cover - items() checked it
            self.fail(node, f"{what}: expected a mapping")
        return value, lines

    def plain(self, node: yaml.Node, what: str) -> None:
        """Refuse anything but plain data (what JSON holds) in an option.

        The composer bounded the expanded size and depth, so this walk is bounded.
        """
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _PLAIN_TAGS:
                self.fail(
                    node,
                    f"{what}: {_describe(node)} is not plain data (strings, numbers, "
                    "booleans, null, lists, mappings); quote it to pass a string",
                )
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.fail(node, f"{what}: {node.tag} is not a plain list")
            for i, item in enumerate(node.value):
                self.plain(item, f"{what}[{i}]")
        else:
            for key, _, value in self.items(node, what, None):
                self.plain(value, f"{what}.{key}")

    def finish(
        self, draft: _StepDraft, default_timeout: float, default_retry: dict[str, Any]
    ) -> Step:
        return Step(
            phase=draft.phase,
            plugin=draft.plugin,
            name=draft.name,
            options=draft.options,
            timeout=default_timeout if draft.timeout is None else draft.timeout,
            retry=RetryPolicy(**(default_retry | draft.retry)),
            where=draft.where,
            index=draft.index,
            option_lines=draft.option_lines,
        )
