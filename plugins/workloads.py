"""Workloads that keep their state in a memfd: the demo's plugin, and any process
that publishes itself the same way.

``liveupdate demo`` and ``playbooks/demo.yaml`` use it, with the demo
key-value stores (:mod:`orchestrator.demo`) as workloads. Each workload
publishes ``REGISTRY/<name>.json``: ``name``, ``pid``, ``fd`` (the memfd's fd
number in that process) and optionally

- ``socket``: a Unix socket answering ``PING`` and ``SUM`` (the demo stores'
  protocol); without one, the plugin checks the process runs and hashes the
  file itself;
- ``sha256``: the data's SHA-256, if the workload knows it;
- ``session``: a group name: the workloads of one group share a LUO session
  of their own (``lu-workloads.<group>``, e.g. one per VM) instead of the
  plugin's;
- ``restart``: ``{"argv": [...], "fd_arg": "--memfd"}``, the command that
  starts it again on its file (the fd number is appended after ``fd_arg``);
  it prints the pid of the process that will serve and exits, and that
  process publishes itself. Default: the demo store's own command.

``session`` and ``restart`` may also be kept apart in ``REGISTRY/<name>.spec.json``
(the workload need not republish them); the plugin writes that file back
after a restore. quiesce checks they answer; preserve takes each memfd
through ``/proc/PID/fd/N`` and preserves it; freeze pauses them (SIGSTOP:
the blackout starts); after the kexec, restore starts each again on its
retrieved memfd -- usually the restore path already did, before the engine
was loaded (:meth:`WorkloadsPlugin.lu_restore_plan`) -- and finish checks the
data's SHA-256 against the one recorded before.

Options (``with:``): see :data:`OPTIONS`; ``count`` and ``size_mib`` are read
by ``liveupdate demo`` only (from the first quiesce step), to start the
workloads before the update.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from orchestrator import Option, TransientError, hookimpl, option_value
from orchestrator.demo import WorkloadError, ask, launch, launch_argv, wait_published
from orchestrator.luo import holds_same_file

if TYPE_CHECKING:
    from orchestrator import StepContext


OPTIONS = (
    Option(
        "registry",
        str,
        "the directory where workloads publish themselves (NAME.json)",
        default_doc="STATE_DIR/workloads",
    ),
    Option(
        "count",
        int,
        "demo only: how many workloads `liveupdate demo` starts",
        default=2,
        min=1,
        max=64,
    ),
    Option(
        "size_mib",
        int,
        "demo only: MiB of memfd data in each workload `liveupdate demo` starts",
        default=128,
        min=1,
        max=16384,
    ),
)


class WorkloadNotReadyError(WorkloadError, TransientError):
    """A restarted workload has not published itself yet."""


def _registry(ctx: StepContext) -> Path:
    return Path(
        option_value(ctx.options, OPTIONS, "registry") or ctx.state_dir / "workloads"
    )


def _running(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie (cheap: inside the blackout).

    :raises OSError: /proc could not be read for another reason than the
        process being gone (e.g. out of fds): that is not "not running".
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _serving(registry: Path, name: str, fd: int) -> dict[str, Any] | None:
    """The published entry of store *name* if a live process serves the very
    file *fd* is (restore is idempotent: a resume run again adopts it)."""
    try:
        info: dict[str, Any] = json.loads((registry / f"{name}.json").read_text())
        pid, number = int(info["pid"]), int(info["fd"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if holds_same_file(pid, number, fd) else None


def _entries(registry: Path) -> list[dict[str, Any]]:
    """The published workloads, each with its spec file's fields merged in."""
    entries = []
    for path in sorted(registry.glob("*.json")):
        if path.name.endswith(".spec.json"):
            continue
        info: dict[str, Any] = json.loads(path.read_text())
        spec = registry / f"{info['name']}.spec.json"
        if spec.exists():
            for key, value in json.loads(spec.read_text()).items():
                info.setdefault(key, value)
        entries.append(info)
    return entries


