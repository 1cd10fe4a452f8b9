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


__all__ = ["TYPE_CHECKING", "Protocol", "final"]
