"""``typing`` without importing it at run time, for the restore path.

``liveupdate resume`` runs inside the blackout window, and importing
``typing`` costs about as much as starting the interpreter. Modules on that
path take ``TYPE_CHECKING``, ``final`` and ``Protocol`` from here: type
checkers see the real ones (``TYPE_CHECKING`` is true for them), Python sees
cheap stand-ins. Annotation-only names (``Any``, ``Final``, ``NoReturn``) are
imported from ``typing`` under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Protocol as Protocol
    from typing import final as final
else:

    def final(obj):
        return obj

    class Protocol:
        """Structural types are the type checker's business; at run time a plain base."""

        __slots__ = ()


if TYPE_CHECKING:
    from collections.abc import Callable


def lazy_exports(
    package: str, namespace: dict[str, object], where: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` that import a name on first use.

    PEP 562: the package's ``__init__`` imports nothing heavy; ``where`` maps
    each lazily exported name to the module defining it (relative to
    *package*), and the value is cached in *namespace* once imported.
    """

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *where])

    return __getattr__, __dir__


__all__ = ["TYPE_CHECKING", "Protocol", "final", "lazy_exports"]
