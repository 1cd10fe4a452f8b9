"""Guest side of the ``systemd`` scenario: systemd 262 is PID 1 (runs inside the VM).

The stages run as ``luo-vm-stage.service`` (:mod:`tests.vm.rootfs`), a service
of the harness's, once the boot's other jobs are done.

``python -m tests.vm.systemd_guest pre [--mib M]``
    installs and enables the project's units by running the steps of
    ``docs/deploy.md`` ("Steps") as written -- the ``sh`` blocks, read from the
    document, each with ``sh -e`` -- except the two lines of step 1 that the
    root's build did already (the venv and the ``pip install``: the guest has
    no network), and with ``next_kernel`` of the installed playbook edited to
    the harness's kernel (the step the document leaves to the operator). Then
    a workload fills a memfd of M MiB, hands it to the agent (``liveupdate
    handover register``) and closes its own copy; the agent must have parked
    it in its fd store. ``liveupdate run /etc/liveupdate/playbook.yaml`` goes
    through the agent's control socket; the agent kexecs.
``python -m tests.vm.systemd_guest mid [--mib M]``
    after the boot's jobs: what systemd says of both units, ``liveupdate
    status --json``, the agent's registrations, the bytes the workload
    reclaims (SHA-256 against the one taken before the kexec), the units'
    journal. Then the second update: a service that keeps a memfd the
    systemd way (:mod:`tests.vm.fdkeep_service`, ``FileDescriptorStorePreserve=yes``)
    starts, a second workload registers, and the playbook's
    ``next_kernel.via`` becomes ``systemd``: the agent parks its sessions in
    its fd store and hands the kexec to ``systemctl kexec``.
``python -m tests.vm.systemd_guest post``
    the same checks for the second workload, and: the service's memfd came
    back byte-exact (systemd's own session), the agent's session came back
    through its fd store (adopted by the keeper), both updates' blackouts.

Both write ``$LUO_VM_OUT/systemd-<stage>.json`` and exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.vm.guest import mark, write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"
PLAYBOOK = Path("/etc/liveupdate/playbook.yaml")
STATE_DIR = "/var/lib/liveupdate"
AGENT_UNIT = "liveupdate-agent.service"
RESUME_UNIT = "liveupdate-resume.service"
WORKLOAD = "wl-systemd"
WORKLOAD_2 = "wl-systemd-2"
#: The service that keeps its state the systemd way (:mod:`tests.vm.fdkeep_service`).
FDKEEP_UNIT = "luo-vm-fdkeep.service"
FDKEEP_DIR = "/var/lib/luo-vm-fdkeep"
FDKEEP_MIB = 8
#: Lines of step 1 the root's build has done (tests/vm/rootfs.py): the guest
#: has no network to install from.
DONE_BY_THE_ROOT = (re.compile(r"^python3 -m venv "), re.compile(r"/pip install "))
OUT = Path(os.environ.get("LUO_VM_OUT", "/run/luo-vm/out"))


def say(msg: str) -> None:
    print(f"systemd guest: {msg}", flush=True)


def sh(argv: list[str], *, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=timeout
    )


def wait_booted(timeout: float = 600.0) -> str:
    """What ``systemctl is-system-running --wait`` says once the boot is done."""
    done = sh(["systemctl", "is-system-running", "--wait"], timeout=timeout)
    return done.stdout.strip()


def unit_show(unit: str, *props: str) -> dict[str, str]:
    done = sh(["systemctl", "show", unit, *(f"--property={p}" for p in props)])
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def deploy_steps(doc: Path = DEPLOY_DOC) -> list[str]:
    """The ``sh`` blocks of the document's "Steps" section, in order."""
    text = doc.read_text()
    section = text.split("\n## Steps\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def runnable(block: str) -> str:
    """*block* without the lines the root's build did already."""
    return "".join(
        line
        for line in block.splitlines(keepends=True)
        if not any(rx.search(line) for rx in DONE_BY_THE_ROOT)
    )


def run_block(n: int, block: str, log: list[dict[str, Any]]) -> bool:
    script = runnable(block)
    done = sh(["sh", "-e", "-x", "-c", script])
    say(f"deploy step block {n}: exit {done.returncode}")
    print(done.stdout + done.stderr, flush=True)
    log.append({"block": n, "rc": done.returncode, "output": done.stdout + done.stderr})
    return done.returncode == 0


def edit_next_kernel(path: Path) -> dict[str, Any]:
    """What the operator edits: the kernel to kexec into and its command line."""
    book = yaml.safe_load(path.read_text())
    book["next_kernel"] = {
        "image": os.environ["LUO_VM_KERNEL"],
        "initrd": None,
        "cmdline": os.environ["LUO_VM_NEXT_CMDLINE"],
    }
    path.write_text(yaml.safe_dump(book, sort_keys=False))
    return dict(book["next_kernel"])


def pattern(mib: int) -> bytes:
    """Bytes no page of which equals another (its index in every 4 KiB page)."""
    page = 4096
    return b"".join(
        (i.to_bytes(8, "little") * (page // 8)) for i in range((mib << 20) // page)
    )


def root_fstype() -> str:
    """The type of the file system mounted on ``/`` (the last such mount)."""
    found = ""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "/":
                found = fields[2]
    return found


def journal(*units: str) -> str:
    argv = ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"]
    for unit in units:
        argv += ["-u", unit]
    return sh(argv).stdout


def stage_pre(mib: int) -> int:
    info: dict[str, Any] = {"stage": "pre", "ok": False}
    info["boot_state"] = wait_booted()
    mark("systemd.booted", state=info["boot_state"])
    info["pid1"] = Path("/proc/1/comm").read_text().strip()
    info["root"] = root_fstype()
    info["systemd"] = sh(["systemctl", "--version"]).stdout.splitlines()[0]
    info["python"] = sys.version.split()[0]
    say(f"PID 1 {info['pid1']!r}, {info['systemd']}, state {info['boot_state']}")

    steps: list[dict[str, Any]] = []
    info["deploy"] = steps
    blocks = deploy_steps()
    ok = True
    for n, block in enumerate(blocks, 1):
        ok = run_block(n, block, steps)
        if not ok:
            break
        if PLAYBOOK.exists() and "next_kernel" not in info:
            info["next_kernel"] = edit_next_kernel(PLAYBOOK)
    info["deploy_ok"] = ok and len(steps) == len(blocks)
    mark("systemd.deployed", ok=info["deploy_ok"])
    info["agent"] = unit_show(AGENT_UNIT, "ActiveState", "NFileDescriptorStore")
    info["resume_enabled"] = sh(["systemctl", "is-enabled", RESUME_UNIT]).stdout.strip()

    done = register(WORKLOAD, mib, info)
    info["stored_after_register"] = unit_show(AGENT_UNIT, "NFileDescriptorStore").get(
        "NFileDescriptorStore"
    )
    info["ok"] = (
        info["pid1"] == "systemd"
        and info["root"] == "overlay"
        and info["deploy_ok"]
        and info["agent"].get("ActiveState") == "active"
        and info["resume_enabled"] == "enabled"
        and done.returncode == 0
        and info["stored_after_register"] == "1"
    )
    (OUT / "journal-pre.txt").write_text(journal(AGENT_UNIT))
    write_json(OUT / "systemd-pre.json", info)
    say(f"pre: {json.dumps({k: v for k, v in info.items() if k != 'deploy'})}")
    if not info["ok"]:
        return 1
    os.sync()
    mark("systemd.run")
    run = subprocess.run(["liveupdate", "run", str(PLAYBOOK)], check=False)
    # Only reached when the update ended without a kexec.
    info["run_rc"] = run.returncode
    info["ok"] = False
    write_json(OUT / "systemd-pre.json", info)
    (OUT / "journal-pre.txt").write_text(journal(AGENT_UNIT))
    return 1


def register(
    name: str, mib: int, info: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """A workload: a memfd of its own, handed to the agent, its copy closed."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    data = pattern(mib)
    os.write(fd, data)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    info["size"] = len(data)
    done = subprocess.run(
        ["liveupdate", "handover", "register", name, "--fd", str(fd)],
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        check=False,
    )
    os.close(fd)
    info["register"] = {"rc": done.returncode, "out": done.stdout + done.stderr}
    return done


def reclaim(name: str) -> tuple[str | None, int, str]:
    """SHA-256 and size of what the agent hands back under *name*."""
    from orchestrator.agent_client import AgentClient, AgentError

    try:
        with AgentClient() as agent:
            fd = agent.reclaim(name)
    except AgentError as exc:
        return None, 0, str(exc)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            h.update(chunk)
            offset += len(chunk)
        return h.hexdigest(), size, ""
    finally:
        os.close(fd)


def restored(info: dict[str, Any], workload: str, before: dict[str, Any]) -> bool:
    """Check, after a kexec, that systemd and the agent brought *workload* back.

    *before* is the stage's report from before the kexec (its ``sha256`` and
    ``size``); the findings and ``checks`` go into *info*.
    """
    t0 = time.monotonic()
    info["boot_state"] = wait_booted()
    info["booted_after_s"] = round(time.monotonic() - t0, 1)
    mark("systemd.booted", state=info["boot_state"])
    info["resume"] = unit_show(
        RESUME_UNIT, "ActiveState", "Result", "ExecMainStatus", "ConditionResult"
    )
    info["agent"] = unit_show(
        AGENT_UNIT, "ActiveState", "Result", "NRestarts", "NFileDescriptorStore"
    )
    status = sh(["liveupdate", "status", "--state-dir", STATE_DIR, "--json"])
    try:
        info["status"] = json.loads(status.stdout)
    except ValueError:
        info["status"] = {"rc": status.returncode, "out": status.stdout + status.stderr}
    listed = sh(["liveupdate", "handover", "list", "--json"])
    try:
        info["registrations"] = json.loads(listed.stdout)
    except ValueError:
        info["registrations"] = listed.stdout + listed.stderr
    sha, size, error = reclaim(workload)
    info["reclaimed"] = {"sha256": sha, "size": size, "error": error}
    info["sha256_before"] = before.get("sha256")
    info["stored_after_reclaim"] = unit_show(AGENT_UNIT, "NFileDescriptorStore").get(
        "NFileDescriptorStore"
    )
    units_log = journal(RESUME_UNIT, AGENT_UNIT)
    (OUT / f"journal-{info['stage']}.txt").write_text(units_log)
    info["journal"] = {
        "resume_left_it_to_the_agent": "belongs to the agent" in units_log,
        "agent_resumed_it": bool(
            re.search(r"resumed the interrupted update \S+: completed", units_log)
        ),
    }
    st = info["status"]
    regs = info["registrations"] if isinstance(info["registrations"], list) else []
    info["checks"] = checks = {
        "root is the overlay on the disk": root_fstype() == "overlay",
        "resume unit succeeded": info["resume"].get("Result") == "success"
        and info["resume"].get("ConditionResult") == "yes",
        "agent active, never restarted": info["agent"].get("ActiveState") == "active"
        and info["agent"].get("NRestarts") == "0",
        "status NORMAL / completed": st.get("state") == "NORMAL"
        and st.get("outcome") == "completed",
        "registration restored": any(
            r.get("name") == workload and r.get("state") == "restored" for r in regs
        ),
        "bytes back": sha is not None and sha == before.get("sha256"),
        "size back": size == before.get("size"),
        "fd store empty after reclaim": info["stored_after_reclaim"] == "0",
        **{f"journal: {k}": v for k, v in info["journal"].items()},
    }
    return all(checks.values())


def _report(info: dict[str, Any]) -> int:
    write_json(OUT / f"systemd-{info['stage']}.json", info)
    for name, passed in info.get("checks", {}).items():
        say(f"{'ok  ' if passed else 'FAIL'} {name}")
    return 0 if info["ok"] else 1


def start_fdkeep(mib: int) -> dict[str, Any]:
    """Install and start the service that keeps a memfd the systemd way."""
    Path(f"/etc/systemd/system/{FDKEEP_UNIT}").write_text(
        "[Unit]\nDescription=A service whose state systemd keeps across kexec\n\n"
        "[Service]\nType=notify\n"
        f"ExecStart=/usr/bin/python3 {REPO_ROOT}/tests/vm/fdkeep_service.py "
        f"{FDKEEP_DIR} {mib}\n"
        "FileDescriptorStoreMax=4\nFileDescriptorStorePreserve=yes\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    sh(["systemctl", "daemon-reload"])
    started = sh(["systemctl", "enable", "--now", FDKEEP_UNIT])
    stored = Path(FDKEEP_DIR, "stored.json")
    return {
        "rc": started.returncode,
        "out": started.stdout + started.stderr,
        "stored": json.loads(stored.read_text()) if stored.exists() else None,
        "unit": unit_show(FDKEEP_UNIT, "ActiveState", "NFileDescriptorStore"),
    }


def journal_records() -> list[dict[str, Any]]:
    path = Path(STATE_DIR, "journal.jsonl")
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def kill_mid_update() -> dict[str, Any]:
    """Start an update that hangs after PRESERVE, SIGKILL the agent there;
    systemd restarts it, and it must cancel that update with nothing lost."""
    hang = PLAYBOOK.with_name("hangs.yaml")
    book = yaml.safe_load(PLAYBOOK.read_text())
    book["phases"]["prepare"]["steps"].append(
        {"plugin": "faults", "with": {"hang": 600}}
    )
    hang.write_text(yaml.safe_dump(book, sort_keys=False))
    out: dict[str, Any] = {}
    run = subprocess.Popen(
        ["liveupdate", "run", str(hang)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not any(
        r.get("event") == "step_start" and r.get("plugin") == "faults"
        for r in journal_records()
    ):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out["stored_before_kill"] = unit_show(AGENT_UNIT, "NFileDescriptorStore")
    sh(["systemctl", "kill", "--signal=SIGKILL", AGENT_UNIT])
    run.wait(timeout=300)
    # Type=notify: active again once the restarted agent serves.
    deadline = time.monotonic() + 300
    while unit_show(AGENT_UNIT, "NRestarts").get("NRestarts") == "0":
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    sh(["systemctl", "start", AGENT_UNIT], timeout=600)  # waits for READY=1
    out["agent_after"] = unit_show(
        AGENT_UNIT, "ActiveState", "NRestarts", "NFileDescriptorStore"
    )
    status = sh(["liveupdate", "status", "--state-dir", STATE_DIR, "--json"])
    st = json.loads(status.stdout) if status.returncode == 0 else {}
    out["status"] = {k: st.get(k) for k in ("state", "outcome", "error")}
    listed = sh(["liveupdate", "handover", "list", "--json"])
    regs = json.loads(listed.stdout) if listed.returncode == 0 else []
    out["checks"] = {
        "killed mid-update: the store held the registration and the session": out[
            "stored_before_kill"
        ].get("NFileDescriptorStore")
        == "2",
        "killed mid-update: systemd restarted the agent": out["agent_after"].get(
            "ActiveState"
        )
        == "active"
        and out["agent_after"].get("NRestarts") == "1",
        "killed mid-update: the update was cancelled": (
            st.get("state"),
            st.get("outcome"),
        )
        == ("NORMAL", "cancelled"),
        "killed mid-update: the session released, the registration kept": out[
            "agent_after"
        ].get("NFileDescriptorStore")
        == "1"
        and [r.get("name") for r in regs] == [WORKLOAD_2],
    }
    return out


def stage_mid(mib: int) -> int:
    """Boot 2: check the first update; then a second one, through systemd."""
    info: dict[str, Any] = {"stage": "mid", "ok": False}
    pre = json.loads((OUT / "systemd-pre.json").read_text())
    info["ok"] = restored(info, WORKLOAD, pre)
    if not info["ok"]:
        return _report(info)
    second: dict[str, Any] = {}
    done = register(WORKLOAD_2, mib, second)
    info["second"] = second
    info["checks"]["second workload registered"] = done.returncode == 0
    # An update whose agent is killed between PRESERVE and the kexec.
    info["killed"] = killed = kill_mid_update()
    info["checks"].update(killed["checks"])
    # The second update: systemd's own live update beside the project's.
    info["fdkeep"] = fdkeep = start_fdkeep(FDKEEP_MIB)
    book = yaml.safe_load(PLAYBOOK.read_text())
    book["next_kernel"] = {
        "image": os.environ["LUO_VM_KERNEL"],
        "cmdline": os.environ["LUO_VM_NEXT_CMDLINE"],
        "via": "systemd",
    }
    # The systemd plugin checks fdkeep's store will be kept, and waits for it.
    services = {"plugin": "systemd", "with": {"services": [FDKEEP_UNIT]}}
    for phase in ("quiesce", "restore"):
        book["phases"].setdefault(phase, {"steps": []})["steps"].append(services)
    PLAYBOOK.write_text(yaml.safe_dump(book, sort_keys=False))
    info["checks"]["fdkeep stored its memfd"] = (
        fdkeep["stored"] is not None
        and fdkeep["unit"].get("NFileDescriptorStore") == "1"
    )
    info["ok"] = all(info["checks"].values())
    if _report(info):
        return 1
    os.sync()
    mark("systemd.run", via="systemd")
    run = subprocess.run(["liveupdate", "run", str(PLAYBOOK)], check=False)
    # Reached when the agent handed the kexec to systemd (the CLI's wait for the
    # agent ends with the shutdown) or when the update ended without one.
    info["run_rc"] = run.returncode
    write_json(OUT / "systemd-mid.json", info)
    time.sleep(600)  # the shutdown ends this
    return 1


def stage_post() -> int:
    """Boot 3: the second update, and the memfd systemd kept for its service."""
    info: dict[str, Any] = {"stage": "post", "ok": False}
    mid = json.loads((OUT / "systemd-mid.json").read_text())
    ok = restored(info, WORKLOAD_2, mid["second"])
    found_path = Path(FDKEEP_DIR, "found.json")
    found = json.loads(found_path.read_text()) if found_path.exists() else None
    info["fdkeep"] = {
        "found": found,
        "unit": unit_show(FDKEEP_UNIT, "ActiveState", "NFileDescriptorStore"),
    }
    stored = (mid.get("fdkeep") or {}).get("stored") or {}
    records = [
        json.loads(line)
        for line in Path(STATE_DIR, "journal.jsonl").read_text().splitlines()
        if line.strip()
    ]
    adopted = [r.get("session") for r in records if r.get("action") == "adopt"]
    kexecs = [r.get("via") for r in records if r.get("event") == "kexec"]
    plugin = [
        (r.get("phase"), r.get("ok"), (r.get("records") or {}).get("stores"))
        for r in records
        if r.get("event") == "step_end" and r.get("plugin") == "systemd"
    ]
    info["systemd_plugin"] = plugin
    info["adopted"], info["kexec_via"] = adopted, kexecs
    info["blackouts"] = {
        via: {k: (st or {}).get(k) for k in ("blackout_s", "blackout_wall_s")}
        for via, st in (("syscall", mid.get("status")), ("systemd", info["status"]))
    }
    info["checks"].update(
        {
            "fdkeep's memfd back, byte-exact": found is not None
            and found.get("sha256") == stored.get("sha256")
            and found.get("size") == stored.get("size"),
            "second kexec went through systemd": kexecs[-1:] == ["systemd"],
            "systemd plugin: fdkeep's store counted, then back": plugin[-2:]
            == [
                ("quiesce", True, {FDKEEP_UNIT: 1}),
                ("restore", True, {FDKEEP_UNIT: 1}),
            ],
            "the agent's session came back through its fd store": bool(adopted),
        }
    )
    info["ok"] = ok and all(info["checks"].values())
    return _report(info)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="systemd_guest")
    p.add_argument("stage", choices=("pre", "mid", "post"))
    p.add_argument("--mib", type=int, default=32)
    args = p.parse_args(argv)
    if args.stage == "pre":
        return stage_pre(args.mib)
    if args.stage == "mid":
        return stage_mid(args.mib)
    return stage_post()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
