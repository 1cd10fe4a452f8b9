"""``liveupdate agent`` and ``liveupdate handover``: the agent and its clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent_client import DEFAULT_SOCKET

if TYPE_CHECKING:
    import argparse


def cmd_agent(args: argparse.Namespace) -> int:
    import anyio

    from ._agent import run_agent
    from .luo import kernel_from_spec

    kernel = kernel_from_spec(args.kernel)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            agent = await tg.start(
                run_agent,
                Path(args.socket),
                Path(args.state_dir),
                kernel,
                frozenset(args.allow_uid),
                frozenset(args.allow_gid),
            )
            print(
                f"agent listening on {agent.socket_path} ({len(agent.registrations)} "
                f"registration(s) held)",
                flush=True,
            )

    anyio.run(main)
    return 0


def cmd_handover(args: argparse.Namespace) -> int:
    from .agent_client import AgentClient

    with AgentClient(args.socket) as agent:
        if args.action == "register":
            answer = agent.register(args.name, args.fd)
            print(
                f"registered {answer['name']}: {answer['kind']}, {answer['size']} bytes"
            )
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
            answer = agent._call(
                {"op": "run", "playbook": str(Path(args.playbook).absolute())}
            )[0]
            print(
                f"the agent started the update ({answer['registrations']} registration(s)); "
                "follow it with 'liveupdate status'"
            )
    return 0


def add_agent_commands(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the host agent that owns the fds to preserve",
        description="Serve workloads on a Unix socket: they hand over fds "
        "(SCM_RIGHTS) to keep across the next live update and reclaim them after "
        "it. Peers are checked with SO_PEERCRED (root, --allow-uid, --allow-gid). "
        "At start, an update interrupted by the kexec is resumed first.",
    )
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--state-dir", default="/var/lib/liveupdate")
    p.add_argument("--kernel", default=None, help="'real' or 'sim:DIR'")
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID")
    p.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "handover",
        help="talk to the agent: register, withdraw, list, run",
        description="Hand an fd to the agent ('register NAME --fd N', N inherited "
        "from the shell, e.g. 3<file), take it back before an update ('withdraw'), "
        "list what it holds, or ask it to run a playbook.",
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
