"""The boot-sector guest's memory layout (``guest/boot.S``) and how to read it.

Shared by the QEMU plugin's tests on the host and by the ``qemu`` scenario
inside the LUO guest (tests/vm/qemu_guest.py), which is why the heavy imports
(anyio, the QMP client) are made only when a function runs.
"""

from __future__ import annotations

import time

COUNTER = 0x9000  # a 32-bit counter the guest increments forever
BOOTS = 0x9004  # how many times the guest booted (1: it was never restarted)
MARKER = 0x9008  # MARKER_VALUE once the pattern is written
MARKER_VALUE = 0x600D600D
PATTERN = 0x214F554C  # "LUO!", written across 0x10000..0x5ffff
PATTERN_AT = (0x10000, 0x2A0C0, 0x3FFFC, 0x5FFF0)
PROBES = [hex(COUNTER), hex(BOOTS), "0x10000", "0x5fffc"]
"""Addresses the qemu plugin reads at the stop and checks again before ``cont``."""


def words(
    qmp_path: str, address: int, count: int = 1, timeout: float = 60
) -> list[int]:
    """Guest words read through a short QMP session (from synchronous code)."""
    import anyio

    from orchestrator.vmm import open_qmp, read_words

    async def read() -> list[int]:
        async with open_qmp(qmp_path, command_timeout=timeout) as qmp:
            return await read_words(qmp, address, count)

    return anyio.run(read)


def qmp_status(qmp_path: str, timeout: float = 60) -> str:
    """``query-status`` of the VM (``running``, ``paused``, ...)."""
    import anyio

    from orchestrator.vmm import open_qmp

    async def query() -> str:
        async with open_qmp(qmp_path, command_timeout=timeout) as qmp:
            reply = await qmp.execute("query-status")
            return str(reply["status"])

    return anyio.run(query)


def wait_counting(qmp_path: str, above: int = 0, wait: float = 120) -> int:
    """Poll until the counter is above *above* and the pattern is written."""
    deadline = time.monotonic() + wait
    while True:
        counter, _boots, marker = words(qmp_path, COUNTER, 3)
        if marker == MARKER_VALUE and counter > above:
            return counter
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest's counter stayed at {counter:#x}")
        time.sleep(0.05)


def pattern_damage(qmp_path: str, timeout: float = 60) -> dict[str, list[int]]:
    """The pattern's words that differ (address -> words read); empty: intact."""
    bad = {}
    for address in PATTERN_AT:
        got = words(qmp_path, address, 4, timeout)
        if got != [PATTERN] * 4:
            bad[hex(address)] = got
    (marker,) = words(qmp_path, MARKER, 1, timeout)
    if marker != MARKER_VALUE:
        bad[hex(MARKER)] = [marker]
    return bad
