"""Compose one YAML document into nodes, within bounds, for the playbook loader.

A playbook is input the orchestrator did not write: a few lines can hold an
alias "bomb" (nine anchors of nine aliases each expand to 9**9 values), a
mapping can give a key twice (YAML keeps the last one, silently), an escape can
smuggle a lone surrogate or a NUL into a string. This composer refuses all of
that while it builds the node tree, each time as a
:class:`~orchestrator.PlaybookError` naming ``file:line``:

- text longer than :data:`MAX_BYTES`; lone surrogates;
- collections nested deeper than :data:`MAX_DEPTH`, aliases included;
- more than :data:`MAX_VALUES` values once every alias is expanded: each
  collection's expanded size is counted as it is composed (an alias adds the
  size of what it names), so a bomb fails after bounded work, at the alias
  that crosses the bound;
- aliases to a collection that contains them (they would never end);
- duplicate keys, at every depth, naming both lines; merge keys (``<<``),
  whose keys would silently lose to the mapping's own;
- scalars with control characters or lone surrogates; numbers longer than
  :data:`MAX_NUMBER_CHARS` characters.

Events come from libyaml when PyYAML has it (the pure-Python scanner is about
ten times slower); the composition itself is this module's.

.. versionadded:: 0.2
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, NoReturn

import yaml

from orchestrator.errors import PlaybookError

if TYPE_CHECKING:
    from yaml.error import Mark

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NUMBER_CHARS", "MAX_VALUES", "compose"]

MAX_BYTES: Final = 128 * 1024
"""The longest playbook, in bytes (the shipped ones are under 5 KiB)."""
MAX_DEPTH: Final = 32
"""The deepest nesting of mappings and lists (the shipped playbooks reach 8)."""
MAX_VALUES: Final = 20_000
"""The most values (scalars, lists, mappings) once every alias is expanded."""
MAX_NUMBER_CHARS: Final = 64
"""The longest number, in characters (no bound of a playbook needs more)."""

_STR_TAG: Final = "tag:yaml.org,2002:str"
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_NUMBER_TAGS: Final = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# C0 controls but tab, newline and carriage return; DEL; C1 controls; surrogates.
_UNPRINTABLE: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

if yaml.__with_libyaml__:
    _Events: Any = yaml.CSafeLoader
else:  # pragma: no cover - PyYAML without libyaml
    _Events = yaml.SafeLoader


def compose(text: str, path: str) -> yaml.Node | None:
    """Compose *text*, which must hold at most one YAML document.

    :param text: the YAML.
    :param path: the name to use in messages.
    :raises PlaybookError: at the first problem, naming ``path:line``.
    :return: the document's root node, or ``None`` for an empty document.
    """
    if len(text) > MAX_BYTES:
        line = text.count("\n", 0, MAX_BYTES) + 1
        raise PlaybookError(
            path, line, f"the playbook is longer than {MAX_BYTES // 1024} KiB"
        )
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise PlaybookError(
            path,
            text.count("\n", 0, bad.start()) + 1,
            f"lone surrogate U+{ord(bad.group()):04X}: not valid Unicode text",
        )
    events = _Events(text)
    try:
        return _Composer(events, path).document()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "malformed YAML"
        raise PlaybookError(
            path, None if mark is None else mark.line + 1, f"invalid YAML: {problem}"
        ) from exc
    except yaml.reader.ReaderError as exc:
        # libyaml counts in UTF-8 bytes, the pure-Python reader in characters.
        if yaml.__with_libyaml__:
            line = text.encode().count(b"\n", 0, exc.position) + 1
        else:  # pragma: no cover - PyYAML without libyaml
            line = text.count("\n", 0, exc.position) + 1
        raise PlaybookError(
            path, line, f"invalid YAML: unacceptable character {exc.character!r}"
        ) from exc
    except yaml.YAMLError as exc:
        raise PlaybookError(path, None, f"invalid YAML: {exc}") from exc
    finally:
        events.dispose()


class _Composer:
    """Builds the node tree from parser events, counting as it goes.

    :ivar shape: ``id(node) -> (values, height)`` of every finished collection
        (its expanded size and nesting), for the aliases that name it.
    :ivar open: the collections still being composed: an alias to one of them
        would make the document contain itself.
    """

    def __init__(self, events: Any, path: str) -> None:
        self.events = events
        self.path = path
        self.anchors: dict[str, yaml.Node] = {}
        self.shape: dict[int, tuple[int, int]] = {}
        self.open: set[int] = set()
        self.aliased = False
        # Builds scalar keys the way the playbook's values are built, so that
        # keys equal as values (1 and 0x1, 1 and true) count as duplicates.
        self.keys = yaml.constructor.SafeConstructor()

    def fail(self, mark: Mark | None, problem: str) -> NoReturn:
        raise PlaybookError(self.path, None if mark is None else mark.line + 1, problem)

    def document(self) -> yaml.Node | None:
        events = self.events
        events.get_event()  # stream start
        if events.check_event(yaml.StreamEndEvent):
            return None
        events.get_event()  # document start
        root, _, _ = self.node(1)
        events.get_event()  # document end
        if not events.check_event(yaml.StreamEndEvent):
            # Point at the second document's "---", not at its first value.
            self.fail(
                events.peek_event().start_mark,
                "expected a single YAML document, found another one here",
            )
        return root

    def node(self, depth: int) -> tuple[yaml.Node, int, int]:
        """Compose the next node: ``(node, expanded values, height)``."""
        event = self.events.peek_event()
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            self.events.get_event()
            return self.alias(str(event.anchor), mark, depth)
        if depth > MAX_DEPTH:
            self.fail(mark, f"nested more than {MAX_DEPTH} levels deep")
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            first = self.anchors[anchor].start_mark.line + 1
            self.fail(mark, f"anchor &{anchor} is already defined on line {first}")
        if isinstance(event, yaml.ScalarEvent):
            node: yaml.Node = self.scalar()
            values, height = 1, 1
        elif isinstance(event, yaml.SequenceStartEvent):
            node, values, height = self.collection(yaml.SequenceNode, depth)
        else:
            node, values, height = self.collection(yaml.MappingNode, depth)
        if anchor is not None:
            self.anchors[anchor] = node
        return node, values, height

    def alias(self, anchor: str, mark: Mark, depth: int) -> tuple[yaml.Node, int, int]:
        target = self.anchors.get(anchor)
        if target is None:
            self.fail(mark, f"alias *{anchor} names no anchor defined before it")
        if id(target) in self.open:
            self.fail(mark, f"alias *{anchor} is inside the collection it names")
        self.aliased = True
        values, height = self.shape.get(id(target), (1, 1))
        if depth + height - 1 > MAX_DEPTH:
            self.fail(
                mark, f"alias *{anchor} nests the document more than {MAX_DEPTH} deep"
            )
        return target, values, height

    def scalar(self) -> yaml.ScalarNode:
        event = self.events.get_event()
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.events.resolve(yaml.ScalarNode, event.value, event.implicit)
        node = yaml.ScalarNode(
            tag, event.value, event.start_mark, event.end_mark, style=event.style
        )
        bad = _UNPRINTABLE.search(node.value)
        if bad is not None:
            self.fail(
                event.start_mark,
                f"control character U+{ord(bad.group()):04X} in a value",
            )
        if tag in _NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            self.fail(
                event.start_mark,
                f"a number of more than {MAX_NUMBER_CHARS} characters",
            )
        return node

    def collection(
        self, kind: type[yaml.SequenceNode | yaml.MappingNode], depth: int
    ) -> tuple[yaml.Node, int, int]:
        start = self.events.get_event()
        end_event = (
            yaml.SequenceEndEvent if kind is yaml.SequenceNode else yaml.MappingEndEvent
        )
        tag = start.tag
        if tag is None or tag == "!":
            tag = self.events.resolve(kind, None, start.implicit)
        node = kind(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if start.anchor is not None:
            self.anchors[start.anchor] = node
        self.open.add(id(node))
        values, height = 1, 1
        children: list[yaml.Node] = []
        while not self.events.check_event(end_event):
            mark = self.events.peek_event().start_mark
            child, child_values, child_height = self.node(depth + 1)
            values += child_values
            height = max(height, child_height + 1)
            if values > MAX_VALUES:
                self.fail(
                    mark,
                    f"aliases expand the document to more than {MAX_VALUES} values "
                    "(each alias counts as all it names)"
                    if self.aliased
                    else f"the document has more than {MAX_VALUES} values",
                )
            children.append(child)
        node.end_mark = self.events.get_event().end_mark
        if kind is yaml.SequenceNode:
            node.value = children
        else:
            node.value = self.pairs(children)
        self.open.discard(id(node))
        self.shape[id(node)] = (values, height)
        return node, values, height

    def pairs(self, children: list[yaml.Node]) -> list[tuple[yaml.Node, yaml.Node]]:
        """The key/value pairs of a mapping; refuses merge and duplicate keys."""
        pairs = list(zip(children[::2], children[1::2], strict=True))
        seen: dict[object, int] = {}
        for key, _ in pairs:
            if key.tag == _MERGE_TAG:
                self.fail(
                    key.start_mark,
                    "merge keys ('<<') are not supported: write the keys out",
                )
            if not isinstance(key, yaml.ScalarNode):
                continue  # not hashable: building the value refuses it
            identity = self.identity(key)
            line = key.start_mark.line + 1
            if identity in seen:
                self.fail(
                    key.start_mark,
                    f"duplicate key {key.value!r} (first given on line {seen[identity]})",
                )
            seen[identity] = line
        return pairs

    def identity(self, key: yaml.ScalarNode) -> object:
        if key.tag == _STR_TAG:
            return key.value
        try:
            value = self.keys.construct_object(key, deep=True)
            hash(value)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            return (key.tag, key.value)
        return value