def _write_spec(registry: Path, info: dict[str, Any]) -> None:
    spec = {k: info[k] for k in ("session", "restart") if info.get(k) is not None}
    if spec:
        tmp = registry / f".{info['name']}.spec.json.tmp"
        tmp.write_text(json.dumps(spec))
        tmp.replace(registry / f"{info['name']}.spec.json")


def _restart(registry: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The command that starts workload *info* again, and its fd option."""
    restart = info.get("restart")
    if restart is None:
        return {"argv": launch_argv(registry, info["name"]), "fd_arg": "--memfd"}
    return {"argv": [str(a) for a in restart["argv"]], "fd_arg": str(restart["fd_arg"])}


def _start(registry: Path, info: dict[str, Any], kernel_spec: str, fd: int) -> int:
    """Start workload *info* on *fd* with its restart command; the serving pid."""
    if info.get("restart") is None:
        return launch(registry, info["name"], 0, kernel_spec, fd)
    cmd = _restart(registry, info)
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / f"{info['name']}.log", "ab") as log:
        done = subprocess.run(
            [*cmd["argv"], cmd["fd_arg"], str(fd)],
            pass_fds=(fd,),
            check=False,
            env={**os.environ, "LIVEUPDATE_KERNEL": kernel_spec},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=60,
        )
    try:
        if done.returncode == 0:
            return int(done.stdout)
    except ValueError:
        pass
    raise WorkloadError(
        f"workload {info['name']!r} failed to start (see {registry / info['name']}.log)"
    )


def _sum(info: dict[str, Any], fd: int) -> str:
    """SHA-256 of the workload's data: asked of it if it has a socket (it must
    serve it), else read from its file."""
    if info.get("socket"):
        return ask(info["socket"], "SUM", timeout=600.0)
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _alive(info: dict[str, Any]) -> None:
    if not info.get("socket"):
        if not _running(int(info["pid"])):
            raise WorkloadError(
                f"workload {info['name']!r} (pid {info['pid']}) is not running"
            )
        return
    try:
        reply = ask(info["socket"], "PING", timeout=5)
    except OSError as exc:
        raise WorkloadError(
            f"workload {info['name']!r} (pid {info['pid']}) is not answering: "
            f"{exc.strerror or exc}"
        ) from exc
    if reply != "PONG":
        raise WorkloadError(f"workload {info['name']!r} answered {reply!r} to PING")


class WorkloadsPlugin:
    """Holds each workload's memfd from quiesce on, so that a workload that dies
    during the update is started again from its data when the update is cancelled."""

    name = "workloads"
    options = OPTIONS

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def _release(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    @hookimpl
    async def lu_quiesce(self, ctx: StepContext) -> None:
        registry = _registry(ctx)
        entries = _entries(registry)
        if not entries:
            raise WorkloadError(f"no workloads registered in {registry}")
        for info in entries:
            await anyio.to_thread.run_sync(_alive, info)
            if info["name"] not in self._held:
                try:
                    path = f"/proc/{info['pid']}/fd/{info['fd']}"
                    self._held[info["name"]] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    raise WorkloadError(
                        f"cannot reach the memfd of workload {info['name']!r}: {exc.strerror}"
                    ) from exc
            if info.get("sha256") is None:
                # Restored by a previous update (it serves without having
                # hashed its data), or it never says: what it holds now is
                # what must come back.
                held = self._held[info["name"]]
                info["sha256"] = await anyio.to_thread.run_sync(_sum, info, held)
            info.setdefault("size", os.fstat(self._held[info["name"]]).st_size)
        ctx.record("workloads", entries)

    @hookimpl
    async def lu_quiesce_rollback(self, ctx: StepContext) -> None:
        """Every workload serves again: any that died restarts on its own data."""
        registry = _registry(ctx)
        try:
            for info in ctx.recorded("workloads", []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(
                        int(info["pid"]), signal.SIGCONT
                    )  # idempotent: never left paused
                try:
                    await anyio.to_thread.run_sync(_alive, info)
                    continue
                except WorkloadError:
                    held = self._held.get(info["name"])
                    if held is None:
                        raise
                ctx.log.warning(
                    "workload %s died during the update; restarting it", info["name"]
                )
                start = functools.partial(_start, registry, info, ctx.kernel.spec, held)
                pid = await anyio.to_thread.run_sync(start)
                new = await anyio.to_thread.run_sync(
                    wait_published, registry, info["name"], pid
                )
                now = await anyio.to_thread.run_sync(_sum, new, held)
                if now != info["sha256"]:
                    raise WorkloadError(
                        f"workload {info['name']!r} restarted with other data"
                    )
        finally:
            self._release()

    @hookimpl
    async def lu_preserve(self, ctx: StepContext) -> None:
        for info in ctx.recorded("workloads", []):
            await ctx.preserve(
                info["name"], self._held[info["name"]], session=info.get("session")
            )

    @hookimpl
    async def lu_freeze(self, ctx: StepContext) -> None:
        """Pause every workload, or none: a failed freeze leaves nothing paused."""
        workloads = ctx.recorded("workloads", [])
        for info in workloads:
            if not _running(int(info["pid"])):
                raise WorkloadError(f"workload {info['name']!r} died before the freeze")
        stopped: list[int] = []
        try:
            for info in workloads:
                os.kill(int(info["pid"]), signal.SIGSTOP)
                stopped.append(int(info["pid"]))
        except BaseException:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            raise
        ctx.record("stopped", True)

    @hookimpl
    async def lu_freeze_rollback(self, ctx: StepContext) -> None:
        for info in ctx.recorded("workloads", []):
            try:
                os.kill(int(info["pid"]), signal.SIGCONT)
            except ProcessLookupError:
                pass  # dead: the quiesce rollback starts it again

    def lu_restore_plan(self, ctx: StepContext) -> list[dict[str, Any]]:
        """The restore, resolved before the kexec: one command per workload,
        which the restore path runs before the engine is loaded."""
        registry = _registry(ctx)
        return [
            {
                "key": info["name"],
                "entry": ctx.preserved(info["name"]),
                **_restart(registry, info),
                "env": {"LIVEUPDATE_KERNEL": ctx.kernel.spec},
                "log": str(registry / f"{info['name']}.log"),
                "published": str(registry / f"{info['name']}.json"),
            }
            for info in ctx.recorded("workloads", [])
        ]

    @hookimpl
    async def lu_restore(self, ctx: StepContext) -> None:
        """Start every workload again on its retrieved memfd, all at once: the
        blackout ends when they serve. Their data is checked in FINISH.

        The restore path has usually started them already (from
        :meth:`lu_restore_plan`): they are adopted."""
        registry = _registry(ctx)
        restored: dict[str, dict[str, Any]] = {}

        async def restart(info: dict[str, Any]) -> None:
            with await ctx.retrieve(info["name"]) as fd:
                running = _serving(registry, info["name"], fd.fileno())
                if running is not None:  # an interrupted resume started it
                    restored[info["name"]] = running
                    return
                start = functools.partial(
                    _start, registry, info, ctx.kernel.spec, fd.fileno()
                )
                pid = await anyio.to_thread.run_sync(start)
            restored[info["name"]] = await anyio.to_thread.run_sync(
                wait_published, registry, info["name"], pid
            )

        workloads = ctx.recorded("workloads", [])
        async with anyio.create_task_group() as tg:
            for info in workloads:
                tg.start_soon(restart, info)
        for info in workloads:  # for the next update, whatever they republished
            _write_spec(registry, info)
        ctx.record("restored", [restored[info["name"]] for info in workloads])

    @hookimpl
    async def lu_finish(self, ctx: StepContext) -> None:
        """Every byte came back: each workload's SHA-256 equals the one recorded
        before the kexec."""
        before = {info["name"]: info for info in ctx.recorded("workloads", [])}
        for info in ctx.recorded("restored", []):
            with await ctx.retrieve(info["name"]) as fd:
                now = await anyio.to_thread.run_sync(_sum, info, fd.fileno())
                size = os.fstat(fd.fileno()).st_size
            old = before[info["name"]]
            if now != old["sha256"] or size != old["size"]:
                raise WorkloadError(
                    f"workload {info['name']!r}: data differs after the kexec "
                    f"(sha256 {now[:12]} != {old['sha256'][:12]})"
                )
