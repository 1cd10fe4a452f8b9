"""The restore path: workloads run again before the engine is loaded.

Before the kexec the engine resolves the built-in restores into spawn
actions in the restore plan; after it, ``liveupdate resume --state-dir``
runs them right after the keeper took the sessions back
(``orchestrator.restore._fast``), and the engine's restore phase adopts what
runs. These tests check what that must keep: the workloads are the same
processes before and after the engine's restore phase (never started twice),
a workload the fast path could not start is started by the engine, a
third-party restore keeps the window open until it ran, and the blackout is
journaled on both clocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from orchestrator.demo import hold
from orchestrator.luo.sim import SimKernel
from orchestrator.restore._fast import RESULT_FILE
from orchestrator.restore._resume import read_plan
from tests.engine.conftest import Host, events


def _registry_pids(host: Host) -> dict[str, int]:
    return {
        name: int(json.loads((host.registry / f"{name}.json").read_text())["pid"])
        for name in host.sums
    }


def _run(host: Host, extra: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    book = host.playbook(extra)
    run = host.liveupdate("run", str(book))
    assert run.returncode == -signal.SIGKILL, run.stderr  # ended by the kexec
    return book


def test_the_plan_carries_one_spawn_action_per_workload(host: Host) -> None:
    _run(host)
    plan = read_plan(host.state)
    assert plan is not None
    actions = [json.loads(line) for line in plan.restores]
    assert sorted(a["key"] for a in actions) == sorted(host.sums)
    for a in actions:
        assert a["step"] == "workloads"
        assert a["index"] == 0
        assert a["fd_arg"] == "--memfd"
        assert set(a["entry"]) >= {"session", "token"}
        assert a["published"] == str(host.registry / f"{a['key']}.json")


def test_workloads_run_again_before_the_engine_records_anything(host: Host) -> None:
    book = _run(host)
    # Killed at the engine's first journal record: only the restore path ran.
    done = host.resume(book, crash_at="record:1")
    assert done.returncode == -signal.SIGKILL, done.stderr
    result = json.loads((host.state / RESULT_FILE).read_text())
    assert result["done"] == [0]
    started = {a["key"]: a["pid"] for a in result["actions"]}
    assert all(a["error"] is None for a in result["actions"])
    assert _registry_pids(host) == started
    host.assert_running()
    host.assert_workloads_intact()
    # Resumed again: the engine adopts them; nothing is started twice.
    done = host.resume(book)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _registry_pids(host) == started
    assert host.status()["outcome"] == "completed"
    assert not (host.state / RESULT_FILE).exists()
    host.assert_workloads_intact()


@pytest.mark.parametrize("crash_at", ["spawn:1", "spawn:2"])
def test_a_restore_path_killed_midway_starts_each_store_once(
    host: Host, crash_at: str
) -> None:
    """Killed right after starting a store, maybe before it published itself:
    the next attempt waits for that one rather than starting a second on
    the same file."""
    book = _run(host)
    done = host.resume(book, crash_at=crash_at)
    assert done.returncode == -signal.SIGKILL
    assert not (host.state / RESULT_FILE).exists()  # it died before the end
    done = host.resume(book)
    assert done.returncode == 0, done.stdout + done.stderr
    result = events(host, "blackout_end")[-1]
    assert result["ended_by"] == "restore-path"
    host.assert_running()
    host.assert_workloads_intact()
    # One store per name: the one started before the kill was adopted.
    for name in host.sums:
        info = json.loads((host.registry / f"{name}.json").read_text())
        serving = [
            p
            for p in Path("/proc").glob("[0-9]*")
            if _cmdline(p).count(f"--name\0{name}\0--registry\0{host.registry}\0") == 1
        ]
        assert [int(p.name) for p in serving] == [info["pid"]], name


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_text()
    except OSError:
        return ""


def test_a_workload_the_restore_path_cannot_start_is_started_by_the_engine(
    host: Host,
) -> None:
    book = _run(host)
    plan_file = host.state / "restore-plan"
    lines = plan_file.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("restore "))
    action = json.loads(lines[first].removeprefix("restore "))
    action["argv"][0] = "/nonexistent/python"
    lines[first] = "restore " + json.dumps(action)
    plan_file.write_text("\n".join(lines) + "\n")
    done = host.resume(book)
    assert done.returncode == 0, done.stdout + done.stderr
    end = events(host, "blackout_end")[-1]
    assert end["ended_by"] == "restore-phase"  # the window stayed open for it
    result = events(host, "restore_path")[-1]
    errors = {a["key"]: a["error"] for a in result["actions"]}
    assert "/nonexistent/python" in errors.pop(action["key"])
    assert set(errors.values()) == {None}
    host.assert_running()
    host.assert_workloads_intact()


def test_a_third_party_restore_keeps_the_window_open(host: Host) -> None:
    book = _run(host, {"restore": [{"plugin": "faults", "with": {"hang": 0.2}}]})
    done = host.resume(book)
    assert done.returncode == 0, done.stdout + done.stderr
    end = events(host, "blackout_end")[-1]
    assert end["ended_by"] == "restore-phase"
    hung = [
        r
        for r in events(host, "step_end")
        if r["phase"] == "restore" and r["plugin"] == "faults"
    ][-1]
    assert end["end_wall"] >= hung["wall"]
    host.assert_workloads_intact()


def test_the_blackout_is_journaled_on_both_clocks(host: Host) -> None:
    book = _run(host)
    assert host.resume(book).returncode == 0
    start = events(host, "blackout_start")[-1]
    kexec = events(host, "kexec")[-1]
    end = events(host, "blackout_end")[-1]
    assert end["ended_by"] == "restore-path"
    assert end["old_s"] == round(kexec["mono"] - start["mono"], 6)
    assert end["old_s"] > 0
    assert end["new_s"] > 0
    assert abs(end["mono_s"] - (end["old_s"] + end["new_s"])) < 1e-5
    assert end["wall_s"] == round(end["end_wall"] - start["wall"], 6)
    finish = [
        r
        for r in events(host, "phase_start")
        if r["phase"] == "finish" and r["boot_id"] == end["boot_id"]
    ][-1]
    assert end["end_wall"] <= finish["wall"]  # the window ends before FINISH
    status = host.status()
    assert status["blackout_s"] == end["mono_s"]
    assert abs(status["blackout_wall_s"] - end["wall_s"]) < 1e-5


def test_workloads_without_sockets_in_sessions_of_their_own(tmp_path: Path) -> None:
    """Holders (a ``sleep`` keeping a memfd: no socket, their own restart
    command) in three groups: each group's files go into a session of their
    own, the restore path starts them again with their command, and the
    plugin checks their data itself."""
    state = tmp_path / "state"
    kernel = SimKernel(state / "kernel")
    registry = state / "workloads"
    sums: dict[str, str] = {}
    old: list[int] = []
    try:
        for g in range(3):
            for i in range(2):
                name = f"vm{g}-ram{i}"
                fd = os.memfd_create(name)
                data = os.urandom(65536 + 4096 * g + i)
                os.write(fd, data)
                sums[name] = hashlib.sha256(data).hexdigest()
                old.append(hold(registry, name, fd, f"vm{g}"))
                os.close(fd)
        host = Host(state, kernel, registry, {}, {})
        book = _run(host)
        for pid in old:  # the kexec ends every process (the simulator does not)
            os.kill(pid, signal.SIGKILL)
        done = host.resume(book)
        assert done.returncode == 0, done.stdout + done.stderr
        assert host.status()["outcome"] == "completed"
        manifest = next(
            r["manifest"] for r in events(host, "step_end") if r.get("manifest")
        )
        assert {e["session"] for e in manifest.values()} == {
            "lu-workloads.vm0",
            "lu-workloads.vm1",
            "lu-workloads.vm2",
        }
        assert events(host, "blackout_end")[-1]["ended_by"] == "restore-path"
        for name, checksum in sums.items():
            info = json.loads((registry / f"{name}.json").read_text())
            assert info["pid"] not in old
            with open(f"/proc/{info['pid']}/fd/{info['fd']}", "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == checksum, name
    finally:
        for entry in registry.glob("*.json"):
            with contextlib.suppress(ProcessLookupError, KeyError, ValueError):
                os.kill(int(json.loads(entry.read_text())["pid"]), signal.SIGKILL)
        for pid in kernel.participants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
