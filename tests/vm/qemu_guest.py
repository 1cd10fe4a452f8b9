"""Guest side of the ``qemu`` VM scenario: a nested QEMU VM across a real kexec.

``python -m tests.vm.qemu_guest pre --image IMG [--mib M]``
    starts a nested QEMU (TCG inside the TCG guest) on the boot-sector image
    built by the host (``tests/plugins/guest/boot.S``) with
    :func:`orchestrator.vmm.launch_vm`, waits until its counter moves, writes
    a playbook (qemu plugin for quiesce/preserve/freeze/restore/finish, kexec
    plugin for prepare) and runs ``liveupdate run ... --no-agent`` in this
    process (traced): it kexecs, so this returns only if the update failed.
``python -m tests.vm.qemu_guest post``
    *is* ``liveupdate resume PLAYBOOK --kernel real --state-dir STATE``, then
    checks the new QEMU through QMP (pattern intact, counter >= its value at
    the stop and still increasing, the guest did not boot again, status
    running) and writes ``$LUO_VM_OUT/qemu-post.json``.

The VM registry (QMP socket, serial, log) lives on tmpfs (``/run``): the
restore reads the VM's spec from the journal, not from the registry, and a
unix socket on the 9p out share is not a safe bet. The QEMU log is copied to
the out share for the host.
"""

from __future__ import annotations

import os
import sys

from tests.plugins import guest_vm
from tests.plugins.guest_vm import COUNTER, PROBES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

OUT = os.environ.get("LUO_VM_OUT", "/run/luo-vm/out")
STATE = OUT + "/qemu-state"
PLAYBOOK = OUT + "/qemu-playbook.yaml"
REGISTRY = "/run/luo-qemu"
VM = "vm0"

WAIT = 300.0  # TCG in TCG: slow, never asserted
QMP_TIMEOUT = 120.0


def words(qmp_path: str, address: int, count: int = 1) -> list[int]:
    return guest_vm.words(qmp_path, address, count, QMP_TIMEOUT)


def qmp_status(qmp_path: str) -> str:
    return guest_vm.qmp_status(qmp_path, QMP_TIMEOUT)


def wait_counting(qmp_path: str, above: int = 0) -> int:
    return guest_vm.wait_counting(qmp_path, above, WAIT)


def write_playbook(path: str) -> None:
    import json

    qemu_with: dict[str, object] = {
        "registry": REGISTRY,
        "qmp_timeout": 120,
        "migrate_timeout": 300,
    }
    qemu: dict[str, object] = {"plugin": "qemu", "with": qemu_with}
    playbook = {
        "name": "vm-qemu",
        "description": "a nested QEMU VM through a real kexec in the VM harness",
        "kernel": "real",
        "state_dir": STATE,
        "next_kernel": {
            "image": os.environ["LUO_VM_KERNEL"],
            "initrd": None,
            "cmdline": os.environ["LUO_VM_NEXT_CMDLINE"],
        },
        "blackout_budget": "300s",  # TCG inside TCG
        "defaults": {"timeout": "300s", "retry": {"attempts": 1}},
        "phases": {
            "quiesce": {
                "steps": [
                    {"plugin": "qemu", "with": {**qemu_with, "probe": PROBES}},
                ]
            },
            "preserve": {"steps": [qemu]},
            "prepare": {"steps": [{"plugin": "kexec"}]},
            "freeze": {"steps": [qemu]},
            "restore": {"steps": [qemu]},
            "finish": {"steps": [qemu]},
        },
    }
    with open(path, "w") as f:
        f.write("# written by tests.vm.qemu_guest\n")
        json.dump(playbook, f, indent=2)
        f.write("\n")


def _write(name: str, data: object) -> None:
    from pathlib import Path

    from tests.vm.guest import write_json

    write_json(Path(OUT) / name, data)


def _copy_log(tag: str) -> None:
    import shutil

    for suffix in ("log", "serial"):
        src = f"{REGISTRY}/{VM}.{suffix}"
        if os.path.exists(src):
            shutil.copyfile(src, f"{OUT}/qemu-{VM}-{tag}.{suffix}")


