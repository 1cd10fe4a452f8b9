"""A live update at scale on the real LUO kernel: 256 sessions x 4 memfds.

    python -m bench.scale [--sessions 256] [--files 4] [--mib 1] [--memory 3G]

Boots the LUO test kernel in QEMU (the VM harness of ``make e2e``) and, in the
guest, starts SESSIONS x FILES *holders* (``orchestrator.demo.hold``: a
``sleep`` keeping a memfd of MIB MiB, published without a socket; the FILES
holders of one group share a LUO session of their own), then runs
``liveupdate run`` with the ``workloads`` plugin through a real kexec. The new
kernel's first stage command is ``liveupdate resume PLAYBOOK --state-dir DIR``
(the boot unit's); then every holder's data is hashed again and compared.

Prints the update's timings from the journal (phases, the restore path, the
blackout on both clocks) and writes ``scale.json`` into the run's out dir.
The default is 1 GiB in all (1,024 x 1 MiB): what a 3 GiB guest holds with
1,024 processes; ``--mib 4 --memory 8G`` is the 4 GiB run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REGISTRY = Path("/run/luo-scale/workloads")


def _out() -> Path:
    return Path(os.environ.get("LUO_VM_OUT", "/run/luo-vm/out"))


def _data(name: str, mib: int) -> bytes:
    return hashlib.sha256(name.encode()).digest() * (mib << 15)


def guest_pre(sessions: int, files: int, mib: int) -> int:
    import subprocess

    from orchestrator.demo import hold
    from tests.vm import guest

    t0 = time.monotonic()
    sums = {}
    for s in range(sessions):
        for f in range(files):
            name = f"vm{s:03d}-ram{f}"
            data = _data(name, mib)
            fd = os.memfd_create(name)
            os.write(fd, data)
            sums[name] = hashlib.sha256(data).hexdigest()
            hold(REGISTRY, name, fd, f"vm{s:03d}")
            os.close(fd)
    guest.mark("scale.started", holders=len(sums), seconds=time.monotonic() - t0)
    state = _out() / "scale-state"
    book = _out() / "scale-playbook.yaml"
    ws = {"plugin": "workloads", "with": {"registry": str(REGISTRY)}}
    book.write_text(
        json.dumps(
            {
                "name": "vm-scale",
                "kernel": "real",
                "state_dir": str(state),
                "next_kernel": {
                    "image": os.environ["LUO_VM_KERNEL"],
                    "cmdline": os.environ["LUO_VM_NEXT_CMDLINE"],
                },
                "blackout_budget": "600s",
                "defaults": {"timeout": "1800s", "retry": {"attempts": 1}},
                "phases": {
                    "quiesce": {"steps": [ws]},
                    "preserve": {"steps": [ws]},
                    "prepare": {"steps": [{"plugin": "kexec"}]},
                    "freeze": {"steps": [ws]},
                    "restore": {"steps": [ws]},
                    "finish": {"steps": [ws]},
                },
            }
        )
    )
    guest.write_json(_out() / "scale-pre.json", {"sums": sums, "mib": mib})
    exe = os.path.join(os.path.dirname(sys.executable), "liveupdate")
    done = subprocess.run(
        [exe, "run", str(book), "--no-agent", "--state-dir", str(state)], check=False
    )
    print(f"liveupdate run returned {done.returncode}: no kexec", flush=True)
    return 1


def guest_post() -> int:
    from orchestrator.restore._journal import read_journal
    from tests.vm import guest

    pre = json.loads((_out() / "scale-pre.json").read_text())
    records = read_journal(_out() / "scale-state")
    bad = []
    for name, checksum in pre["sums"].items():
        info = json.loads((REGISTRY / f"{name}.json").read_text())
        with open(f"/proc/{info['pid']}/fd/{info['fd']}", "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != checksum:
                bad.append(name)
    phases: dict[str, float] = {}
    starts: dict[str, dict[str, float]] = {}
    for r in records:
        if r["event"] == "phase_start":
            starts[r["phase"]] = r
        elif r["event"] == "phase_end" and r["phase"] in starts:
            phases[r["phase"]] = r["mono"] - starts[r["phase"]]["mono"]
    end = next(r for r in reversed(records) if r["event"] == "blackout_end")
    fast = next((r for r in records if r["event"] == "restore_path"), {})
    sessions = {
        e["session"]
        for r in records
        if r["event"] == "step_end" and r.get("manifest")
        for e in r["manifest"].values()
    }
    outcome = next(r["outcome"] for r in reversed(records) if r["event"] == "run_end")
    guest.write_json(
        _out() / "scale.json",
        {
            "outcome": outcome,
            "holders": len(pre["sums"]),
            "sessions": len(sessions),
            "mib_each": pre["mib"],
            "mismatched": bad,
            "phases_s": phases,
            "restore_path_s": fast.get("seconds"),
            "restore_path_done": fast.get("done"),
            "blackout": {k: end.get(k) for k in ("mono_s", "old_s", "new_s", "wall_s")},
            "ended_by": end.get("ended_by"),
        },
    )
    return 0 if not bad and outcome == "completed" else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["guest"]:
        if argv[1] == "pre":
            return guest_pre(int(argv[2]), int(argv[3]), int(argv[4]))
        return guest_post()
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    p.add_argument("--sessions", type=int, default=256)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--mib", type=int, default=1, help="MiB of each memfd")
    p.add_argument("--memory", default="3G", help="the guest's RAM")
    args = p.parse_args(argv)
    from tests.vm.harness import Scenario, Stage, python_argv, run_scenario, venv_python
    from tests.vm.kernel import ensure_kernel

    liveupdate = venv_python().rsplit("/", 1)[0] + "/liveupdate"
    post = (
        f'{liveupdate} resume "$LUO_VM_OUT/scale-playbook.yaml" '
        f'--state-dir "$LUO_VM_OUT/scale-state"; '
        f"exec {venv_python()} -m bench.scale guest post"
    )
    pre = ("guest", "pre", str(args.sessions), str(args.files), str(args.mib))
    sc = Scenario(
        "bench-scale",
        (
            Stage("pre", python_argv("-m", "bench.scale", *pre)),
            Stage("post", ("/bin/sh", "-c", post)),
        ),
        memory=args.memory,
        timeout=5400,
    )
    t0 = time.monotonic()
    result = run_scenario(sc, ensure_kernel(), echo=False)
    data = result.read_json("scale.json")
    if data is None:
        print("no result:", *result.failures(), sep="\n  ")
        print(f"  out dir: {result.out_dir}")
        return 1
    print(json.dumps(data, indent=2))
    print(f"VM run {time.monotonic() - t0:.0f} s; out dir {result.out_dir}")
    return 0 if data["outcome"] == "completed" and not data["mismatched"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
