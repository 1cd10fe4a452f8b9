"""``liveupdate``: the command line. A thin shell over the library.

Exit codes (also in ``liveupdate --help``):

- 0: success;
- 1: the operation failed (one line on stderr says what);
- 2: bad usage or input (a malformed playbook, an unknown kernel, a missing
  simulated kernel: ``liveupdate sim init DIR`` creates one);
- 3: live update is not possible on this host (``probe``; ``run`` checks the
  same first and journals nothing);
- 4: the device is busy (``probe``, ``run``);
- 5: the update was cancelled: it failed before the kexec and the host is
  back in NORMAL (``run``, ``demo``, ``resume``);
- 6: an earlier update never ended: ``run`` and ``demo`` refuse to start, and
  the message names the command that finishes or cancels it;
- 7: another update is running on this host: the agent refused to start this
  one and the running one goes on (``run`` through the agent);
- 130: interrupted (Ctrl-C); 141: whoever read the output went away
  (``liveupdate status | head``), the rest of it was dropped.
"""

from __future__ import annotations

import sys

from orchestrator._compat import TYPE_CHECKING
from orchestrator.errors import (
    InvalidArgumentError,
    OrchestratorError,
    PlaybookError,
    UnfinishedUpdateError,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from orchestrator.luo._probe import ProbeReport

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNFINISHED = 6
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141

_KERNEL_HELP = (
    "kernel to talk to: 'real' (this host's /dev/liveupdate) or 'sim:DIR' (a "
    "simulated kernel whose state lives in DIR); default $LIVEUPDATE_KERNEL or 'real'"
)


def _render_probe(report: ProbeReport) -> str:
    yes = {True: "yes", False: "no", None: "unknown"}
    rows = [
        ("kernel", report.kernel),
        ("running kernel", report.running_kernel or "-"),
        ("boot id", report.boot_id or "-"),
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
    import json

    from orchestrator.luo._probe import probe

    report = probe(args.kernel, try_kinds=not args.no_kinds)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_render_probe(report))
    return report.exit_code


def cmd_sim(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from orchestrator.luo.sim import SimKernel

    root = Path(args.dir)
    if args.action == "init":
        if args.reset and root.exists():
            shutil.rmtree(root)
        kernel = SimKernel(root, abi=args.abi)
        print(
            f"simulated kernel ready: LIVEUPDATE_KERNEL=sim:{kernel.root} (ABI {kernel.abi})"
        )
    elif args.action == "fault":
        SimKernel.existing(root).inject_fault(
            args.point, None if args.errno == "none" else args.errno
        )
        print(f"{args.point}: {args.errno}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("luo-orchestrator")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="liveupdate",
        description="Update a host's Linux kernel without stopping its VMs: drive "
        "/dev/liveupdate (LUO) and kexec as a playbook of phases.",
        epilog="Try it without root or a LUO kernel: 'liveupdate demo' runs on a "
        "simulated kernel. Exit codes: 0 ok, 1 failed, 2 bad usage or input, "
        "3 not possible here, 4 device busy, 5 update cancelled (the host is "
        "back in NORMAL), 6 an earlier update must be resumed first, 7 another "
        "update is running (the agent refused this one), 130 "
        "interrupted, 141 output closed early.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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

    _add_update_commands(sub)
    from ._agent import add_agent_commands

    add_agent_commands(sub)
    from ._metrics import add_metrics_commands

    add_metrics_commands(sub)
    return parser


_STATE_HELP = "where the journal and lock live (default: the playbook's state_dir)"


def _with_playbook(p: argparse.ArgumentParser) -> None:
    from pathlib import Path

    p.add_argument("playbook", type=Path, help="the playbook (YAML)")
    p.add_argument(
        "--kernel", default=None, help=_KERNEL_HELP + " (overrides the playbook)"
    )
    p.add_argument("--state-dir", default=None, help=_STATE_HELP)


def _add_resume_command(sub: Any) -> None:
    from . import _update as u

    p = sub.add_parser(
        "resume",
        help="continue after a kexec, or cancel after a crash",
        description="Read the journal: in a new kernel, restore and finish "
        "the update; in the same kernel (the orchestrator died before the "
        "kexec), cancel it and undo every completed step. Give --state-dir "
        "(the boot unit does): the sessions are then taken back before "
        "anything else is loaded.",
    )
    _with_playbook(p)
    p.set_defaults(func=u.cmd_resume)


def _add_update_commands(sub: Any) -> None:
    from pathlib import Path

    from . import _update as u

    default_demo = Path(__file__).resolve().parents[2] / "playbooks" / "demo.yaml"

    p = sub.add_parser(
        "plan",
        help="show the resolved steps of a playbook; does nothing",
        description="Load and check a playbook, and print its phases and "
        "steps with their timeouts and retries. Changes nothing. Exits 2 "
        "if the playbook is invalid (file:line says where).",
    )
    _with_playbook(p)
    p.set_defaults(func=u.cmd_plan)

    p = sub.add_parser(
        "run",
        help="run a live update",
        description="Run the playbook: quiesce, preserve, prepare, freeze, "
        "kexec. On any failure before the kexec the update is cancelled "
        "(exit 5) and the host is back in NORMAL. After the kexec, "
        "'liveupdate resume' (a boot-time unit) restores and finishes.",
    )
    _with_playbook(p)
    p.add_argument(
        "--agent",
        default=None,
        metavar="SOCKET",
        help="run it in the agent behind this control socket (default: "
        "the agent's, /run/liveupdate/control.sock, when it exists)",
    )
    p.add_argument(
        "--no-agent",
        action="store_true",
        help="run it in this process even if an agent runs",
    )
    p.set_defaults(func=u.cmd_run)

    _add_resume_command(sub)

    p = sub.add_parser("status", help="the state of the last update (--json)")
    p.add_argument("--state-dir", required=True, help=_STATE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON for automation")
    p.set_defaults(func=u.cmd_status)

    p = sub.add_parser("cancel", help="cancel the running update")
    p.add_argument("--state-dir", default=None, help=_STATE_HELP)
    p.add_argument(
        "--agent",
        default=None,
        metavar="SOCKET",
        help="cancel the agent's update (default when the agent runs)",
    )
    p.add_argument("--no-agent", action="store_true")
    p.set_defaults(func=u.cmd_cancel)

    p = sub.add_parser(
        "demo",
        help="a whole live update on a simulated kernel",
        description="Start demo key-value workloads with their data in "
        "memfds, run the demo playbook on a fresh simulated kernel (the "
        "kexec ends every process), then resume in the new kernel and "
        "check every workload's data. Everything stays in the demo "
        "directory: the playbook's kernel, state_dir and next_kernel are "
        "ignored (the demo uses its own), and only the workloads, kexec and "
        "faults plugins may run. The workloads are stopped at the end.",
    )
    p.add_argument("playbook", nargs="?", type=Path, default=default_demo)
    p.add_argument(
        "--state-dir",
        default=None,
        help="the demo directory, wiped first if a previous demo made it; a "
        "directory with other content is refused (default: .state/demo)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the workloads running at the end (stop them with "
        "'python -m orchestrator.demo.kv --registry DIR/workloads --stop')",
    )
    p.set_defaults(func=u.cmd_demo)


def _more_fds() -> None:
    """Raise the soft limit on open files to the hard one.

    A host with many VMs has many files to hold: the engine holds every
    preserved file from quiesce on, and the keeper every session and file it
    retrieved (256 VMs x 4 memfds is past the usual soft limit of 1,024).
    What this process starts (the keeper, restored workloads) inherits it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _more_fds()
    if argv[:1] == ["resume"]:
        # Inside the blackout window: take the sessions back before importing
        # anything heavy (argument parsing, the engine, the plugins).
        from orchestrator.restore import _resume

        try:
            prefetched = _resume.prefetch(argv[1:])
        except OrchestratorError as exc:
            print(f"liveupdate: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if prefetched is not None and prefetched[0].owner == "agent":
            # One owner of the restore at boot: the agent's update is the
            # agent's to restore. Its sessions stay with the keeper till then.
            print(
                f"liveupdate: update {prefetched[0].run_id} belongs to the agent, "
                "which restores it when it starts; its sessions are held by the "
                f"keeper (pid {prefetched[1].pid}) until then"
            )
            prefetched[1].close()
            return 0
        from . import _update

        _update.PREFETCHED = prefetched
        # Still inside the blackout: parse only what resume takes.
        import argparse

        parser = argparse.ArgumentParser(prog="liveupdate")
        _add_resume_command(parser.add_subparsers(dest="command", required=True))
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    return _call(args)


def _fail(group: BaseExceptionGroup[BaseException], code: int) -> int:
    """One line on stderr per error, no traceback: these are expected."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            _fail(exc, code)
        else:
            print(f"liveupdate: {_message(exc)}", file=sys.stderr)
    return code


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, OrchestratorError):
        # "[Errno 30] Read-only file system: 'x'" -> "x: Read-only file system"
        import errno

        what = exc.strerror or str(exc)
        if exc.errno is not None and exc.errno in errno.errorcode:
            what += f" [{errno.errorcode[exc.errno]}]"
        return what if exc.filename is None else f"{exc.filename}: {what}"
    return str(exc)


def _stdout_gone() -> int:
    """Whoever read our output has gone (``liveupdate status | head``): stop
    quietly. Further writes, and the flush at exit, go nowhere."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def _call(args: argparse.Namespace) -> int:
    """Run the command; map what can be expected to an exit code and one line.

    Errors may come alone or grouped by a task group: ``except*`` takes both.
    """
    code = EXIT_FAILED
    try:
        code = args.func(args)
    except* BrokenPipeError:
        code = _stdout_gone()
    except* (InvalidArgumentError, PlaybookError) as group:
        code = _fail(group, EXIT_USAGE)
    except* UnfinishedUpdateError as group:
        code = _fail(group, EXIT_UNFINISHED)
    except* (OrchestratorError, ValueError, OSError) as group:
        code = _fail(group, EXIT_FAILED)
    except* KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    return code
