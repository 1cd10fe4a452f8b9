"""Built-in plugins of luo-orchestrator: one module per integration.

Third-party plugins are separate distributions registered under the entry-point
group ``liveupdate.plugins``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection

# name -> (module, class). Imported only when wanted: after the kexec, resume
# loads just the plugins its playbook names (the qemu plugin's VMM stack is
# not free to import inside the blackout).
BUILTIN_PLUGINS = {
    "workloads": ("plugins.workloads", "WorkloadsPlugin"),
    "qemu": ("plugins.qemu", "QemuPlugin"),
    "kexec": ("plugins.kexec", "KexecPlugin"),
    "faults": ("plugins.faults", "FaultsPlugin"),
}


def BUILTINS(names: Collection[str] | None = None) -> list[object]:
    """Fresh instances of the built-in plugins (all, or those in *names*)."""
    return [
        getattr(importlib.import_module(module), cls)()
        for name, (module, cls) in BUILTIN_PLUGINS.items()
        if names is None or name in names
    ]
