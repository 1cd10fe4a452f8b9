"""Host services whose state systemd itself carries across the kexec.

A service that keeps its state in memfds in its own fd store
(``sd_pid_notify_with_fds(... "FDSTORE=1")``), under a unit with
``FileDescriptorStorePreserve=yes``, gets them back after a ``systemctl
kexec``: systemd >= 261 preserves every such store in its own LUO session
(``systemd``) at the last moment of the shutdown, and hands the fds back
through ``$LISTEN_FDS`` when it starts the service again. systemd does
nothing of the sort on the reboot syscall, so these services need the
playbook's ``next_kernel.via: systemd``.

This plugin makes that a checked promise rather than an assumption:

- ``quiesce``: systemd >= 261, ``next_kernel.via: systemd``, and each named
  service active with ``FileDescriptorStorePreserve=yes``; the number of fds
  in each store is recorded. Any miss fails the step (the update is cancelled
  before anything is touched), naming the service and what it lacks.
- ``restore``: each service is active again, with as many fds in its store
  as before the kexec (systemd keeps a copy of what it hands back), waiting
  up to the step's timeout for the boot to start it.

Options (``with:``): ``services``, the units (``name.service``); a restore
step names those of a quiesce step it waits for.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from orchestrator import Option, hookimpl

if TYPE_CHECKING:
    from orchestrator import StepContext

#: The first systemd that preserves fd stores across a kexec.
PRESERVE_SINCE = 261
PROPERTIES = ("ActiveState", "FileDescriptorStorePreserve", "NFileDescriptorStore")
#: How often the restore asks systemd whether a service is back.
POLL_S = 0.2


def _services_problem(value: list[object]) -> str | None:
    if not value:
        return "expected at least one unit name"
    for unit in value:
        if not isinstance(unit, str) or not unit.endswith(".service") or "/" in unit:
            return f"expected unit names like name.service, got {unit!r}"
    return None


OPTIONS = (
    Option(
        "services",
        list,
        "the services whose fd stores systemd keeps across the kexec",
        required=True,
        check=_services_problem,
    ),
)


def _systemctl(*args: str) -> str:
    done = subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit {done.returncode}"
        raise RuntimeError(f"systemctl {' '.join(args)}: {said}")
    return done.stdout


def systemd_version() -> int | None:
    """The running systemd's version, or None when ``systemctl`` does not say."""
    first = _systemctl("--version").split("\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else None


def show(unit: str) -> dict[str, str]:
    """What systemd says of *unit*: :data:`PROPERTIES`."""
    out = _systemctl("show", *(f"--property={p}" for p in PROPERTIES), unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def why_not_kept(unit: str, props: dict[str, str]) -> str | None:
    """What keeps systemd from carrying *unit*'s store across the kexec."""
    if props.get("ActiveState") != "active":
        return f"{unit} is {props.get('ActiveState') or 'unknown'}, not active"
    if props.get("FileDescriptorStorePreserve") != "yes":
        return f"{unit} does not set FileDescriptorStorePreserve=yes"
    return None


class SystemdPlugin:
    """Checks that systemd will keep, and did keep, named services' fd stores."""

    name = "systemd"
    options = OPTIONS

    @hookimpl
    async def lu_quiesce(self, ctx: StepContext) -> None:
        nxt = ctx.run.playbook.next_kernel
        if nxt is None or nxt.via != "systemd":
            raise RuntimeError(
                "systemd keeps fd stores only through `systemctl kexec`: set "
                "next_kernel.via: systemd"
            )
        version = await anyio.to_thread.run_sync(systemd_version)
        if version is None or version < PRESERVE_SINCE:
            raise RuntimeError(
                f"systemd {version or '(version unknown)'} does not preserve fd "
                f"stores across a kexec (systemd >= {PRESERVE_SINCE} does)"
            )
        stores: dict[str, int] = {}
        for unit in ctx.options["services"]:
            props = await anyio.to_thread.run_sync(show, unit)
            why = why_not_kept(unit, props)
            if why is not None:
                raise RuntimeError(why)
            stores[unit] = int(props.get("NFileDescriptorStore") or 0)
        ctx.log.info("systemd %d keeps the fd stores %s", version, stores)
        ctx.record("stores", stores)

    @hookimpl
    async def lu_restore(self, ctx: StepContext) -> None:
        stores: dict[str, int] = ctx.recorded("stores", {})
        for unit in ctx.options["services"]:
            count = stores.get(unit)
            if count is None:
                raise RuntimeError(
                    f"{unit} was not checked before the kexec: name it in a "
                    "quiesce step of this plugin too"
                )
            while True:  # bounded by the step's timeout
                props = await anyio.to_thread.run_sync(show, unit)
                back = int(props.get("NFileDescriptorStore") or 0)
                state = props.get("ActiveState")
                if state == "active":
                    break
                if state == "failed":
                    raise RuntimeError(f"{unit} failed to start after the kexec")
                await anyio.sleep(POLL_S)
            if back < count:
                raise RuntimeError(
                    f"{unit} runs with {back} of its {count} stored fd(s): systemd "
                    "preserves stores best effort, and its journal says what it "
                    "dropped"
                )
            ctx.log.info("%s runs with its %d stored fd(s)", unit, back)
