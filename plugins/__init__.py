"""Built-in plugins of luo-orchestrator: one module per integration.

Third-party plugins are separate distributions registered under the entry-point
group ``liveupdate.plugins``.
"""

from __future__ import annotations


def BUILTINS() -> list[object]:
    """Fresh instances of the built-in plugins; each has a ``name``."""
    from .faults import FaultsPlugin
    from .kexec import KexecPlugin
    from .qemu import QemuPlugin
    from .workloads import WorkloadsPlugin

    return [WorkloadsPlugin(), QemuPlugin(), KexecPlugin(), FaultsPlugin()]
