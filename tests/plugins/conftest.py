"""Fixtures for the QEMU plugin: a tiny guest, built here, in a real QEMU (TCG).

The guest (``guest/boot.S``) fills 0x10000..0x5ffff with a pattern and counts
at 0x9000 forever; the tests read both through QMP ``xp``. ``/dev/kvm`` on
these hosts does not boot ordinary guests, so QEMU runs with TCG.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from orchestrator.luo.sim import SimKernel
from orchestrator.vmm import QEMU, VmInfo, VmSpec, launch_vm, open_qmp, read_words

if TYPE_CHECKING:
    from collections.abc import Iterator

GUEST = Path(__file__).with_name("guest") / "boot.S"
COUNTER = 0x9000
BOOTS = 0x9004
MARKER = 0x9008
MARKER_VALUE = 0x600D600D
PATTERN = 0x214F554C  # "LUO!"
PATTERN_AT = (0x10000, 0x2A0C0, 0x3FFFC, 0x5FFF0)
WAIT = 120.0
"""Seconds to wait for anything a busy 2-core host may be slow at (never asserted)."""


def words(qmp_path: str, address: int, count: int = 1) -> list[int]:
    """Guest words read through a short QMP session (from synchronous code)."""

    async def read() -> list[int]:
        async with open_qmp(qmp_path, command_timeout=60) as qmp:
            return await read_words(qmp, address, count)

    return anyio.run(read)


def status(qmp_path: str) -> str:
    async def query() -> str:
        async with open_qmp(qmp_path, command_timeout=60) as qmp:
            reply = await qmp.execute("query-status")
            return str(reply["status"])

    return anyio.run(query)


def wait_counting(qmp_path: str, above: int = 0) -> int:
    """Poll until the guest's counter is above *above* (and the fill is done)."""
    deadline = time.monotonic() + WAIT
    while True:
        counter, _boots, marker = words(qmp_path, COUNTER, 3)
        if marker == MARKER_VALUE and counter > above:
            return counter
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest counter stayed at {counter:#x}")
        time.sleep(0.05)


def assert_pattern(qmp_path: str) -> None:
    for address in PATTERN_AT:
        assert words(qmp_path, address, 4) == [PATTERN] * 4, f"RAM at {address:#x}"
    assert words(qmp_path, MARKER)[0] == MARKER_VALUE


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The boot sector, assembled from ``guest/boot.S``."""
    for tool in (QEMU, "as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    out = tmp_path_factory.mktemp("guest")
    subprocess.run(
        ["as", "--32", "-o", str(out / "boot.o"), str(GUEST)],
        check=True,
        capture_output=True,
    )
    image = out / "boot.img"
    subprocess.run(
        [
            *("ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary"),
            *("-o", str(image), str(out / "boot.o")),
        ],
        check=True,
        capture_output=True,
    )
    data = image.read_bytes()
    assert len(data) == 512, "a boot sector is 512 bytes"
    assert data[-2:] == b"\x55\xaa", "no boot signature"
    return image


def qemus_under(registry: Path) -> set[int]:
    """QEMU processes started on *registry*'s sockets (whoever started them)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(QEMU.encode()) and any(
                    str(registry).encode() in arg for arg in argv
                ):
                    pids.add(int(entry.name))
    return pids


@dataclass
class VmHost:
    """A simulated host (state dir, simulated kernel) running one VM."""

    state: Path
    kernel: SimKernel
    registry: Path
    vm: VmInfo
    pids: set[int] = field(default_factory=set)

    def current(self) -> VmInfo:
        """The VM as published now (after a restore: the new QEMU)."""
        info = VmInfo.from_json(
            json.loads((self.registry / f"{self.vm.name}.json").read_text())
        )
        self.pids.add(info.pid)
        return info


@pytest.fixture
def vm_host(tmp_path: Path, guest_image: Path) -> Iterator[VmHost]:
    state = tmp_path / "state"
    kernel = SimKernel(state / "kernel")
    registry = state / "qemu"
    spec = VmSpec(name="vm0", image=str(guest_image), ram_mib=64)
    vm = launch_vm(registry, spec, kernel.spec)
    host = VmHost(state, kernel, registry, vm, {vm.pid})
    try:
        wait_counting(vm.qmp)
        yield host
    finally:
        with contextlib.suppress(OSError, ValueError):
            host.current()
        for pid in host.pids | qemus_under(registry):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
