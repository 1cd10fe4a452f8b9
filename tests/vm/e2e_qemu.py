"""Scenario ``qemu``: a nested QEMU VM kept across a real kexec (opt-in).

The host assembles the plugin tests' boot-sector guest
(``tests/plugins/guest/boot.S``: fills RAM with a pattern, then counts) into
the scenario's out share before booting. Inside the LUO guest
(:mod:`tests.vm.qemu_guest`) a nested QEMU (TCG inside TCG) runs it; the
``qemu`` plugin stops it, preserves its guest-RAM memfd through the real
/dev/liveupdate, kexecs, and a new QEMU goes on from where it stopped. The
nested VM's blackout (QMP ``stop`` -> ``cont``) is the restore step's
``blackout_s``.

Run with ``python -m tests.vm.e2e --only qemu`` (not part of the default set).

Scenario ``qemu-sid``: the same on the sid guest root (:mod:`tests.vm.rootfs`),
whose QEMU 11.1 has the migration ``mode`` parameter, so the plugin uses
``cpr-reboot``. Both check that the plugin chose the mode of the QEMU it
found: ``cpr-reboot`` from QEMU 8.2 on, ``x-ignore-shared`` alone before.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.vm.e2e_engine import Timeline
from tests.vm.harness import (
    Scenario,
    Stage,
    new_out_dir,
    python_argv,
    run_scenario,
)
from tests.vm.report import (
    host_t,
    kexec_lines,
    liveupdate_numbers,
    print_timeline,
    section,
)

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import GuestRoot, Result
    from tests.vm.kernel import Kernel

BOOT_S = Path(__file__).resolve().parents[1] / "plugins" / "guest" / "boot.S"
GUEST_OUT = "/run/luo-vm/out"  # == tests.vm.guest_init.OUT_MOUNT
NESTED_MIB = 32
#: The first QEMU with the migration ``mode`` parameter and ``cpr-reboot``.
CPR_REBOOT_SINCE = (8, 2)


def build_boot_image(out: Path) -> Path:
    """Assemble the boot sector into *out*/boot.img (as in tests/plugins)."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed")
    obj = out / "boot.o"
    image = out / "boot.img"
    subprocess.run(
        ["as", "--32", "-o", str(obj), str(BOOT_S)], check=True, capture_output=True
    )
    subprocess.run(
        [
            *("ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary"),
            *("-o", str(image), str(obj)),
        ],
        check=True,
        capture_output=True,
    )
    data = image.read_bytes()
    if len(data) != 512 or data[-2:] != b"\x55\xaa":
        raise RuntimeError(f"{image}: not a 512-byte boot sector")
    return image


def _mode_failures(pre: dict[str, Any] | None, post: dict[str, Any]) -> list[str]:
    """The plugin must have chosen the mode the QEMU it found has: cpr-reboot
    from QEMU 8.2 on, x-ignore-shared alone before."""
    version = qemu_version(str((pre or {}).get("qemu_version") or ""))
    modes = cpr_modes(post.get("journal"))
    if version is None or not modes:
        return [f"qemu: no QEMU version ({version}) or no recorded mode ({modes})"]
    want = version >= CPR_REBOOT_SINCE
    mode = "cpr-reboot" if want else "x-ignore-shared"
    print(f"  migration mode     {mode} (QEMU {version[0]}.{version[1]})")
    if any(m != want for m in modes):
        return [f"qemu: QEMU {version[0]}.{version[1]} should have used {mode}"]
    return []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def qemu_scenario(
    mib: int = NESTED_MIB, timeout: float = 900.0, root: GuestRoot | None = None
) -> Scenario:
    """On the host's root (QEMU 7.2) or, with *root*, on another (sid: QEMU 11)."""

    def python(*args: str) -> tuple[str, ...]:
        return (root.python, *args) if root is not None else python_argv(*args)

    return Scenario(
        "qemu" if root is None else "qemu-sid",
        stages=(
            Stage(
                "pre",
                python(
                    "-m",
                    "tests.vm.qemu_guest",
                    "pre",
                    "--image",
                    f"{GUEST_OUT}/boot.img",
                    "--mib",
                    str(mib),
                ),
            ),
            Stage("post", python("-m", "tests.vm.qemu_guest", "post")),
        ),
        timeout=timeout,
        root=root,
    )


