"""Scenario ``systemd``: the project's units under systemd 262 as PID 1, a real kexec.

The guest's root is the sid tree (:mod:`tests.vm.rootfs`) as an overlay: the
read-only 9p tree below, an ext4 disk made for the run above (``vda``, the
upper layer: what the guest writes -- the installed units, ``/etc/liveupdate``,
``/var/lib/liveupdate`` -- survives the kexec as on a host's disk). The shim
execs ``/lib/systemd/systemd``; systemd starts the harness's stage runner
(``luo-vm-stage.service``, pulled in with ``systemd.wants=``) once the boot's
other jobs are done.

Stage ``pre`` (:mod:`tests.vm.systemd_guest`) installs and enables the units
by docs/deploy.md's steps, a workload hands a memfd to the agent, and
``liveupdate run`` goes through the agent, which kexecs. Stage ``mid`` runs
after systemd brought the new kernel up: the resume unit, then the agent, must
have restored the update (one owner of the restore at boot: the agent), the
workload reclaims its bytes, ``liveupdate status`` says completed. Then a
second update, with ``next_kernel.via: systemd`` (``systemctl kexec``), beside
a service whose memfd systemd itself keeps (``FileDescriptorStorePreserve=yes``);
stage ``post`` checks both came back.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tests.vm.harness import Scenario, Stage, run_scenario
from tests.vm.report import liveupdate_numbers, section
from tests.vm.rootfs import GUEST_PYTHON, RootfsBuildError, ensure_rootfs, precompile

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import GuestRoot, Result
    from tests.vm.kernel import Kernel

SYSTEMD_MIB = 32
#: Units of the sid root that neither the project's units nor the stages use,
#: masked for time (under TCG every process costs ~0.5 s): logins, sshd, udev
#: (the device nodes come from devtmpfs; nothing here waits for a device),
#: D-Bus and logind (systemctl talks to PID 1 on its private socket), the
#: modprobe units (minbase has no modprobe; they fail anyway) and the module
#: loader (the test kernel has no modules), the random seed, the remount of
#: the root (nothing in fstab: the shim mounted it), and the journal's flush
#: to /var (it stays in /run: each stage saves the units' journal to the out
#: dir; flushing it after the kexec, a journal closed uncleanly, took 11 s).
MASKED = (
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "ssh.service",
    "ssh.socket",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udevd-kernel.socket",
    "systemd-udevd-control.socket",
    "systemd-udevd-varlink.socket",
    "dbus.service",
    "dbus.socket",
    "systemd-logind.service",
    "systemd-logind-varlink.socket",
    "modprobe@configfs.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "systemd-modules-load.service",
    "systemd-random-seed.service",
    "systemd-remount-fs.service",
    "systemd-journal-flush.service",
)
#: PID 1 and what it is told: no first-boot questions on the console, the
#: harness's stage runner, and what is masked.
SYSTEMD_ARGS = (
    "luovm.overlay=vda",
    "systemd.firstboot=off",
    "systemd.wants=luo-vm-stage.service",
    *(f"systemd.mask={unit}" for unit in MASKED),
)


def systemd_scenario(root: GuestRoot, mib: int = SYSTEMD_MIB) -> Scenario:
    def stage(name: str, *args: str) -> Stage:
        return Stage(name, (GUEST_PYTHON, "-m", "tests.vm.systemd_guest", name, *args))

    return dataclasses.replace(
        Scenario(
            "systemd",
            stages=(
                stage("pre", "--mib", str(mib)),
                stage("mid", "--mib", str(mib)),
                stage("post"),
            ),
            timeout=900.0,
            kernel_args=SYSTEMD_ARGS,
            disk_mib=1024,
        ),
        root=dataclasses.replace(root, exec_init=("/lib/systemd/systemd",)),
    )


def report(result: Result) -> list[str]:
    failures = list(result.failures())
    section("systemd: boot 1 (install, register, run)")
    pre = result.read_json("systemd-pre.json")
    if pre is None:
        failures.append("no systemd-pre.json: stage pre did not report")
    else:
        for key in ("pid1", "root", "systemd", "boot_state", "deploy_ok", "agent"):
            print(f"  {key:22} {pre.get(key)}")
        for key in ("resume_enabled", "register", "stored_after_register"):
            print(f"  {key:22} {pre.get(key)}")
        if not pre.get("ok"):
            failures.append("boot 1: the units were not installed and running")
    for boot, stage, title in (
        (2, "mid", "systemd brings it back; the second update, via systemctl kexec"),
        (3, "post", "systemd brings both back: the agent's sessions and fdkeep's"),
    ):
        section(f"systemd: boot {boot} ({title})")
        info = result.read_json(f"systemd-{stage}.json")
        if info is None:
            failures.append(f"no systemd-{stage}.json: stage {stage} did not report")
            continue
        for key in ("boot_state", "resume", "agent", "reclaimed", "fdkeep"):
            print(f"  {key:22} {info.get(key)}")
        for key in ("killed", "adopted", "kexec_via", "systemd_plugin", "blackouts"):
            if key in info:
                print(f"  {key:22} {info.get(key)}")
        status = info.get("status")
        if isinstance(status, dict):
            summary = {
                k: status.get(k)
                for k in ("state", "outcome", "blackout_s", "blackout_wall_s")
            }
            print(f"  {'status':22} {summary}")
        checks = info.get("checks")
        for name, ok in (checks or {}).items() if isinstance(checks, dict) else ():
            print(f"  {'ok  ' if ok else 'FAIL'} {name}")
            if not ok:
                failures.append(f"boot {boot}: {name}")
        if not info.get("ok") and not checks:
            failures.append(f"boot {boot}: the update was not brought back")
    numbers = liveupdate_numbers(result)
    if not numbers:
        failures.append("no 'liveupdate number: N' line in the new kernel's log")
    print(
        f"  liveupdate number(s) {numbers}; {result.boots()} boot(s); "
        f"QEMU {result.elapsed:.1f} s wall"
    )
    return failures


def run_systemd(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    section("systemd: guest root")
    try:
        rootfs = ensure_rootfs()
    except RootfsBuildError as exc:
        return [f"the sid root could not be built: {exc}"]
    print(f"root        {rootfs.path} ({'built now' if rootfs.built else 'cached'})")
    precompile(rootfs)
    result = run_scenario(
        systemd_scenario(rootfs.guest_root()),
        kernel,
        echo=not args.quiet,
        accel=args.accel,
    )
    return report(result)
