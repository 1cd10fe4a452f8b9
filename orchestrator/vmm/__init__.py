"""Talking to virtual machine monitors: QEMU over QMP, and QEMU launching.

Everything a VMM plugin needs is exported here; the modules are private.
"""

from __future__ import annotations

from orchestrator.errors import (
    QmpCommandError,
    QmpConnectionError,
    QmpError,
    QmpTimeoutError,
    VmError,
)

from ._qemu import (
    QEMU,
    VmInfo,
    VmSpec,
    find_ram_fd,
    launch_vm,
    log_tail,
    publish,
    qemu_argv,
    read_words,
    registered_vms,
    running,
)
from ._qmp import QmpClient, open_qmp
from ._restore import (
    frozen_path,
    load_state,
    restore_vm,
    restored_path,
    restored_vm,
    set_migration,
)

__all__ = [
    "QEMU",
    "QmpClient",
    "QmpCommandError",
    "QmpConnectionError",
    "QmpError",
    "QmpTimeoutError",
    "VmError",
    "VmInfo",
    "VmSpec",
    "find_ram_fd",
    "frozen_path",
    "launch_vm",
    "load_state",
    "log_tail",
    "open_qmp",
    "publish",
    "qemu_argv",
    "read_words",
    "registered_vms",
    "restore_vm",
    "restored_path",
    "restored_vm",
    "running",
    "set_migration",
]
