"""Guest side of the ``blackout`` VM scenario: the floor and the orchestrator
restart the same workloads through real kexecs, in turns, in one VM run.

``python -S -m tests.vm.blackout_guest ACTION[:ROUND] ...`` runs the actions in
order; the last one of a boot kexecs:

``setup``
    start N demo key-value stores (M MiB of data each) and record their SHA-256.
``floor-pre:K``
    the floor client: one session, every store's memfd preserved with raw
    ioctls, the next kernel loaded, the stores paused (SIGSTOP: the blackout
    starts), a record written, reboot(KEXEC).
``floor-post:K``
    RETRIEVE_SESSION, then for each store RETRIEVE_FD and its restart --
    the same command the ``workloads`` plugin resolves (``python -m
    orchestrator.demo.kv ... --detach --memfd N``), started with
    ``os.posix_spawn`` as each fd comes back; the blackout ends when the last
    store has published itself. Then FINISH, and every store's SHA-256.
``orch-pre:K``
    ``liveupdate run`` of the workloads playbook: it kexecs.
``orch-post:K``
    after the boot ran ``liveupdate resume PLAYBOOK --state-dir STATE`` (the
    boot unit's command, as its own process first thing in the stage): check
    the outcome and every store's SHA-256.

Both sides measure the blackout the same way: the old kernel's monotonic
time from just before the stores are paused to just before the reboot
syscall (the engine's ``blackout_start`` and ``kexec`` records), plus the new
kernel's CLOCK_BOOTTIME when the last store runs. Results go to
``$LUO_VM_OUT/floor-K.json`` and ``orch-K.json``.

``-S`` (no site) keeps the floor's start minimal; ``orchestrator.demo`` and
the floor's ioctls are stdlib only, found through the repo root (the cwd).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from tests.vm import floor, guest, kexec

TYPE_CHECKING = False  # no ``typing`` import at run time: the floor starts lean
if TYPE_CHECKING:
    from typing import Any

OUT = Path(os.environ.get("LUO_VM_OUT", "/run/luo-vm/out"))
STATE = OUT / "blackout-state"
PLAYBOOK = OUT / "blackout-playbook.yaml"
REGISTRY = Path("/run/luo-blackout/workloads")  # tmpfs: sockets; rebuilt after a kexec
SESSION = b"floor-blackout"


def _clocks() -> dict[str, float]:
    return {
        "wall": time.time(),
        "mono": time.monotonic(),
        "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
    }


def _workloads() -> list[dict[str, object]]:
    setup = json.loads((OUT / "blackout-setup.json").read_text())
    infos: list[dict[str, object]] = setup["workloads"]
    return infos


def _entry(name: str) -> dict[str, object]:
    info: dict[str, object] = json.loads((REGISTRY / f"{name}.json").read_text())
    return info


def _check_sums() -> dict[str, bool]:
    from orchestrator.demo.kv import ask

    return {
        str(w["name"]): ask(str(_entry(str(w["name"]))["socket"]), "SUM", timeout=600)
        == w["sha256"]
        for w in _workloads()
    }


def setup(count: int, mib: int) -> None:
    from orchestrator.demo import launch, wait_published

    infos = []
    for i in range(count):  # one at a time: see tests.vm.engine_guest
        pid = launch(REGISTRY, f"kv{i}", mib, "real")
        infos.append(dict(wait_published(REGISTRY, f"kv{i}", pid, timeout=600)))
    guest.write_json(OUT / "blackout-setup.json", {"workloads": infos, "mib": mib})
    guest.mark("blackout.setup", count=count, mib=mib)


def floor_pre(k: int) -> None:
    names = [str(w["name"]) for w in _workloads()]
    dev = os.open(floor.DEV, os.O_RDWR)
    session = floor.create_session(dev, SESSION)
    pids = []
    for token, name in enumerate(names, 1):
        info = _entry(name)
        fd = os.open(f"/proc/{info['pid']}/fd/{info['fd']}", os.O_RDWR | os.O_CLOEXEC)
        floor.preserve_fd(session, fd, token)
        pids.append(int(str(info["pid"])))
    kexec.kexec_file_load(
        os.environ["LUO_VM_KERNEL"], os.environ["LUO_VM_NEXT_CMDLINE"]
    )
    start = _clocks()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    before_reboot = _clocks()
    guest.write_json(
        OUT / f"floor-{k}-pre.json",
        {"names": names, "start": start, "kexec": before_reboot},
    )
    guest.mark(f"floor.{k}.reboot")
    kexec.reboot_kexec()


def floor_post(k: int) -> None:
    pre = json.loads((OUT / f"floor-{k}-pre.json").read_text())
    argv0 = [sys.executable, "-m", "orchestrator.demo.kv"]
    dev = os.open(floor.DEV, os.O_RDWR)
    session = floor.retrieve_session(dev, SESSION)
    os.close(dev)  # single opener: the next update opens it again
    env = {**os.environ, "LIVEUPDATE_KERNEL": "real"}
    REGISTRY.mkdir(parents=True, exist_ok=True)
    started = []
    for token, name in enumerate(pre["names"], 1):
        fd = floor.retrieve_fd(session, token)
        reader, writer = os.pipe()
        argv = [*argv0, "--name", name, "--registry", str(REGISTRY)]
        argv += ["--size-mib", "0", "--detach", "--memfd", str(fd)]
        os.set_inheritable(fd, True)
        helper = os.posix_spawn(
            argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, writer, 1)]
        )
        os.close(writer)
        os.close(fd)
        started.append((name, helper, reader, time.monotonic()))
    pids = {}
    for name, helper, reader, _ in started:
        with os.fdopen(reader) as f:
            pids[name] = int(f.read())
        os.waitpid(helper, 0)
    ready: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(ready) < len(pids) and time.monotonic() < deadline:
        for name, pid in pids.items():
            if name not in ready:
                try:
                    if _entry(name).get("pid") == pid:
                        ready[name] = time.monotonic()
                except (OSError, ValueError):
                    pass
        time.sleep(0.005)
    end = _clocks()
    floor.session_finish(session)
    os.close(session)  # the name is free again for this boot's floor-pre
    old_s = pre["kexec"]["mono"] - pre["start"]["mono"]
    result: dict[str, Any] = {
        "round": k,
        "old_s": old_s,
        "new_s": end["boottime"],
        "mono_s": old_s + end["boottime"],
        "wall_s": end["wall"] - pre["start"]["wall"],
        "start_wall": pre["start"]["wall"],
        "end_wall": end["wall"],
        "all_ready": len(ready) == len(pids),
        "intervals": [(s, ready.get(n)) for n, _, _, s in started],
    }
    result["sums_ok"] = _check_sums()
    guest.write_json(OUT / f"floor-{k}.json", result)
    print(f"floor round {k}: blackout {result['mono_s']:.3f} s (monotonic)", flush=True)


def write_playbook() -> None:
    """This boot's playbook: the next kernel boots the next stage."""
    image, cmdline = os.environ["LUO_VM_KERNEL"], os.environ["LUO_VM_NEXT_CMDLINE"]
    ws = {"plugin": "workloads", "with": {"registry": str(REGISTRY)}}
    playbook = {
        "name": "vm-blackout",
        "kernel": "real",
        "state_dir": str(STATE),
        "next_kernel": {"image": image, "cmdline": cmdline},
        "blackout_budget": "120s",
        "defaults": {"timeout": "600s", "retry": {"attempts": 1}},
        "phases": {
            "quiesce": {"steps": [ws]},
            "preserve": {"steps": [ws]},
            "prepare": {"steps": [{"plugin": "kexec"}]},
            "freeze": {"steps": [ws]},
            "restore": {"steps": [ws]},
            "finish": {"steps": [ws]},
        },
    }
    PLAYBOOK.write_text(json.dumps(playbook, indent=2) + "\n")


