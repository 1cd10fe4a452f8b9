"""``enum liveupdate_state`` of the RFC series (its own module: ``enum`` is
only imported by code that speaks the RFC ABI, not on the merged restore path)."""

from __future__ import annotations

import enum


class RfcState(enum.IntEnum):
    """The global LUO state of the RFC ABI."""

    UNDEFINED = 0  # LUO has not initialised yet.
    NORMAL = 1  # boot, CANCEL and FINISH lead here: no update in progress.
    PREPARED = 2  # PREPARE succeeded; the kexec may follow.
    FROZEN = 3  # the reboot syscall sent the FREEZE event (blackout).
    UPDATED = 4  # booted through a live update; FINISH not yet called.