def nested_breakdown(
    result: Result, journal: list[dict[str, Any]], stop_wall: object
) -> float | None:
    """The nested VM's blackout on the host's serial clock; its stop -> cont span."""
    tl = Timeline(result, journal)
    t_stop = host_t(result, 1, stop_wall) if isinstance(stop_wall, float) else None
    t_reboot = tl.mark("lu.reboot_kexec", 1)
    _start, first_new, exec_init = kexec_lines(result, t_reboot or 0.0)
    t_fd = tl.mark("lu.RETRIEVE_FD.1", 2)
    spawns = sorted(t for _, t in tl.marks("lu.spawn.", 2))
    t_spawn = next((t for t in spawns if t_fd is not None and t >= t_fd), None)
    t_cont = tl.journal_t("step_end", phase="restore", plugin="qemu")
    spawned, resumed = (
        "new nested QEMU spawned (-incoming defer)",
        "restore step end: state loaded, probes ok, cont",
    )
    fast = _restore_path_action(result, journal, "qemu")
    if fast is not None:
        # The restore path resumed the VM before the engine was loaded; the
        # restore step only adopted it.
        t_spawn, t_cont = fast
        spawned = "restore path: vmm.restore started"
        resumed = "restore path: state loaded, probes ok, cont (it exited)"
    rows: list[tuple[str, float | None]] = [
        ("nested VM: QMP stop (freeze step, stop_wall)", t_stop),
        ("freeze phase done (journal 'kexec' record)", tl.journal_t("kexec")),
        ("reboot(KEXEC) syscall", t_reboot),
        ("new kernel: first console output", first_new.t if first_new else None),
        ("new kernel: exec init", exec_init.t if exec_init else None),
        ("init running (Python up)", tl.mark("init.start", 2)),
        ("liveupdate resume: Python up", tl.mark("resume.start", 2)),
        ("sessions retrieved", tl.mark("lu.RETRIEVE_SESSION.1.after", 2)),
        ("restore phase start (journal)", tl.journal_t("phase_start", phase="restore")),
        ("RETRIEVE_FD (guest-RAM memfd)", t_fd),
        (spawned, t_spawn),
        (resumed, t_cont),
        ("FINISH done: kernel_finish (journal)", tl.journal_t("kernel_finish")),
    ]
    if fast is not None:  # the restore phase now comes after the VM runs
        rows.sort(key=lambda row: float("inf") if row[1] is None else row[1])
    print_timeline(rows, t_reboot)
    if t_stop is None or t_cont is None:
        return None
    print(f"\n  nested VM blackout stop -> cont, host clock: {t_cont - t_stop:8.3f} s")
    if t_spawn is not None:
        print(
            f"    of which new QEMU start + load + cont:    {t_cont - t_spawn:8.3f} s"
        )
    return t_cont - t_stop


def _restore_path_action(
    result: Result, journal: list[dict[str, Any]], step: str
) -> tuple[float, float] | None:
    """Host times of the restore path's *step* action: started, ready."""
    boot_ids = list(dict.fromkeys(r["boot_id"] for r in journal))
    for rec in journal:
        if rec["event"] != "restore_path" or "begin_mono" not in rec:
            continue
        for action in rec["actions"]:
            if action["step"] == step and action["ready"] is not None:
                boot = boot_ids.index(rec["boot_id"]) + 1
                to_wall = float(rec["begin_wall"]) - float(rec["begin_mono"])
                started = host_t(result, boot, to_wall + float(action["started"]))
                ready = host_t(result, boot, to_wall + float(action["ready"]))
                if started is not None and ready is not None:
                    return started, ready
    return None


