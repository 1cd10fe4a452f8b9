"""Per-step overhead of the engine, and a 1,000-step playbook.

    python -m bench.engine_steps [--steps 1000] [--state-dir DIR]

Runs a quiesce phase of N no-op steps through the engine (hook lookup,
retry policy, timeout scope, two journal records with fsync each) and the
same N hooks awaited directly; the difference per step is the engine's
overhead. The journal's fsync dominates: run it with the state dir on the
disk the host will use (the default, under /var/tmp) and on tmpfs to see both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anyio
import pluggy

from orchestrator import Phase, StepContext, hookimpl
from orchestrator.engine._context import RunContext
from orchestrator.engine._engine import Done, Engine
from orchestrator.engine._hookspecs import PROJECT, PhaseSpecs
from orchestrator.engine._playbook import parse_playbook
from orchestrator.luo.sim import SimKernel


class Noop:
    name = "noop"

    @hookimpl
    async def lu_quiesce(self, ctx: StepContext) -> None:
        return None


def playbook_text(steps: int) -> str:
    doc = {
        "name": "bench",
        "phases": {
            "quiesce": {
                "steps": [{"plugin": "noop", "name": f"noop-{i}"} for i in range(steps)]
            }
        },
    }
    return json.dumps(doc)


async def measure(steps: int, state_dir: Path) -> dict[str, float]:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(PhaseSpecs)
    plugin = Noop()
    pm.register(plugin, name="noop")
    t0 = time.perf_counter()
    playbook = parse_playbook(
        playbook_text(steps), path="<bench>", known_plugins={"noop"}
    )
    load_s = time.perf_counter() - t0
    kernel = SimKernel(state_dir / "kernel")
    engine = Engine(playbook, kernel, state_dir, pm=pm)
    with engine.journal.locked("bench"):
        run = RunContext("bench", playbook, kernel, engine.journal, state_dir)
        done: list[Done] = []
        t0 = time.perf_counter()
        await engine._run_phase(run, Phase.QUIESCE, done)
        engine_s = time.perf_counter() - t0
    plan = playbook.plan(Phase.QUIESCE)
    assert plan is not None
    t0 = time.perf_counter()
    for step in plan.steps:
        await plugin.lu_quiesce(StepContext(step, run, 1))
    direct_s = time.perf_counter() - t0
    assert len(done) == steps
    return {
        "steps": steps,
        "load_ms": load_s * 1e3,
        "engine_ms": engine_s * 1e3,
        "direct_ms": direct_s * 1e3,
        "overhead_us_per_step": (engine_s - direct_s) / steps * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_steps")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args()
    targets = (
        [("given", args.state_dir)]
        if args.state_dir
        else [
            ("disk (/var/tmp)", Path("/var/tmp")),
            ("tmpfs (/dev/shm)", Path("/dev/shm")),
        ]
    )
    for label, base in targets:
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            r = anyio.run(measure, args.steps, Path(tmp))
        print(
            f"{label:18} {r['steps']} steps: engine {r['engine_ms']:.1f} ms, "
            f"hooks alone {r['direct_ms']:.1f} ms, overhead "
            f"{r['overhead_us_per_step']:.0f} us/step; playbook load {r['load_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
