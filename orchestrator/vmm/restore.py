"""``python -m orchestrator.vmm.restore``: bring one frozen VM back (a new QEMU
on its preserved RAM, its device state loaded, resumed), then exit 0.

The restore path runs it, one process per VM side by side, before the engine
is loaded (see :mod:`orchestrator.vmm._restore` and ``docs/engine.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from orchestrator.errors import OrchestratorError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.vmm.restore")
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--frozen", type=Path, required=True, help="NAME.frozen")
    p.add_argument("--ram-fd", type=int, required=True, help="the inherited RAM memfd")
    p.add_argument("--qmp-timeout", type=float, default=30.0)
    p.add_argument("--migrate-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    import anyio

    from ._restore import restore_vm

    frozen = json.loads(args.frozen.read_text())
    try:
        vm = anyio.run(
            lambda: restore_vm(
                args.registry,
                frozen,
                args.ram_fd,
                os.environ.get("LIVEUPDATE_KERNEL", "real"),
                qmp_timeout=args.qmp_timeout,
                migrate_timeout=args.migrate_timeout,
            )
        )
    except (OrchestratorError, OSError) as exc:
        sys.stderr.write(f"restore of VM {frozen.get('name')}: {exc}\n")
        return 1
    sys.stderr.write(f"VM {vm.name} runs again: QEMU pid {vm.pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
