"""The first thing ``liveupdate resume`` does after a kexec: take the sessions back.

This runs inside the blackout window, so it imports only ``os`` and the kernel
layer -- not even ``typing`` or ``enum``, let alone anyio, pluggy, tenacity or
YAML. Before the blackout the engine writes a *restore plan* next to the
journal (``STATE_DIR/restore-plan``, a few ``key value`` lines: the run, the
boot it was written in, the kernel, the ABI, who owns the restore, the
sessions, and the built-in restores resolved as spawn actions); after the
kexec :func:`prefetch` reads it, checks that this is a new boot, and has the
keeper (:mod:`._keeper`) retrieve every session: the restore path's first
kernel call. The sessions are never held by this process alone, so nothing
it does afterwards -- or fails to do -- can lose them. Then it runs the spawn
actions (:mod:`._fast`, which imports ``json``): the workloads run again
before anything heavy is loaded. The engine, imported afterwards, checks the
plan against the journal (the source of truth) and runs the restore phase,
whose built-in hooks adopt what is already running.

Set ``LIVEUPDATE_EXIT_AFTER=first-kernel-call`` to exit right after that call:
``bench/resume_cold_start.py`` measures the cold start with it.
"""

from __future__ import annotations

import os

from orchestrator._compat import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from orchestrator.luo import Kernel

    from ._keeper import Keeper

PLAN_FILE = "restore-plan"
PLAN_MAGIC = "liveupdate-restore-plan 1"


class Plan:
    """What the engine wrote before the kexec for the restore path to read."""

    __slots__ = ("abi", "boot_id", "kernel", "owner", "restores", "run_id", "sessions")

    def __init__(
        self,
        run_id: str,
        boot_id: str,
        kernel: str,
        abi: str,
        sessions: list[str],
        owner: str = "cli",
        restores: list[str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.boot_id = boot_id
        self.kernel = kernel
        self.abi = abi
        self.sessions = sessions
        self.owner = owner  # "cli" (liveupdate resume) or "agent" (the agent resumes)
        # Spawn actions, one JSON object each, for ``_fast.restore``.
        self.restores = restores or []

    def dump(self) -> str:
        lines = [PLAN_MAGIC, f"run {self.run_id}", f"boot {self.boot_id}"]
        lines += [f"kernel {self.kernel}", f"abi {self.abi}", f"owner {self.owner}"]
        lines += [f"session {name}" for name in self.sessions]
        lines += [f"restore {action}" for action in self.restores]
        return "\n".join(lines) + "\n"


def write_plan(state_dir: str | os.PathLike[str], plan: Plan) -> None:
    """Write the plan atomically and durably (temp file, fsync, rename, fsync dir)."""
    path = os.path.join(state_dir, PLAN_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, plan.dump().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_plan(state_dir: str | os.PathLike[str]) -> Plan | None:
    """The plan in *state_dir*, or None when there is none or it is not one."""
    try:
        with open(os.path.join(state_dir, PLAN_FILE)) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not lines or lines[0] != PLAN_MAGIC:
        return None
    fields: dict[str, str] = {}
    sessions = []
    restores = []
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key == "session":
            sessions.append(value)
        elif key == "restore":
            restores.append(value)
        else:
            fields[key] = value
    try:
        return Plan(
            fields["run"],
            fields["boot"],
            fields["kernel"],
            fields["abi"],
            sessions,
            fields.get("owner", "cli"),
            restores,
        )
    except KeyError:
        return None


def remove_plan(state_dir: str | os.PathLike[str]) -> None:
    """The run is over: its plan, and what the restore path did, go."""
    for name in (PLAN_FILE, "restore-fast", "restore-fast.started"):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def prefetch(argv: Sequence[str]) -> tuple[Plan, Keeper] | None:
    """Have the keeper retrieve the planned sessions if this is a new boot.

    ``None`` when there is no plan (nothing to do, or not enough to go on: no
    ``--state-dir``, so the playbook must be read first, on the slow path), or
    when this is still the boot that wrote it (a cancel: not time-critical).
    Whether the new boot came through the kexec at all is the kernel's to
    say: the keeper reports the sessions it did not find.
    """
    state_dir = _option(argv, "--state-dir")
    if state_dir is None:
        return None
    plan = read_plan(state_dir)
    if plan is None:
        return None
    from orchestrator.luo._kernel import kernel_from_spec

    kernel = kernel_from_spec(_option(argv, "--kernel") or plan.kernel)
    if plan.boot_id == kernel.boot_id():
        return None
    from ._keeper import Keeper

    keeper = Keeper.ensure(kernel, state_dir, plan.run_id, plan.abi, plan.sessions)
    if os.environ.get("LIVEUPDATE_EXIT_AFTER") == "first-kernel-call":
        os._exit(0)
    if plan.owner == "cli" and plan.restores:
        _restore_first(plan, kernel, keeper, state_dir)
    return plan, keeper


def _restore_first(plan: Plan, kernel: Kernel, keeper: Keeper, state_dir: str) -> None:
    """Start the workloads the engine resolved before the kexec (:mod:`._fast`)."""
    import json

    from . import _fast

    missing = set(keeper.missing)
    actions = []
    for raw in plan.restores:
        try:
            action = json.loads(raw)
        except ValueError:
            continue  # the engine's restore phase does that step the slow way
        if (
            isinstance(action, dict)
            and action.get("entry", {}).get("session") not in missing
        ):
            actions.append(action)
    if actions and "rfc" not in missing:
        _fast.restore(kernel, keeper, actions, state_dir, plan.run_id)
