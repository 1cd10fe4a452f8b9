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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.luo.sim import SimKernel
from orchestrator.vmm import QEMU, VmInfo, VmSpec, launch_vm

from .guest_vm import pattern_damage, wait_counting

if TYPE_CHECKING:
    from collections.abc import Iterator

GUEST = Path(__file__).with_name("guest") / "boot.S"
WAIT = 120.0
"""Seconds to wait for anything a busy 2-core host may be slow at (never asserted)."""


def assert_pattern(qmp_path: str) -> None:
    assert pattern_damage(qmp_path) == {}, "the guest's RAM pattern changed"


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
    # A copy of its own: QEMU locks its disk, and the previous test's QEMU,
    # SIGKILLed, may not have let go of it yet.
    image = tmp_path / guest_image.name
    shutil.copyfile(guest_image, image)
    spec = VmSpec(name="vm0", image=str(image), ram_mib=64)
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
