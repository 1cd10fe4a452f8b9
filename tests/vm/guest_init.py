"""PID 1 of the test VM.

The kernel starts it as ``init=<venv python> ... -- <this file>``, with the
host's ``/`` as a read-only 9p root.  It mounts the pseudo filesystems, tmpfs on
/tmp, /run and /dev/shm, the writable 9p share (tag ``luovm.out=``, default
``luo-out``) on ``/run/luo-vm/out``, then runs the stage named by ``luovm.stage=``
on the kernel command line, as described in ``<out>/stages.json`` (written by the
host harness).  The stage's exit status goes to ``<out>/status-<stage>.json`` and
the VM is reset (``reboot(RB_AUTOBOOT)``; QEMU runs with ``-no-reboot`` so it
exits).  A stage that kexecs never comes back here: the next kernel boots with
the command line the host prepared for the next stage.

With ``--service`` it is not PID 1 but a service of systemd's (the sid root's
``luo-vm-stage.service``, see :mod:`tests.vm.rootfs`): systemd has mounted the
pseudo filesystems, so it mounts only the out share, then runs the stage the
same way and resets the VM the same way (``sync`` first: the root's upper
layer is a disk).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_MOUNT = "/run/luo-vm/out"
OUT_TAG_DEFAULT = "luo-out"
RB_AUTOBOOT = 0x01234567
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


def say(msg: str) -> None:
    print(f"luo-vm-init: {msg}", flush=True)


def mount(
    source: str, target: str, fstype: str, flags: int = 0, data: str = ""
) -> None:
    os.makedirs(target, exist_ok=True)
    rc = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode(),
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            return
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f)
    except OSError:
        return False


def setup_mounts(out_tag: str) -> None:
    """Mount everything but /proc (mounted first: the cmdline is read from it)."""
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if not is_mountpoint("/dev"):
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666")
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    # A writable /tmp must not hide a checkout that lives under the host's /tmp
    # (CI clones into a temporary directory): keep the host's /tmp reachable
    # and bind this checkout back into place on top of the tmpfs.
    checkout = os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    under_tmp = checkout.startswith("/tmp/")
    if under_tmp:
        os.makedirs("/run/host-tmp")
        mount("/tmp", "/run/host-tmp", "", MS_BIND)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if under_tmp:
        top = "/" + "/".join(checkout.split("/")[1:3])  # /tmp/<dir>
        os.makedirs(top)
        mount("/run/host-tmp" + top[len("/tmp") :], top, "", MS_BIND)
    mount_out(out_tag)


def ensure_console() -> None:
    try:
        os.fstat(1)
    except OSError:
        fd = os.open("/dev/console", os.O_RDWR)
        for target in (0, 1, 2):
            if fd != target:
                os.dup2(fd, target)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)


def kernel_params() -> dict[str, str]:
    params: dict[str, str] = {}
    with open("/proc/cmdline") as f:
        words = f.read().split()
    for word in words:
        if word == "--":
            break
        key, _, value = word.partition("=")
        params[key] = value
    return params


def reset() -> NoReturn:
    os.sync()
    _libc.reboot(ctypes.c_int(RB_AUTOBOOT))
    # Only reached if reboot() failed: exiting PID 1 panics, panic=-1 resets.
    os._exit(1)


def mount_out(out_tag: str) -> None:
    mount(
        out_tag,
        OUT_MOUNT,
        "9p",
        MS_NOSUID | MS_NODEV,
        "trans=virtio,version=9p2000.L,msize=262144",
    )


def run(guest: ModuleType, t_start: float, *, service: bool = False) -> None:
    if not service:
        # Before this mount, /proc is the *host's* (the root is the host's /
        # over 9p).
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    params = kernel_params()
    stage = params.get("luovm.stage", "")
    out = Path(OUT_MOUNT)
    out_tag = params.get("luovm.out", OUT_TAG_DEFAULT)
    if service:
        if not is_mountpoint(OUT_MOUNT):
            mount_out(out_tag)
    else:
        setup_mounts(out_tag)
    os.environ["LUO_VM_OUT"] = str(out)

    boot = len(list(out.glob("boot-*.json"))) + 1
    os.environ["LUO_VM_BOOT"] = str(boot)
    os.environ["LUO_VM_STAGE"] = stage
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    with open("/proc/cmdline") as f:
        cmdline = f.read().strip()
    guest.write_json(
        out / f"boot-{boot}.json",
        {
            "boot": boot,
            "stage": stage,
            "cmdline": cmdline,
            "init_start_wall": t_start,
            "uptime_at_init": uptime,
        },
    )
    guest.mark("init.start", init_start_wall=t_start, uptime=uptime)

    spec = json.loads((out / "stages.json").read_text())
    stages = {s["name"]: s for s in spec["stages"]}
    if stage not in stages:
        say(f"no stage {stage!r} to run: powering off")
        guest.mark("init.poweroff")
        reset()
    s = stages[stage]
    nxt = s.get("next")
    env = {
        "PATH": spec["path"],
        "HOME": "/tmp",
        "TERM": "linux",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": spec["venv"],
        "LUO_VM_OUT": str(out),
        "LUO_VM_STAGE": stage,
        "LUO_VM_BOOT": str(boot),
        "LUO_VM_KERNEL": spec["kernel"],
        "LUO_VM_NEXT_CMDLINE": spec["cmdlines"].get(nxt or "", spec["cmdlines"][""]),
        **s.get("env", {}),
    }
    argv: list[str] = s["argv"]
    say(f"boot {boot}: stage {stage!r}: {' '.join(argv)}")
    t0 = guest.mark("stage.start", stage_argv=argv)
    try:
        rc = subprocess.run(argv, cwd=spec["cwd"], env=env, check=False).returncode
    except OSError as e:
        say(f"cannot run stage {stage!r}: {e}")
        rc = 127
    t1 = guest.mark("stage.end", rc=rc)
    guest.write_json(
        out / f"status-{stage}.json",
        {"stage": stage, "boot": boot, "rc": rc, "start_wall": t0, "end_wall": t1},
    )
    say(f"stage {stage!r} exited with {rc}; powering off")
    reset()


def main() -> NoReturn:
    t_start = time.time()
    ensure_console()
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests.vm import guest

        run(guest, t_start, service="--service" in sys.argv[1:])
    except BaseException:  # noqa: BLE001 - PID 1 must never just die
        traceback.print_exc()
        try:
            Path(OUT_MOUNT, "init-error.txt").write_text(traceback.format_exc())
        except OSError:
            pass
    reset()


if __name__ == "__main__":
    main()
