"""QEMU VMs across the kexec: guest RAM preserved in a memfd, device state in a file.

The VMs are the ones published in a registry directory by
:func:`orchestrator.vmm.launch_vm` (``REGISTRY/<name>.json``: pid, QMP socket,
the spec to start the same machine again). Guest RAM is a shared memfd.

- quiesce: each VM answers QMP, runs and has the migration mode asked for;
  then ``x-ignore-shared`` is set (and, in ``cpr-reboot`` mode, the migration
  ``mode`` parameter), so that the migration stream holds device state only,
  not RAM.
- preserve: the guest-RAM memfd, opened through ``/proc/PID/fd/N``, goes to
  ``ctx.preserve()`` while the VM runs (the kernel takes its contents at the kexec).
- freeze: QMP ``stop`` (**the VM's blackout starts**), then ``migrate`` the device
  state into ``STATE_DIR/qemu/<name>.state`` (fsync'ed). Every VM or none: a
  failure resumes those already stopped. Its rollback resumes them (``cont``).
- restore (new kernel): a new QEMU on the retrieved memfd
  (``memory-backend-file,mem-path=/proc/self/fd/N``) with ``-S -incoming defer``
  loads the state file, the probed guest words are checked, then ``cont``
  (**the blackout ends**; ``blackout_s`` is recorded). Usually the restore
  path has done this already, one ``python -m orchestrator.vmm.restore`` per
  VM side by side, before the engine was loaded (:meth:`QemuPlugin.lu_restore_plan`;
  the freeze leaves ``STATE_DIR/qemu/<name>.frozen`` for it): the hook then
  adopts that QEMU, and never starts a guest that ran again a second time.
- finish: each VM runs; ``x-ignore-shared`` is switched off again (a later
  ordinary migration must carry RAM).

Options (``with:``), on any step of this plugin (declared in :data:`OPTIONS`):

- ``registry``: the VM registry (default ``STATE_DIR/qemu``);
- ``vms``: the VMs to update, names or ``{name: ..., qmp: ...}`` (default: all
  registered; ``qmp`` overrides the published socket);
- ``probe`` (quiesce or freeze step): guest-physical addresses whose 32-bit
  words are recorded at the freeze and must read the same in the new QEMU
  before it resumes;
- ``mode`` (quiesce step): how the device state crosses the kexec:
  ``cpr-reboot`` (QEMU >= 8.2), ``x-ignore-shared`` (any QEMU) or ``auto``
  (the default: ``cpr-reboot`` where the QEMU has it). Every VM is checked
  before any is changed: a QEMU without the mode asked for fails the quiesce,
  naming its version, and nothing was touched;
- ``qmp_timeout``: seconds for each QMP command (default 30);
- ``migrate_timeout``: seconds for saving or loading device state (default 120).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from orchestrator import Option, OrchestratorError, hookimpl, option_value
from orchestrator.vmm import (
    QmpCommandError,
    QmpError,
    VmError,
    VmInfo,
    find_ram_fd,
    frozen_path,
    open_qmp,
    read_words,
    registered_vms,
    restore_vm,
    restored_path,
    restored_vm,
    running,
    set_migration,
)

if TYPE_CHECKING:
    from orchestrator import StepContext
    from orchestrator.vmm import QmpClient


def _vms_problem(value: list[Any]) -> str | None:
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            continue
        if (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and item["name"]
            and set(item) <= {"name", "qmp"}
            and isinstance(item.get("qmp", ""), str)
        ):
            continue
        return f"item {i}: expected a VM name or {{name: NAME, qmp: SOCKET}}, got {item!r:.60}"
    return None


def _probe_problem(value: int | str | list[Any]) -> str | None:
    try:
        _addresses(value)
    except (TypeError, ValueError):
        return f"expected guest-physical addresses (e.g. 0x1000), got {value!r:.60}"
    return None


MODES = ("auto", "cpr-reboot", "x-ignore-shared")


def _mode_problem(value: str) -> str | None:
    if value in MODES:
        return None
    return f"expected one of {', '.join(MODES)}, got {value!r:.40}"


def _cpr(vm: str, mode: str, has_cpr: bool, version: tuple[int, int, int]) -> bool:
    """Whether *vm* crosses the kexec in ``cpr-reboot`` mode."""
    if mode == "cpr-reboot" and not has_cpr:
        raise VmError(
            vm,
            f"QEMU {'.'.join(map(str, version))} has no cpr-reboot migration "
            "mode (QEMU >= 8.2 has it); use mode: x-ignore-shared or auto",
        )
    return has_cpr and mode != IGNORE_SHARED


OPTIONS = (
    Option(
        "registry",
        str,
        "the directory where VMs publish themselves (NAME.json)",
        default_doc="STATE_DIR/qemu",
    ),
    Option(
        "vms",
        list,
        "the VMs to update: names or {name: NAME, qmp: SOCKET} (qmp overrides "
        "the published socket)",
        default_doc="all registered",
        check=_vms_problem,
    ),
    Option(
        "probe",
        (int, str, list),
        "quiesce or freeze step: guest-physical addresses whose 32-bit words "
        "must read the same in the new QEMU before it resumes",
        default_doc="none",
        check=_probe_problem,
    ),
    Option(
        "mode",
        str,
        "quiesce step: how the device state crosses the kexec: cpr-reboot "
        "(QEMU >= 8.2), x-ignore-shared (any QEMU) or auto (cpr-reboot where "
        "the QEMU has it)",
        default="auto",
        check=_mode_problem,
    ),
    Option(
        "qmp_timeout",
        float,
        "seconds for each QMP command",
        default=30.0,
        min=0.001,
        max=3600,
    ),
    Option(
        "migrate_timeout",
        float,
        "seconds for saving or loading device state",
        default=120.0,
        min=0.001,
        max=86400,
    ),
)
_OPTION_KEYS = frozenset(option.key for option in OPTIONS)
STATE_FD_NAME = "lu-state"
IGNORE_SHARED = "x-ignore-shared"
# query-status while stopped by us, before or after the device state was saved.
_STOPPED = frozenset({"paused", "finish-migrate", "postmigrate"})


class QemuOptionsError(OrchestratorError, ValueError):
    """The step's ``with:`` options are wrong."""


