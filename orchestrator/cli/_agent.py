"""``liveupdate agent`` and ``liveupdate handover``: the agent and its clients."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.agent.client import DEFAULT_SOCKET

if TYPE_CHECKING:
    import argparse

    from orchestrator.agent.client import AgentClient
    from orchestrator.luo import Kernel


EXIT_REFUSED = 1  # the agent refused the request, or could not start
EXIT_USAGE = 2  # bad arguments: an fd that is not open, a bad name
EXIT_NOT_POSSIBLE = 3  # no live update on this host (the unit does not restart)
EXIT_BUSY = 4  # another agent already serves this socket or state dir
EXIT_UNREACHABLE = 6  # no agent answers on the socket

_EXIT_CODES = (
    "Exit codes: 0 ok; 1 the agent refused the request (or could not start); "
    "2 bad usage (e.g. --fd not open); 3 (agent) no live update on this host; "
    "4 another agent already serves this "
    "socket or state dir; 6 no agent answers on the socket."
)


def _fail(message: object) -> None:
    print(f"liveupdate: {message}", file=sys.stderr)


def cmd_agent(args: argparse.Namespace) -> int:
    import functools

    import anyio

    from orchestrator.agent._fdstore import listen_fds, notify
    from orchestrator.agent._guard import Limits
    from orchestrator.agent._server import run_agent
    from orchestrator.errors import AgentBusyError, AgentSetupError
    from orchestrator.luo import kernel_from_spec
    from orchestrator.luo._probe import probe

    # First, before anything opens an fd: what the fd store handed back.
    stored = listen_fds()
    # What the agent does goes to stdout (stderr is for the one line that says
    # why it cannot start): under systemd, to its journal, which stamps it.
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    kernel = kernel_from_spec(args.kernel)
    # A host without LUO has nothing for an agent to do: say why and exit 3,
    # which the unit does not restart (RestartPreventExitStatus=3). A busy
    # device (a keeper, a running update) is no reason not to start. Only
    # the device is tried: the agent may start inside a blackout (to resume
    # its own update), and probe, which reads the kernel's whole log, runs
    # only to say why not.
    if not _has_device(kernel):
        report = probe(kernel, try_kinds=False)
        if report.exit_code == EXIT_NOT_POSSIBLE:
            _fail(f"no live update on this host, the agent stops: {report.reason}")
            return EXIT_NOT_POSSIBLE
    limits = Limits(
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_registrations=args.max_registrations,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            agent = await tg.start(
                functools.partial(run_agent, stored=stored),
                Path(args.socket),
                Path(args.state_dir),
                kernel,
                frozenset(args.allow_uid),
                frozenset(args.allow_gid),
                limits,
            )
            held = f"{len(agent.registrations)} registration(s) held"
            print(f"agent listening on {agent.socket_path} ({held})", flush=True)
            # Under systemd (Type=notify): serving now, units after it may start.
            await anyio.to_thread.run_sync(
                functools.partial(notify, f"READY=1\nSTATUS=serving, {held}")
            )

    code = 0
    try:
        anyio.run(main)
    except* AgentBusyError as group:
        _fail(_leaf(group))
        code = EXIT_BUSY
    except* AgentSetupError as group:
        _fail(_leaf(group))
        code = EXIT_REFUSED
    return code


def _has_device(kernel: Kernel) -> bool:
    """Whether *kernel* has a /dev/liveupdate (busy counts: it exists)."""
    try:
        fd = kernel.open_device()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    kernel.close(fd)
    return True


def _leaf(error: BaseException) -> BaseException:
    """The first exception inside (nested) task groups' exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def cmd_handover(args: argparse.Namespace) -> int:
    from orchestrator.agent.client import AgentClient
    from orchestrator.errors import AgentRefusedError, AgentUnreachableError

    if args.action == "register":
        try:
            os.fstat(args.fd)
        except OSError as exc:
            _fail(
                f"--fd {args.fd}: not an open fd of this process ({exc.strerror}); "
                f"open it for the command, e.g. '{args.fd}<FILE'"
            )
            return EXIT_USAGE
    try:
        with AgentClient(args.socket) as agent:
            _handover(agent, args)
    except AgentUnreachableError as exc:
        _fail(f"{exc} (is 'liveupdate agent' running, and may this user use it?)")
        return EXIT_UNREACHABLE
    except AgentRefusedError as exc:
        _fail(f"the agent refused {exc.op!r}: {exc.reason}")
        return EXIT_REFUSED
    return 0


def _handover(agent: AgentClient, args: argparse.Namespace) -> None:
    if args.action == "register":
        answer = agent.register(args.name, args.fd)
        print(f"registered {answer['name']}: {answer['kind']}, {answer['size']} bytes")
    elif args.action == "withdraw":
        agent.withdraw(args.name)
        print(f"withdrew {args.name}")
    elif args.action == "list":
        items = agent.list()
        if args.json:
            print(json.dumps(items, indent=2))
        for item in [] if args.json else items:
            print(
                f"{item['name']:24} {item['state']:10} {item['size']:>12} B  "
                f"uid {item['uid']} pid {item['pid']}  {item['kind']}"
            )
    elif args.action == "run":
        answer = agent.run(args.playbook)
        print(
            f"the agent started the update ({answer['registrations']} registration(s)); "
            "follow it with 'liveupdate status'"
        )


def add_agent_commands(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the host agent that owns the fds to preserve",
        description="Serve workloads on a Unix socket: they hand over fds "
        "(SCM_RIGHTS) to keep across the next live update and reclaim them after "
        "it. Peers are checked with SO_PEERCRED (root, --allow-uid, --allow-gid). "
        "At start, an update interrupted by the kexec is resumed first. One "
        "agent per socket and state dir. " + _EXIT_CODES,
    )
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--state-dir", default="/var/lib/liveupdate")
    p.add_argument("--kernel", default=None, help="'real' or 'sim:DIR'")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID")
    p.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection idle this long (default 30)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        metavar="N",
        help="connections served at once (default: from RLIMIT_NOFILE, at most 256)",
    )
    p.add_argument(
        "--max-registrations",
        type=int,
        default=None,
        metavar="N",
        help="fds held at once (default: what RLIMIT_NOFILE leaves)",
    )
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "handover",
        help="talk to the agent: register, withdraw, list, run",
        description="Hand an fd to the agent ('register NAME --fd N', N inherited "
        "from the shell, e.g. 3<file), take it back before an update ('withdraw'), "
        "list what it holds, or ask it to run a playbook. " + _EXIT_CODES,
    )
    p.add_argument("--socket", default=DEFAULT_SOCKET)
    hs = p.add_subparsers(dest="action", required=True)
    q = hs.add_parser("register")
    q.add_argument("name")
    q.add_argument("--fd", type=int, required=True)
    q = hs.add_parser("withdraw")
    q.add_argument("name")
    q = hs.add_parser("list")
    q.add_argument("--json", action="store_true")
    q = hs.add_parser("run")
    q.add_argument("playbook")
    p.set_defaults(func=cmd_handover)
