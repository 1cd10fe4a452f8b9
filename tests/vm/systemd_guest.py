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
``python -m tests.vm.systemd_guest post``
    after the boot's jobs: what systemd says of both units, ``liveupdate
    status --json``, the agent's registrations, the bytes the workload
    reclaims (SHA-256 against the one taken before the kexec), the units'
    journal; ``$LUO_VM_OUT/systemd-post.json`` has it all and ``ok``.

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

    # The workload: a memfd of its own, handed to the agent, its copy closed.
    fd = os.memfd_create(WORKLOAD, os.MFD_CLOEXEC)
    data = pattern(mib)
    os.write(fd, data)
    info["sha256"] = hashlib.sha256(data).hexdigest()
    info["size"] = len(data)
    done = subprocess.run(
        ["liveupdate", "handover", "register", WORKLOAD, "--fd", str(fd)],
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        check=False,
    )
    os.close(fd)
    info["register"] = {"rc": done.returncode, "out": done.stdout + done.stderr}
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


def stage_post() -> int:
    t0 = time.monotonic()
    info: dict[str, Any] = {"stage": "post", "ok": False}
    info["boot_state"] = wait_booted()
    info["booted_after_s"] = round(time.monotonic() - t0, 1)
    mark("systemd.booted", state=info["boot_state"])
    pre = json.loads((OUT / "systemd-pre.json").read_text())
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
    sha, size, error = reclaim(WORKLOAD)
    info["reclaimed"] = {"sha256": sha, "size": size, "error": error}
    info["sha256_before"] = pre.get("sha256")
    info["stored_after_reclaim"] = unit_show(AGENT_UNIT, "NFileDescriptorStore").get(
        "NFileDescriptorStore"
    )
    units_log = journal(RESUME_UNIT, AGENT_UNIT)
    (OUT / "journal-post.txt").write_text(units_log)
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
            r.get("name") == WORKLOAD and r.get("state") == "restored" for r in regs
        ),
        "bytes back": sha is not None and sha == pre.get("sha256"),
        "size back": size == pre.get("size"),
        "fd store empty after reclaim": info["stored_after_reclaim"] == "0",
        **{f"journal: {k}": v for k, v in info["journal"].items()},
    }
    info["ok"] = all(checks.values())
    write_json(OUT / "systemd-post.json", info)
    for name, passed in checks.items():
        say(f"{'ok  ' if passed else 'FAIL'} {name}")
    return 0 if info["ok"] else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="systemd_guest")
    p.add_argument("stage", choices=("pre", "post"))
    p.add_argument("--mib", type=int, default=32)
    args = p.parse_args(argv)
    if args.stage == "pre":
        return stage_pre(args.mib)
    return stage_post()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
