"""Plugin options: the keys a step's ``with:`` mapping may hold, declared by the plugin.

A plugin declares its options as a class attribute ``options``, a tuple of
:class:`Option`::

    class BackupPlugin:
        name = "backup"
        options = (
            Option("target", str, "where the snapshot goes", required=True),
            Option("keep", int, "snapshots kept", default=3, min=1, max=100),
        )

``liveupdate plan`` and ``liveupdate run`` check every step's ``with:``
against it before anything runs (:func:`check_options`): unknown keys (with a
did-you-mean), wrong types and numbers out of bounds are refused, each naming
the ``file:line`` of the key. A ``null`` value means "the default". A plugin
without ``options`` gets its ``with:`` mapping as written, unchecked.

.. versionadded:: 0.2
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["Option", "check_options", "option_value"]

_TYPE_NAMES: Final[dict[type[Any], str]] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "list",
    dict: "mapping",
}


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


@final
@dataclass(frozen=True, slots=True)
class Option:
    """One key of a plugin's ``with:`` mapping.

    :param key: the key.
    :param type: the Python type(s) a value may have, among ``str``, ``int``,
        ``float`` (any number: ``int`` values are accepted too), ``bool``,
        ``list`` and ``dict``. ``bool`` is never taken for a number.
    :param doc: one line for the playbook reference.
    :param default: the value the plugin uses when the key is absent or null.
    :param default_doc: the default as the reference shows it, when it is
        computed at run time (e.g. ``"STATE_DIR/qemu"``); by default
        :attr:`default` itself.
    :param min: the smallest number accepted (numbers only).
    :param max: the largest number accepted (numbers only).
    :param required: whether every step of the plugin must give the key.
    :param check: a deeper check of a well-typed value (the items of a list,
        say): returns what is wrong, or ``None``.
    :raises ValueError: if the declaration contradicts itself.

    .. versionadded:: 0.2
    """

    key: str
    type: type[Any] | tuple[type[Any], ...]
    doc: str
    default: Any = None
    default_doc: str = ""
    min: float | None = None
    max: float | None = None
    required: bool = False
    check: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in _TYPE_NAMES]
        if not self.key or unknown:
            raise ValueError(
                f"option {self.key!r}: key must be non-empty and type among "
                f"str, int, float, bool, list, dict (got {unknown})"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"option {self.key!r}: min {self.min} > max {self.max}")
        if self.default is not None and self.problem(self.default) is not None:
            raise ValueError(
                f"option {self.key!r}: default {self.default!r}: "
                f"{self.problem(self.default)}"
            )

    @property
    def types(self) -> tuple[builtins.type[Any], ...]:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    @property
    def type_name(self) -> str:
        """The type as the reference and the messages name it."""
        return " or ".join(_TYPE_NAMES[t] for t in self.types)

    @property
    def default_text(self) -> str:
        """The default as the reference shows it."""
        if self.default_doc:
            return self.default_doc
        if self.required:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return (
            f"{self.default!r}" if isinstance(self.default, str) else f"{self.default}"
        )

    @property
    def bounds_text(self) -> str:
        """``"1 .. 100"``, ``">= 1"``, ``"<= 5"`` or ``""``."""
        if self.min is not None and self.max is not None:
            return f"{self.min:g} .. {self.max:g}"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return ""

    def accepts_type(self, value: object) -> bool:
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, self.types)

    def problem(self, value: object) -> str | None:
        """What is wrong with *value* for this option, or ``None``."""
        if not self.accepts_type(value):
            got = _TYPE_NAMES.get(type(value), type(value).__name__)
            return f"expected {_a(self.type_name)}, got {_a(got)} ({value!r:.40})"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isnan(value) or math.isinf(value):
                return f"expected a finite number, got {value}"
            if (self.min is not None and value < self.min) or (
                self.max is not None and value > self.max
            ):
                return f"must be within {self.bounds_text}, got {value}"
        if self.check is not None:
            return self.check(value)
        return None


def check_options(
    schema: Sequence[Option], options: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """Check a step's ``with:`` mapping against a plugin's declared options.

    :param schema: the plugin's options.
    :param options: the step's ``with:`` mapping.
    :return: ``(key, problem)`` for each wrong key, in the mapping's order;
        a missing required key is reported under its own name, last.

    .. versionadded:: 0.2
    """
    by_key = {option.key: option for option in schema}
    problems: list[tuple[str, str]] = []
    for key, value in options.items():
        option = by_key.get(key)
        if option is None:
            known = sorted(by_key)
            match = difflib.get_close_matches(key, known, n=1)
            problems.append(
                (
                    key,
                    f"unknown option {key!r} (known: {', '.join(known) or 'none'})"
                    + (f"; did you mean {match[0]!r}?" if match else ""),
                )
            )
        elif value is not None:
            problem = option.problem(value)
            if problem is not None:
                problems.append((key, problem))
    problems.extend(
        (option.key, f"missing required option {option.key!r}")
        for option in schema
        if option.required and options.get(option.key) is None
    )
    return problems


def option_value(options: Mapping[str, Any], schema: Sequence[Option], key: str) -> Any:
    """The value of option *key*: as given, or its declared default if absent or null.

    :raises KeyError: if *schema* declares no option *key* (a plugin bug).

    .. versionadded:: 0.2
    """
    for option in schema:
        if option.key == key:
            value = options.get(key)
            return option.default if value is None else value
    raise KeyError(key)
