"""``liveupdate``: the command line. A thin shell over the library.

Exit codes: 0 success; 1 the operation failed (message on stderr); 2 bad usage
or input; 3 live update is not possible on this host (``probe``); 4 the
device is busy (``probe``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import InvalidArgumentError, OrchestratorError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .luo._probe import ProbeReport

EXIT_FAILED = 1
EXIT_USAGE = 2

_KERNEL_HELP = (
    "kernel to talk to: 'real' (this host's /dev/liveupdate) or 'sim:DIR' (a "
    "simulated kernel whose state lives in DIR); default $LIVEUPDATE_KERNEL or 'real'"
)


def _render_probe(report: ProbeReport) -> str:
    yes = {True: "yes", False: "no", None: "unknown"}
    rows = [
        ("kernel", report.kernel),
        ("/dev/liveupdate", yes[report.device_present]),
        ("ABI", report.abi or "-"),
        ("liveupdate=on", yes[report.liveupdate_on_cmdline]),
        ("KHO", yes[report.kho]),
        ("RFC state", report.rfc_state or "-"),
        ("came through live update", str(report.liveupdate_number or "no")),
        ("next kernel loaded", yes[report.kexec_loaded]),
    ]
    width = max(len(k) for k, _ in rows + [(r.kind, "") for r in report.kinds])
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if report.kinds:
        lines.append("")
        lines.append(f"{'file kind':<{width}}  preservable")
        for r in report.kinds:
            mark = {True: "yes", False: "no", None: "n/a"}[r.preservable]
            lines.append(f"{r.kind:<{width}}  {mark:<4} {r.detail}")
    lines.append("")
    lines.append(
        "live update is possible here"
        if report.possible
        else f"live update is NOT possible here: {report.reason}"
    )
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    from .luo._probe import probe

    report = probe(args.kernel, try_kinds=not args.no_kinds)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_render_probe(report))
    return report.exit_code


def cmd_sim(args: argparse.Namespace) -> int:
    from .luo.sim import SimKernel

    root = Path(args.dir)
    if args.action == "init":
        if args.reset and root.exists():
            shutil.rmtree(root)
        kernel = SimKernel(root, abi=args.abi)
        print(
            f"simulated kernel ready: LIVEUPDATE_KERNEL=sim:{kernel.root} (ABI {kernel.abi})"
        )
    elif args.action == "fault":
        SimKernel(root).inject_fault(
            args.point, None if args.errno == "none" else args.errno
        )
        print(f"{args.point}: {args.errno}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Probe the simulated kernel, then a preserve → kexec → retrieve round trip."""
    from .luo._probe import probe
    from .luo.sim import SimKernel

    state = Path(args.state_dir).absolute()
    if state.exists():
        shutil.rmtree(state)
    kernel = SimKernel(state / "kernel")
    print(f"== probe of the simulated kernel ({kernel.spec})")
    print(_render_probe(probe(kernel)))
    next_kernel = state / "vmlinuz-next"
    next_kernel.write_bytes(b"simulated kernel image\n")
    record = state / "roundtrip.json"
    size = args.size_mib << 20
    print(
        f"\n== preserve a {args.size_mib} MiB memfd, kexec (ends the process), retrieve"
    )
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator._roundtrip",
            kernel.spec,
            "demo",
            str(size),
            str(record),
            str(next_kernel),
        ],
        check=False,
    )
    if child.returncode != -9:
        print(
            f"the kexec did not end the process (exit {child.returncode})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from ._roundtrip import after

    result = after(kernel.spec, "demo", record)
    print(
        f"old process ended by the kexec (SIGKILL); boot {result.boot_id} -> "
        f"{result.new_boot_id}"
    )
    for line in kernel.log_lines():
        if "liveupdate" in line:
            print(f"kernel: {line}")
    print(
        f"preserve {result.preserve_s * 1e3:.1f} ms, retrieve "
        f"{result.retrieve_s * 1e3:.1f} ms, kexec to verified "
        f"{result.blackout_s * 1e3:.1f} ms"
    )
    verdict = "every byte came back" if result.intact else "MISMATCH"
    print(f"sha256 {result.sha256}: {verdict}")
    return 0 if result.intact else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveupdate",
        description="Update a host's Linux kernel without stopping its VMs: drive "
        "/dev/liveupdate (LUO) and kexec as a playbook of phases.",
        epilog="Try it without root or a LUO kernel: 'liveupdate demo' runs on a "
        "simulated kernel. Exit codes: 0 ok, 1 failed, 2 usage, 3 not possible "
        "here, 4 device busy.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "probe",
        help="what this host supports for live update",
        description="Report whether live update is possible here: the device, "
        "its ABI, the command line, KHO, and which kinds of file the kernel can "
        "preserve (tried for real on a scratch session that is dropped again). "
        "Exits 0 when possible, 3 when not (with the reason), 4 when another "
        "process holds /dev/liveupdate.",
    )
    p.add_argument("--json", action="store_true", help="print JSON for automation")
    p.add_argument("--kernel", default=None, help=_KERNEL_HELP)
    p.add_argument(
        "--no-kinds", action="store_true", help="do not try preserving files"
    )
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser(
        "sim",
        help="manage a simulated kernel",
        description="Create a simulated LUO kernel in DIR (no root needed), or "
        "inject a fault into it. Use it with --kernel sim:DIR or "
        "LIVEUPDATE_KERNEL=sim:DIR.",
    )
    sim = p.add_subparsers(dest="action", required=True)
    q = sim.add_parser("init", help="create (or --reset) a simulated kernel")
    q.add_argument("dir")
    q.add_argument("--abi", choices=("merged", "rfc"), default="merged")
    q.add_argument("--reset", action="store_true", help="delete DIR's state first")
    q = sim.add_parser("fault", help="make 'freeze' or 'kexec_load' fail with ERRNO")
    q.add_argument("dir")
    q.add_argument("point", choices=("freeze", "kexec_load"))
    q.add_argument("errno", help="an errno name such as EIO, or 'none' to clear")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser(
        "demo",
        help="rehearse a live update on a simulated kernel",
        description="Probe a fresh simulated kernel, then preserve a memfd, "
        "kexec (which ends the process) and retrieve it in the new kernel, "
        "checking every byte.",
    )
    p.add_argument(
        "--state-dir",
        default=os.path.join(tempfile.gettempdir(), "liveupdate-demo"),
        help="where the simulated kernel lives (wiped first)",
    )
    p.add_argument("--size-mib", type=int, default=256, help="memfd size (default 256)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except InvalidArgumentError as exc:
        print(f"liveupdate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OrchestratorError, ValueError) as exc:
        print(f"liveupdate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