def run_qemu(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    return run_nested(qemu_scenario(NESTED_MIB, max(args.timeout, 900.0)), kernel, args)


def run_qemu_sid(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    """The nested VM on the sid root: QEMU 11.1, so the ``cpr-reboot`` mode."""
    from tests.vm.rootfs import RootfsBuildError, ensure_rootfs, precompile

    try:
        rootfs = ensure_rootfs()
    except RootfsBuildError as exc:
        return [f"the sid root could not be built: {exc}"]
    precompile(rootfs)
    scenario = qemu_scenario(
        NESTED_MIB, max(args.timeout, 900.0), root=rootfs.guest_root()
    )
    return run_nested(scenario, kernel, args)


def qemu_version(text: str) -> tuple[int, int] | None:
    """``(11, 1)`` from ``QEMU emulator version 11.1.3 (...)``."""
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cpr_modes(journal: object) -> list[bool]:
    """The ``cpr`` flag of every VM the qemu plugin recorded in the journal."""
    found: list[bool] = []
    if isinstance(journal, dict):
        if "cpr" in journal and "qemu" in journal:
            found.append(bool(journal["cpr"]))
        for value in journal.values():
            found += cpr_modes(value)
    elif isinstance(journal, list):
        for value in journal:
            found += cpr_modes(value)
    return found


def run_nested(
    scenario: Scenario, kernel: Kernel, args: argparse.Namespace
) -> list[str]:
    """Run a nested-VM scenario and check what came back (see the module doc)."""
    out_dir = new_out_dir(scenario)
    build_boot_image(out_dir)
    result = run_scenario(
        scenario, kernel, out_dir=out_dir, echo=not args.quiet, accel=args.accel
    )
    failures = list(result.failures())

    section("qemu: liveupdate number lines")
    if not liveupdate_numbers(result):
        failures.append("no 'liveupdate number' line in the new kernel's log")

    section("qemu: nested VM before the kexec")
    pre = result.read_json("qemu-pre.json")
    if pre is None:
        failures.append("no qemu-pre.json: the pre stage did not report")
    else:
        version = str(pre.get("qemu_version") or "?").splitlines()[0]
        print(f"  nested QEMU        {version}")
        for key in ("pid", "launch_s", "counting_after_s", "counter"):
            print(f"  {key:18} {pre.get(key)}")
        if pre.get("error"):
            failures.append(f"pre: {pre['error']}")

    section("qemu: nested VM after the kexec")
    post = result.read_json("qemu-post.json")
    if post is None:
        failures.append("no qemu-post.json: the post stage did not report")
    else:
        checks = _dict(post.get("checks"))
        for name, ok in checks.items():
            print(f"  {'OK  ' if ok else 'FAIL'} {name}")
            if not ok:
                failures.append(f"qemu post: {name}")
        if post.get("error"):
            failures.append(f"qemu post: {post['error']}")
        frozen = _dict(post.get("frozen"))
        status = _dict(post.get("status"))
        print(
            f"  counter at stop {post.get('counter_at_stop')}, after "
            f"{post.get('counter_after')}, later {post.get('counter_later')}; "
            f"boots {post.get('boots')}; status {post.get('vm_status')}"
        )
        print(
            f"  device state {frozen.get('state_bytes')} bytes, saved in "
            f"{frozen.get('save_s')} s; RAM in the stream "
            f"{frozen.get('ram_transferred')} bytes"
        )
        print(
            f"  liveupdate status: {status.get('state')}/{status.get('outcome')}, "
            f"orchestrator blackout_s {status.get('blackout_s')}"
        )
        print(
            f"  NESTED VM BLACKOUT (QMP stop -> cont, journal restore step "
            f"blackout_s): {post.get('blackout_s')} s"
        )
        if not checks:
            failures.append("qemu post: no checks reported")
        failures += _mode_failures(pre, post)
        section("qemu: nested VM blackout breakdown (host serial clock)")
        journal = post.get("journal")
        nested_breakdown(
            result,
            journal if isinstance(journal, list) else [],
            frozen.get("stop_wall"),
        )

    section("qemu: summary")
    print(f"out dir     {result.out_dir}")
    print(f"qemu        exit {result.qemu_returncode}, {result.elapsed:.1f} s wall")
    print(f"boots       {result.boots()}")
    for name, st in result.statuses.items():
        print(f"stage {name:5} rc={st.rc} (boot {st.boot})")
    return failures
