"""A seam for the fault-matrix tests: die at the N-th event of a kind.

``LIVEUPDATE_TEST_CRASH_AT=KIND:N`` makes the process SIGKILL itself right
after its N-th journal record (``record``), right before its N-th request
to the keeper (``keeper``: between two kernel calls of the restore), or
right after sending it, before the answer (``keeper-sent``), or right after
the restore path started its N-th workload (``spawn``) -- the crashes
an operator's host can have, placed exactly. Unset, it costs one
dictionary look-up per event.
"""

from __future__ import annotations

import os

_WHERE = os.environ.get("LIVEUPDATE_TEST_CRASH_AT", "")
_KIND, _, _AT = _WHERE.partition(":")
_SEEN: dict[str, int] = {}


def crash_point(kind: str) -> None:
    """Count one event of *kind*; SIGKILL this process if it is the chosen one."""
    if kind != _KIND:
        return
    _SEEN[kind] = seen = _SEEN.get(kind, 0) + 1
    if str(seen) == _AT:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