def _step_records(journal: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    for rec in journal:
        if (
            rec.get("event") == "step_end"
            and rec.get("phase") == phase
            and rec.get("plugin") == "qemu"
            and rec.get("ok")
        ):
            records: dict[str, Any] = rec.get("records") or {}
            return records
    return None


# --------------------------------------------------------------------------- stages


def stage_pre(image: str, mib: int) -> int:
    import subprocess
    import time
    from pathlib import Path

    from orchestrator.vmm import VmSpec, launch_vm
    from tests.vm.engine_guest import traced_cli
    from tests.vm.guest import mark

    report: dict[str, object] = {"image": image, "mib": mib}
    qemu_v = subprocess.run(
        ["qemu-system-x86_64", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"nested: {qemu_v.stdout.splitlines()[:1]} rc={qemu_v.returncode}")
    report["qemu_version"] = qemu_v.stdout.strip() or qemu_v.stderr.strip()
    mark("qemu.launch")
    t0 = time.monotonic()
    try:
        info = launch_vm(
            Path(REGISTRY),
            VmSpec(name=VM, image=image, ram_mib=mib),
            "real",
            timeout=120,
        )
    except Exception as exc:  # noqa: BLE001 - reported to the host
        _copy_log("pre")
        report["error"] = f"launch_vm: {type(exc).__name__}: {exc}"
        print(report["error"], flush=True)
        _write("qemu-pre.json", report)
        return 1
    report["launch_s"] = time.monotonic() - t0
    report["pid"] = info.pid
    mark("qemu.launched", pid=info.pid)
    try:
        counter = wait_counting(info.qmp)
        report["counting_after_s"] = time.monotonic() - t0
        bad = guest_vm.pattern_damage(info.qmp, QMP_TIMEOUT)
        later = wait_counting(info.qmp, above=counter)
    except Exception as exc:  # noqa: BLE001 - reported to the host
        _copy_log("pre")
        report["error"] = f"nested guest: {type(exc).__name__}: {exc}"
        print(report["error"], flush=True)
        _write("qemu-pre.json", report)
        return 1
    mark("qemu.counting", counter=later)
    print(
        f"nested VM pid {info.pid} counting: {counter:#x} -> {later:#x}; "
        f"pattern {'intact' if not bad else bad}",
        flush=True,
    )
    report.update({"counter": later, "pattern_bad": bad})
    if bad:
        _write("qemu-pre.json", report)
        return 1
    write_playbook(PLAYBOOK)
    _write("qemu-pre.json", report)
    argv = ["run", PLAYBOOK, "--kernel", "real", "--state-dir", STATE, "--no-agent"]
    print(f"liveupdate {' '.join(argv)}", flush=True)
    rc = traced_cli(argv)  # returns only when the update did not reach the kexec
    print(f"liveupdate run returned {rc}: no kexec", flush=True)
    _copy_log("pre")
    return rc or 1


def stage_post() -> int:
    import json
    import time
    from pathlib import Path

    from orchestrator.restore._journal import read_journal
    from orchestrator.vmm import VmInfo, running
    from tests.vm.engine_guest import kmark, status_json, traced_cli
    from tests.vm.guest import mark

    kmark("resume.start")
    argv = ["resume", PLAYBOOK, "--kernel", "real", "--state-dir", STATE]
    rc = traced_cli(argv)
    mark("resume.exited", rc=rc)
    print(f"liveupdate resume exited with {rc}", flush=True)
    _copy_log("post")
    journal = read_journal(STATE)
    status = status_json_at(status_json)
    freeze = _step_records(journal, "freeze") or {}
    restore = _step_records(journal, "restore") or {}
    frozen = (freeze.get("frozen") or {}).get(VM) or {}
    at_stop = (frozen.get("probe") or {}).get(str(COUNTER))
    report: dict[str, Any] = {
        "resume_rc": rc,
        "status": status,
        "frozen": frozen,
        "restore_records": restore,
        "blackout_s": restore.get("blackout_s"),
        "vm_blackout_s": restore.get("vm_blackout_s"),
        "counter_at_stop": at_stop,
        "journal": journal,
    }
    checks: dict[str, bool] = {}
    try:
        info = VmInfo.from_json(json.loads(Path(f"{REGISTRY}/{VM}.json").read_text()))
        checks["new qemu running"] = running(info.pid)
        st = qmp_status(info.qmp)
        report["vm_status"] = st
        checks["status running"] = st == "running"
        bad = guest_vm.pattern_damage(info.qmp, QMP_TIMEOUT)
        report["pattern_bad"] = bad
        checks["pattern intact"] = not bad
        counter, boots = words(info.qmp, COUNTER, 2)
        report.update({"counter_after": counter, "boots": boots})
        checks["did not boot again (boots == 1)"] = boots == 1
        checks["counter >= value at stop"] = (
            isinstance(at_stop, int) and counter >= at_stop
        )
        t0 = time.monotonic()
        later = wait_counting(info.qmp, above=counter)
        report["counter_later"] = later
        report["moved_after_s"] = time.monotonic() - t0
        checks["counter still increasing"] = later > counter
    except Exception as exc:  # noqa: BLE001 - reported to the host
        report["error"] = f"{type(exc).__name__}: {exc}"
        checks["QMP checks ran"] = False
    checks["resume exit 0"] = rc == 0
    checks["status NORMAL/completed"] = (
        status.get("state") == "NORMAL" and status.get("outcome") == "completed"
    )
    checks["blackout_s recorded"] = isinstance(restore.get("blackout_s"), int | float)
    report["checks"] = checks
    report["ok"] = all(checks.values())
    for name, ok in checks.items():
        print(f"  {'OK  ' if ok else 'FAIL'} {name}", flush=True)
    print(
        f"nested VM blackout (stop -> cont): {restore.get('blackout_s')} s; "
        f"counter at stop {at_stop}, after {report.get('counter_after')}",
        flush=True,
    )
    _write("qemu-post.json", report)
    return 0 if report["ok"] else 1


def status_json_at(fn: Any) -> dict[str, Any]:
    """``liveupdate status --json`` for STATE (engine_guest's helper, our dir)."""
    import tests.vm.engine_guest as eg

    eg.STATE = STATE
    data: dict[str, Any] = fn()
    return data


def main(argv: list[str]) -> int:
    if argv[:1] == ["post"]:
        return stage_post()
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.vm.qemu_guest")
    p.add_argument("stage", choices=["pre"])
    p.add_argument("--image", required=True)
    p.add_argument("--mib", type=int, default=32)
    args = p.parse_args(argv)
    return stage_pre(args.image, args.mib)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
