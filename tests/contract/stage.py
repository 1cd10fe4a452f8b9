"""Run one boot's stage of the cross-kexec contract scenarios, then kexec.

    python -m tests.contract.stage --kernel SPEC --carry FILE --boot N \\
        [--only NAME ...] [--kexec IMAGE --cmdline CMDLINE]

Runs stage N of every selected scenario that has a stage after N, keeps its
handles open, writes the carry file, loads IMAGE and jumps into it (a kexec
never returns; on the simulated kernel it ends this process). Scenarios whose
*last* stage is N are left to pytest (``--luo-carry FILE --luo-boot N``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.luo import kernel_from_spec

from .scenarios import BY_NAME, SCENARIOS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.contract.stage")
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--carry", required=True, type=Path)
    parser.add_argument("--boot", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--kexec", type=Path, default=None, help="kernel image to kexec into"
    )
    parser.add_argument(
        "--cmdline", default=None, help="its command line (default: this one)"
    )
    args = parser.parse_args()

    kernel = kernel_from_spec(args.kernel)
    selected = [BY_NAME[n] for n in args.only] if args.only else list(SCENARIOS)
    carry: dict[str, dict[str, object]] = (
        json.loads(args.carry.read_text()) if args.carry.exists() else {}
    )
    keep: list[object] = []
    ran = []
    for scenario in selected:
        if len(scenario.stages) > args.boot + 1:
            scenario.stages[args.boot](
                kernel, carry.setdefault(scenario.name, {}), keep
            )
            ran.append(scenario.name)
    carry.setdefault("_meta", {})["boots"] = args.boot + 1
    args.carry.write_text(json.dumps(carry, indent=1))
    print(
        f"stage {args.boot}: ran {len(ran)} scenario stage(s): {', '.join(ran)}",
        flush=True,
    )
    if args.kexec is not None:
        kernel.kexec_load(args.kexec, None, args.cmdline or kernel.cmdline())
        kernel.reboot_kexec()
    return 0


if __name__ == "__main__":
    sys.exit(main())