def orch_pre(k: int) -> None:
    import subprocess

    write_playbook()
    exe = os.path.join(os.path.dirname(sys.executable), "liveupdate")
    guest.mark(f"orch.{k}.run")
    done = subprocess.run(
        [exe, "run", str(PLAYBOOK), "--no-agent", "--state-dir", str(STATE)],
        check=False,
    )
    raise SystemExit(f"liveupdate run returned {done.returncode}: no kexec")


def orch_post(k: int) -> None:
    from orchestrator.restore._journal import read_journal

    records = read_journal(STATE)
    start = max(i for i, r in enumerate(records) if r["event"] == "run_start")
    run = records[start:]
    end = [r for r in run if r["event"] == "blackout_end"]
    fast = [r for r in run if r["event"] == "restore_path"]
    outcome = [r["outcome"] for r in run if r["event"] == "run_end"]
    finish = [
        r for r in run if r["event"] == "phase_start" and r.get("phase") == "finish"
    ]
    result: dict[str, Any] = {
        "round": k,
        "outcome": outcome[-1] if outcome else None,
        "blackout_end": end[-1] if end else None,
        "restore_path": fast[-1] if fast else None,
        "finish_start_wall": finish[-1]["wall"] if finish else None,
        "blackout_start_wall": next(
            (r["wall"] for r in run if r["event"] == "blackout_start"), None
        ),
        "kexec_wall": next((r["wall"] for r in run if r["event"] == "kexec"), None),
    }
    result["sums_ok"] = _check_sums()
    guest.write_json(OUT / f"orch-{k}.json", result)
    b = result["blackout_end"] or {}
    print(
        f"orchestrator round {k}: blackout {b.get('mono_s')} s (monotonic)", flush=True
    )


def main(argv: list[str]) -> int:
    count, mib = int(os.environ.get("BLACKOUT_COUNT", "4")), 0
    mib = int(os.environ.get("BLACKOUT_MIB", "64"))
    for action in argv:
        name, _, k = action.partition(":")
        guest.mark(f"blackout.{name}.{k}")
        if name == "setup":
            setup(count, mib)
        elif name == "floor-pre":
            floor_pre(int(k))
        elif name == "floor-post":
            floor_post(int(k))
        elif name == "orch-pre":
            orch_pre(int(k))
        elif name == "orch-post":
            orch_post(int(k))
        else:
            raise SystemExit(f"unknown action {action!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