def _options(ctx: StepContext) -> dict[str, Any]:
    opts = ctx.options
    unknown = sorted(set(opts) - _OPTION_KEYS)
    if unknown:
        raise QemuOptionsError(
            f"qemu: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(_OPTION_KEYS))})"
        )
    return opts


def _registry(ctx: StepContext) -> Path:
    return Path(
        option_value(_options(ctx), OPTIONS, "registry") or ctx.state_dir / "qemu"
    )


def _qmp_timeout(ctx: StepContext) -> float:
    return float(option_value(_options(ctx), OPTIONS, "qmp_timeout"))


def _migrate_timeout(ctx: StepContext) -> float:
    return float(option_value(_options(ctx), OPTIONS, "migrate_timeout"))


def _addresses(raw: object) -> list[int]:
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int | str):
            raise TypeError(a)
        out.append(int(a, 0) if isinstance(a, str) else a)
    return out


def _probes(ctx: StepContext) -> list[int]:
    raw = _options(ctx).get("probe") or []
    try:
        return _addresses(raw)
    except (TypeError, ValueError) as exc:
        raise QemuOptionsError(f"qemu: probe must be addresses, got {raw!r}") from exc


def _selected(ctx: StepContext) -> list[VmInfo]:
    registry = _registry(ctx)
    vms = {vm.name: vm for vm in registered_vms(registry)}
    wanted = _options(ctx).get("vms")
    if wanted is None:
        if not vms:
            raise VmError("*", f"no VMs registered in {registry}")
        return list(vms.values())
    chosen = []
    for item in wanted:
        name = item if isinstance(item, str) else str(item.get("name"))
        vm = vms.get(name)
        if vm is None:
            raise VmError(name, f"not registered in {registry}")
        if isinstance(item, dict) and item.get("qmp"):
            vm = VmInfo(vm.spec, vm.pid, str(item["qmp"]), vm.log, vm.ram_fd)
        chosen.append(vm)
    return chosen


