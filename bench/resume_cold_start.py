"""Cold start of ``liveupdate resume`` up to its first kernel call, against bare Python.

    python -m bench.resume_cold_start [--runs 30]

Sets up a host that went through a (simulated) kexec with a journal to resume,
snapshots it, and for each run restores the snapshot and times
``liveupdate resume PLAYBOOK --state-dir DIR`` with
``LIVEUPDATE_EXIT_AFTER=first-kernel-call`` (it exits right after
RETRIEVE_SESSION), interleaved with ``python -c pass`` on the same
interpreter. Also lists which heavy modules were loaded by then (none may be).

Two paths are timed. *real*: the restore plan names this host's kernel, so the
first kernel call is the open of /dev/liveupdate (it fails here, exit 1, which
is where the clock stops): the cost a real host pays. *sim*: the simulated
kernel of the demo, whose own import is part of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.demo import launch, wait_published
from orchestrator.luo.sim import SimKernel

ROOT = Path(__file__).resolve().parents[1]


def prepare(base: Path) -> tuple[Path, Path]:
    state = base / "state"
    kernel = SimKernel(state / "kernel")
    registry = state / "workloads"
    pids = [launch(registry, f"kv{i}", 4, kernel.spec) for i in range(2)]
    for i, pid in enumerate(pids):
        wait_published(registry, f"kv{i}", pid)
    image = state / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    book = base / "playbook.yaml"
    steps = {"plugin": "workloads"}
    book.write_text(
        json.dumps(
            {
                "name": "bench",
                "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
                "phases": {
                    "quiesce": {"steps": [steps]},
                    "preserve": {"steps": [steps]},
                    "prepare": {"steps": [{"plugin": "kexec"}]},
                    "freeze": {"steps": [steps]},
                    "restore": {"steps": [steps]},
                },
            }
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            str(book),
            "--kernel",
            kernel.spec,
            "--state-dir",
            str(state),
        ],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    for entry in registry.glob("*.json"):
        try:
            os.kill(json.loads(entry.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    snapshot = base / "snapshot"
    shutil.copytree(
        state, snapshot, symlinks=True, ignore=shutil.ignore_patterns("*.sock")
    )
    return snapshot, book


def release(state: Path) -> None:
    """Let the keeper a timed run left holding the sessions go: the next run
    must start its own, not find this one."""
    from orchestrator.restore._keeper import Keeper

    keeper = Keeper.connect(state)
    if keeper is not None:
        keeper.finish()


def timed(argv: list[str], env: dict[str, str], expect: int = 0) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    elapsed = time.perf_counter() - t0
    assert done.returncode == expect, done.stderr
    if expect == 1:  # the real path must have stopped at the device, nowhere else
        assert "/dev/liveupdate" in done.stderr, done.stderr
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resume_cold_start")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    # An installed package has its bytecode compiled (pip does it); this
    # checkout may not (PYTHONDONTWRITEBYTECODE): compile it as pip would.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "orchestrator", "plugins"],
        cwd=ROOT,
        check=True,
    )
    # The command the boot unit runs: the installed console script.
    liveupdate = str(Path(sys.executable).with_name("liveupdate"))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        snapshot, book = prepare(base)
        state = base / "run"
        env = {**os.environ, "LIVEUPDATE_EXIT_AFTER": "first-kernel-call"}
        resume = [
            liveupdate,
            "resume",
            str(book),
            "--state-dir",
            str(state),
            "--kernel",
            f"sim:{state / 'kernel'}",
        ]
        bare = [sys.executable, "-c", "pass"]
        sim_import = [sys.executable, "-c", "import orchestrator.luo.sim"]
        real_state = base / "real"
        shutil.copytree(snapshot, real_state, symlinks=True)
        plan = real_state / "restore-plan"
        plan.write_text(re.sub(r"(?m)^kernel sim:.*$", "kernel real", plan.read_text()))
        assert "kernel real" in plan.read_text()
        resume_real = [
            liveupdate,
            "resume",
            str(book),
            "--state-dir",
            str(real_state),
        ]
        samples: dict[str, list[float]] = {
            "bare": [],
            "resume": [],
            "sim": [],
            "real": [],
        }
        for _ in range(args.runs):
            shutil.rmtree(state, ignore_errors=True)
            shutil.copytree(snapshot, state, symlinks=True)
            samples["resume"].append(timed(resume, env))
            release(state)
            samples["bare"].append(timed(bare, env))
            samples["sim"].append(timed(sim_import, env))
            samples["real"].append(timed(resume_real, env, expect=1))
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(snapshot, state, symlinks=True)
        probe = (
            "import sys\nfrom orchestrator.restore import _resume\n"
            f"_resume.prefetch(['--state-dir', {str(state)!r}, '--kernel', "
            f"{'sim:' + str(state / 'kernel')!r}])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'anyio','pluggy','tenacity','yaml','prometheus_client','httpx','orchestrator'}))"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        release(state)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    print(f"python -c pass                      median {med['bare']:.1f} ms")
    print(
        f"resume to first kernel call (real) median {med['real']:.1f} ms "
        f"= {med['real'] / med['bare']:.2f}x bare Python"
    )
    print(
        f"resume to first kernel call (sim)  median {med['resume']:.1f} ms "
        f"= {med['resume'] / med['bare']:.2f}x bare Python"
    )
    print(
        f"  of which importing the simulator  {med['sim'] - med['bare']:.1f} ms "
        f"(not on a real kernel)"
    )
    print(f"modules loaded by then: {loaded}")


if __name__ == "__main__":
    main()
