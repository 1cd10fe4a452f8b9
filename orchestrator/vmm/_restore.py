"""Bringing one VM back after the kexec: a new QEMU on its preserved RAM.

:func:`restore_vm` starts QEMU on the retrieved RAM memfd, paused and
waiting for its device state (``-incoming defer``), loads the state the
freeze saved, checks the probed guest words, and resumes the guest (``cont``):
the VM's blackout ends there. The ``qemu`` plugin's restore hook calls it; so
does the restore path, before the engine is loaded, as its own process::

    python -m orchestrator.vmm.restore --registry DIR --frozen FILE --ram-fd N

(``FILE`` is ``STATE_DIR/qemu/<name>.frozen``, written by the freeze:
the VM's spec, its state file and probed words). It exits 0 once the guest
runs, after writing ``REGISTRY/<name>.restored``: QEMU's pid, the RAM's
fd number there, and when ``cont`` was sent (on the wall clock and on this
kernel's boot clock).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator.errors import QmpError, VmError

from ._qemu import VmInfo, VmSpec, launch_vm, log_tail, read_words

if TYPE_CHECKING:
    from pathlib import Path

    from ._qmp import QmpClient

STATE_FD_NAME = "lu-state"
IGNORE_SHARED = "x-ignore-shared"


async def set_migration(qmp: QmpClient, ignore_shared: bool, cpr: bool) -> None:
    """Capabilities and mode, the same on both sides of the migration."""
    if cpr:
        mode = "cpr-reboot" if ignore_shared else "normal"
        await qmp.execute("migrate-set-parameters", {"mode": mode})
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": IGNORE_SHARED, "state": ignore_shared}]},
    )


async def load_state(
    qmp: QmpClient,
    vm: VmInfo,
    frozen: dict[str, Any],
    cpr: bool,
    migrate_timeout: float,
) -> None:
    """Load the saved device state into the paused new QEMU and check its RAM."""
    await set_migration(qmp, True, cpr)
    path = str(frozen["state_file"])
    if cpr:
        await qmp.execute("migrate-incoming", {"uri": f"file:{path}"})
    else:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await qmp.execute("getfd", {"fdname": STATE_FD_NAME}, fds=[fd])
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
    try:
        with anyio.fail_after(migrate_timeout):
            while True:
                status = str((await qmp.execute("query-status"))["status"])
                if status != "inmigrate":
                    break
                await anyio.sleep(0.01)
    except QmpError as exc:
        raise VmError(
            vm.name,
            f"loading the device state failed: {log_tail(vm.log) or exc}",
        ) from exc
    if status != "paused":
        raise VmError(vm.name, f"is {status!r} after loading, expected 'paused'")
    for address, value in frozen.get("probe", {}).items():
        (now,) = await read_words(qmp, int(address))
        if now != value:
            raise VmError(
                vm.name,
                f"guest RAM changed across the kexec: word at {int(address):#x} "
                f"is {now:#x}, was {value:#x}",
            )


def restored_path(registry: Path, name: str) -> Path:
    return registry / f"{name}.restored"  # not .json: the registry is *.json


def frozen_path(state_dir: Path, name: str) -> Path:
    """Where the freeze leaves what :func:`restore_vm` needs of VM *name*."""
    return state_dir / "qemu" / f"{name}.frozen"  # beside the registry: not .json


def restored_vm(registry: Path, name: str, ram_fd: int) -> dict[str, Any] | None:
    """What :func:`restore_vm` recorded of VM *name*, if that QEMU still runs
    on the very RAM *ram_fd* is; else None."""
    from orchestrator.luo import holds_same_file

    try:
        record: dict[str, Any] = json.loads(restored_path(registry, name).read_text())
        pid, number = int(record["pid"]), int(record["fd"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if holds_same_file(pid, number, ram_fd) else None


async def restore_vm(
    registry: Path,
    frozen: dict[str, Any],
    ram_fd: int,
    kernel_spec: str,
    *,
    qmp_timeout: float = 30.0,
    migrate_timeout: float = 120.0,
) -> VmInfo:
    """Start the frozen VM again on *ram_fd*, load its state, resume it."""
    from ._qmp import open_qmp

    raw = dict(frozen["spec"])
    raw["extra"] = tuple(raw.get("extra", ()))
    spec = VmSpec(**raw)

    def start() -> VmInfo:
        return launch_vm(registry, spec, kernel_spec, ram_fd=ram_fd, incoming=True)

    new = await anyio.to_thread.run_sync(start)
    async with open_qmp(new.qmp, command_timeout=qmp_timeout) as qmp:
        await load_state(qmp, new, frozen, bool(frozen["cpr"]), migrate_timeout)
        await qmp.execute("cont")
        wall = time.time()
    boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
    path = restored_path(registry, spec.name)
    tmp = path.with_name(f".{path.name}.tmp")
    # As a workload publishes itself: the pid that serves, and the fd number
    # of its file there (QEMU inherits the RAM under the same number).
    record = {
        "pid": new.pid,
        "fd": ram_fd,
        "cont_wall": wall,
        "cont_boottime": boottime,
    }
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return new
