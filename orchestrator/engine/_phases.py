"""Phases and states of a live update, as the RFC defines them for users.

::

    NORMAL -quiesce-preserve-prepare-> PREPARED -freeze-> FROZEN -kexec->
        (new kernel) UPDATED -restore-finish-> NORMAL

CANCEL is possible from any state before the kexec and leads back to NORMAL.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """The ordered phases of a live update."""

    QUIESCE = "quiesce"
    PRESERVE = "preserve"
    PREPARE = "prepare"
    FREEZE = "freeze"
    KEXEC = "kexec"
    RESTORE = "restore"
    FINISH = "finish"

    @property
    def is_reversible(self) -> bool:
        """Whether a failure in or before this phase can still be cancelled."""
        return self in _BEFORE_KEXEC

    @property
    def after_kexec(self) -> bool:
        """Whether the phase runs in the new kernel."""
        return self in (Phase.RESTORE, Phase.FINISH)

    @property
    def configurable(self) -> bool:
        """Whether playbooks list steps for it (the kexec itself is the engine's)."""
        return self is not Phase.KEXEC


_BEFORE_KEXEC = frozenset({Phase.QUIESCE, Phase.PRESERVE, Phase.PREPARE, Phase.FREEZE})
PHASES: tuple[Phase, ...] = tuple(Phase)


class State(enum.Enum):
    """Where the host is in an update (the RFC's ``enum liveupdate_state``)."""

    NORMAL = "NORMAL"  # no update, or CANCEL/FINISH completed
    PREPARED = "PREPARED"  # quiesce, preserve and prepare done; next kernel loaded
    FROZEN = "FROZEN"  # freeze done: workloads paused, the reboot syscall is next
    UPDATED = "UPDATED"  # running the new kernel; restore/finish pending
    CANCELLING = "CANCELLING"  # undoing completed steps (ends in NORMAL)
    FAILED = "FAILED"  # a cancel or a post-kexec phase failed: operator needed