def _vms(ctx: StepContext) -> list[VmInfo]:
    return [VmInfo.from_json(d) for d in ctx.recorded("vms", [])]


async def _status(qmp: QmpClient) -> str:
    reply = await qmp.execute("query-status")
    return str(reply["status"])


async def _wait_migration(qmp: QmpClient, vm: str, budget: float) -> dict[str, Any]:
    """Poll ``query-migrate`` until the migration ends; its final reply."""
    with anyio.fail_after(budget):
        while True:
            info: dict[str, Any] = await qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VmError(
                    vm, f"migration {status}: {info.get('error-desc', 'no reason')}"
                )
            await anyio.sleep(0.01)


async def _resume(qmp: QmpClient, vm: str) -> None:
    """Undo a freeze on the running kernel: cancel any migration, then ``cont``."""
    with contextlib.suppress(QmpCommandError):
        await qmp.execute("migrate_cancel")
    status = await _status(qmp)
    if status in _STOPPED:
        await qmp.execute("cont")
        status = await _status(qmp)
    if status != "running":
        raise VmError(vm, f"is {status!r} after cont")


def _end_earlier_attempt(registry: Path, vm: VmInfo) -> None:
    """Kill a QEMU that a failed earlier attempt of the restore started.

    The VM's old QEMU died at the kexec; any other published pid that runs is
    ours, from an attempt that failed after starting it.
    """
    for other in registered_vms(registry):
        if other.name == vm.name and other.pid != vm.pid and running(other.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(other.pid, signal.SIGKILL)


def _write_durably(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class QemuPlugin:
    """Moves QEMU VMs across the kexec with their RAM in a preserved memfd."""

    name = "qemu"
    options = OPTIONS

    @hookimpl
    async def lu_quiesce(self, ctx: StepContext) -> None:
        chosen = _selected(ctx)
        probes = _probes(ctx)
        mode = str(option_value(_options(ctx), OPTIONS, "mode"))
        # Every VM is checked before any is changed ...
        checked = []
        for vm in chosen:
            async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
                status = await _status(qmp)
                if status != "running":
                    raise VmError(vm.name, f"is {status!r}, not running")
                params = await qmp.execute("query-migrate-parameters")
                # QEMU >= 8.2 has the "mode" parameter, hence cpr-reboot.
                cpr = _cpr(vm.name, mode, "mode" in params, qmp.version)
                checked.append((vm, cpr, qmp.version))
        # ... and each is recorded as soon as it is changed: the rollback
        # undoes exactly those.
        entries: list[dict[str, Any]] = []
        for vm, cpr, version in checked:
            async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
                await set_migration(qmp, True, cpr)
            entries.append({**vm.to_json(), "cpr": cpr, "qemu": version})
            ctx.record("vms", entries)
            ctx.log.info(
                "VM %s (QEMU %s, pid %d): %s",
                vm.name,
                ".".join(map(str, version)),
                vm.pid,
                "cpr-reboot" if cpr else IGNORE_SHARED,
            )
        if probes:
            ctx.record("probe", probes)

    @hookimpl
    async def lu_quiesce_rollback(self, ctx: StepContext) -> None:
        """Every VM runs again, with its migration settings as before."""
        for entry in ctx.recorded("vms", []):
            vm = VmInfo.from_json(entry)
            async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
                await _resume(qmp, vm.name)
                await set_migration(qmp, False, bool(entry["cpr"]))

    @hookimpl
    async def lu_preserve(self, ctx: StepContext) -> None:
        for vm in _vms(ctx):
            number = find_ram_fd(vm)
            path = f"/proc/{vm.pid}/fd/{number}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise VmError(
                    vm.name, f"cannot open its RAM at {path}: {exc.strerror}"
                ) from exc
            try:
                await ctx.preserve(vm.name, fd)
            finally:
                os.close(fd)

    @hookimpl
    async def lu_freeze(self, ctx: StepContext) -> None:
        """Stop every VM and save its device state; every VM or none."""
        vms = _vms(ctx)
        for vm in vms:
            if not running(vm.pid):
                raise VmError(vm.name, f"QEMU (pid {vm.pid}) died before the freeze")
        state_dir = ctx.state_dir / "qemu"
        state_dir.mkdir(parents=True, exist_ok=True)
        frozen: dict[str, Any] = {}
        stopped: list[VmInfo] = []
        try:
            for vm in vms:
                stopped.append(vm)
                frozen[vm.name] = await self._freeze_one(ctx, vm, state_dir)
        except BaseException:
            with anyio.move_on_after(_qmp_timeout(ctx) * 2, shield=True):
                for vm in stopped:
                    try:
                        async with open_qmp(vm.qmp) as qmp:
                            await _resume(qmp, vm.name)
                    except (QmpError, VmError) as exc:
                        ctx.log.error("VM %s: cannot resume it: %s", vm.name, exc)
            raise
        ctx.record("frozen", frozen)

    async def _freeze_one(
        self, ctx: StepContext, vm: VmInfo, state_dir: Path
    ) -> dict[str, Any]:
        path = state_dir / f"{vm.name}.state"
        cpr = bool(next(e["cpr"] for e in ctx.recorded("vms") if e["name"] == vm.name))
        async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
            stop_wall = time.time()
            await qmp.execute("stop")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
            try:
                if cpr:
                    await qmp.execute("migrate", {"uri": f"file:{path}"})
                else:
                    # The fd travels over the QMP socket: no shell, no helper process.
                    await qmp.execute("getfd", {"fdname": STATE_FD_NAME}, fds=[fd])
                    await qmp.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
                done = await _wait_migration(qmp, vm.name, _migrate_timeout(ctx))
                await anyio.to_thread.run_sync(os.fsync, fd)  # the kexec won't sync
            finally:
                os.close(fd)
            probe = {
                str(a): (await read_words(qmp, a))[0]
                for a in _probes(ctx) or ctx.recorded("probe", [])
            }
            saved_wall = time.time()
        size = path.stat().st_size
        ctx.log.info(
            "VM %s stopped; %d bytes of device state saved in %.3f s",
            vm.name,
            size,
            saved_wall - stop_wall,
        )
        frozen = {
            "stop_wall": stop_wall,
            "save_s": saved_wall - stop_wall,
            "state_file": str(path),
            "state_bytes": size,
            "ram_transferred": done.get("ram", {}).get("transferred"),
            "probe": probe,
        }
        # For the restore path, which reads no journal: fsync'ed, as the
        # state file (the kexec syncs nothing).
        record = {"name": vm.name, "spec": vm.to_json()["spec"], "cpr": cpr, **frozen}
        await anyio.to_thread.run_sync(
            _write_durably, frozen_path(ctx.state_dir, vm.name), record
        )
        restored_path(_registry(ctx), vm.name).unlink(missing_ok=True)
        return frozen

    @hookimpl
    async def lu_freeze_rollback(self, ctx: StepContext) -> None:
        for vm in _vms(ctx):
            async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
                await _resume(qmp, vm.name)

    def lu_restore_plan(self, ctx: StepContext) -> list[dict[str, Any]]:
        """The restore, resolved before the kexec: one ``python -m
        orchestrator.vmm.restore`` per VM, which the restore path runs side by
        side before the engine is loaded; each exits once its VM runs."""
        registry = _registry(ctx)
        return [
            {
                "key": vm.name,
                "entry": ctx.preserved(vm.name),
                "argv": [
                    sys.executable,
                    "-m",
                    "orchestrator.vmm.restore",
                    "--registry",
                    str(registry.absolute()),
                    "--frozen",
                    str(frozen_path(ctx.state_dir, vm.name).absolute()),
                    "--qmp-timeout",
                    str(_qmp_timeout(ctx)),
                    "--migrate-timeout",
                    str(_migrate_timeout(ctx)),
                ],
                "fd_arg": "--ram-fd",
                "wait": "exit",
                "published": str(restored_path(registry.absolute(), vm.name)),
                "env": {"LIVEUPDATE_KERNEL": ctx.kernel.spec},
                "log": str(registry.absolute() / f"{vm.name}.restore.log"),
            }
            for vm in _vms(ctx)
        ]

    @hookimpl
    async def lu_restore(self, ctx: StepContext) -> None:
        """Every VM runs again on its preserved RAM: adopted if the restore
        path already brought it back, else started, loaded and resumed here."""
        registry = _registry(ctx)
        frozen = ctx.recorded("frozen", {})
        restored, blackouts = [], {}
        for entry in ctx.recorded("vms", []):
            vm = VmInfo.from_json(entry)
            saved = frozen[vm.name]
            with await ctx.retrieve(vm.name) as ram:
                new = await self._adopt(ctx, registry, vm, ram.fileno())
                if new is None:
                    _end_earlier_attempt(registry, vm)
                    record = {"name": vm.name, "spec": entry["spec"], **saved}
                    new = await restore_vm(
                        registry,
                        {**record, "cpr": bool(entry["cpr"])},
                        ram.fileno(),
                        ctx.kernel.spec,
                        qmp_timeout=_qmp_timeout(ctx),
                        migrate_timeout=_migrate_timeout(ctx),
                    )
                done = restored_vm(registry, vm.name, ram.fileno()) or {}
            blackout = float(done.get("cont_wall", time.time())) - saved["stop_wall"]
            blackouts[vm.name] = round(blackout, 6)
            restored.append(new.to_json())
            ctx.log.info("VM %s runs again; blackout %.3f s", vm.name, blackout)
        ctx.record("restored", restored)
        ctx.record("vm_blackout_s", blackouts)
        ctx.record("blackout_s", max(blackouts.values(), default=0.0))

    async def _adopt(
        self, ctx: StepContext, registry: Path, vm: VmInfo, ram_fd: int
    ) -> VmInfo | None:
        """The VM the restore path (or an earlier attempt) brought back on
        this very RAM, or None if no QEMU resumed it.

        A guest that ran again is never started a second time from its saved
        state (its RAM has moved on): if that QEMU cannot be adopted, this
        fails instead, and the keeper keeps the RAM.
        """
        done = restored_vm(registry, vm.name, ram_fd)
        if done is None:
            return None
        new = next(
            (v for v in registered_vms(registry) if v.pid == int(done["pid"])), None
        )
        if new is None:
            raise VmError(
                vm.name,
                f"QEMU pid {done['pid']} resumed it after the kexec but is not in "
                f"the registry {registry}",
            )
        async with open_qmp(new.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
            now = await _status(qmp)
        if now != "running":
            raise VmError(
                vm.name,
                f"QEMU pid {new.pid} resumed it after the kexec and is {now!r} now; "
                "not starting it a second time",
            )
        return new

    @hookimpl
    async def lu_finish(self, ctx: StepContext) -> None:
        for entry in ctx.recorded("restored", []):
            vm = VmInfo.from_json(entry)
            async with open_qmp(vm.qmp, command_timeout=_qmp_timeout(ctx)) as qmp:
                status = await _status(qmp)
                if status != "running":
                    raise VmError(vm.name, f"is {status!r} after the update")
                cpr = bool(
                    next(e["cpr"] for e in ctx.recorded("vms") if e["name"] == vm.name)
                )
                await set_migration(qmp, False, cpr)
        for saved in ctx.recorded("frozen", {}).values():
            await anyio.Path(saved["state_file"]).unlink(missing_ok=True)
