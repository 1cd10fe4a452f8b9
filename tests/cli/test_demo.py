"""``liveupdate demo``: it writes nowhere but its own directory, leaves no
workload running, and the same stores go through update after update."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.demo import launch, wait_published
from orchestrator.demo.kv import ask, running, stop

from ._util import ROOT, liveupdate, tree

if TYPE_CHECKING:
    from collections.abc import Iterator

DEMO = (ROOT / "playbooks" / "demo.yaml").read_text()


def small(text: str) -> str:
    """The demo playbook with 4 MiB stores (quicker to hash)."""
    return text.replace("size_mib: 128", "size_mib: 4")


def demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def store_pids(registry: Path) -> list[int]:
    return [int(json.loads(p.read_text())["pid"]) for p in registry.glob("*.json")]


@pytest.fixture
def stopped() -> Iterator[list[Path]]:
    """Registries whose stores the test may leave running: stopped after it."""
    registries: list[Path] = []
    yield registries
    for registry in registries:
        stop(registry)


def test_a_host_playbook_cannot_make_the_demo_touch_the_host(
    tmp_path: Path, stopped: list[Path]
) -> None:
    """A playbook whose kernel, state_dir and next_kernel name the host's files:
    the demo uses its own directory (default .state/demo) and changes nothing
    else; no workload is left running."""
    host = tmp_path / "host"
    (host / "var-lib-liveupdate").mkdir(parents=True)
    (host / "var-lib-liveupdate" / "journal.jsonl").write_text("{}\n")
    (host / "boot").mkdir()
    (host / "boot" / "vmlinuz-6.12").write_bytes(b"the real next kernel")
    playbook = tmp_path / "host-like.yaml"
    playbook.write_text(
        small(DEMO)
        .replace("sim:../.state/demo/kernel", "real")
        .replace("state_dir: ../.state/demo", f"state_dir: {host}/var-lib-liveupdate")
        .replace("../.state/demo/vmlinuz-next", f"{host}/boot/vmlinuz-6.12")
    )
    own = tmp_path / ".state" / "demo"
    stopped.append(own / "workloads")
    before = tree(tmp_path)

    done = demo(str(playbook), cwd=tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("every byte came back") == 2
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith(".state/")}
    assert after == before
    assert (own / "journal.jsonl").is_file()
    pids = store_pids(own / "workloads")
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids), "a workload is left running"
    assert "stopped the workloads (kv0, kv1)" in done.stdout


def test_the_demo_wipes_only_a_demo_directory(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    done = demo("--state-dir", str(precious), cwd=tmp_path)
    assert done.returncode == 2
    assert "not a demo directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert (precious / "data").read_text() == "keep me"
    assert sorted(os.listdir(precious)) == ["data"]


def test_the_demo_refuses_plugins_that_act_outside_it(tmp_path: Path) -> None:
    playbook = tmp_path / "qemu.yaml"
    playbook.write_text(
        small(DEMO).replace("      - plugin: kexec", "      - plugin: qemu")
    )
    done = demo(str(playbook), "--state-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert done.returncode == 2
    assert "plugin 'qemu' acts outside the demo directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_same_stores_go_through_a_second_update(
    tmp_path: Path, stopped: list[Path]
) -> None:
    """The stores a first update restored (which publish no SHA-256: they
    serve before hashing) complete a second update, data intact."""
    playbook = tmp_path / "demo.yaml"
    playbook.write_text(small(DEMO))
    state = tmp_path / "d"
    registry = state / "workloads"
    stopped.append(registry)
    done = demo(str(playbook), "--state-dir", str(state), "--keep", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    sums = {
        name: ask(json.loads((registry / f"{name}.json").read_text())["socket"], "SUM")
        for name in ("kv0", "kv1")
    }
    assert sorted(running(registry)) == ["kv0", "kv1"], "--keep keeps them"

    derived = str(state / "playbook.yaml")
    second = liveupdate("run", derived, "--no-agent")
    assert second.returncode == -9, second.stdout + second.stderr  # the kexec
    resumed = liveupdate("resume", derived, "--state-dir", str(state))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "outcome completed" in resumed.stdout
    for name, before in sums.items():
        info = json.loads((registry / f"{name}.json").read_text())
        assert ask(info["socket"], "SUM") == before

    assert stop(registry) == ["kv0", "kv1"]
    assert running(registry) == {}


def test_a_store_outlives_misbehaving_clients(
    tmp_path: Path, stopped: list[Path]
) -> None:
    registry = tmp_path / "workloads"
    stopped.append(registry)
    pid = launch(registry, "kv0", 1, "real")
    info = wait_published(registry, "kv0", pid)
    path = info["socket"]

    def send(data: bytes, *, shut: bool = True) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(data)
            if shut:
                conn.shutdown(socket.SHUT_WR)

    send(b"")  # connects and leaves
    send(b"\xff\xfe\xfd\n")  # not text
    send(b"x" * 10_000)  # too long, no newline
    send(b"GET 1\n", shut=False)  # goes away without reading the answer
    for request in ("GET -1", "GET abc", "GET 99999999999", "GET 1 2"):
        assert ask(path, request).startswith("ERR no record")
    assert ask(path, "BOGUS") == "ERR unknown request"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)  # says nothing: the store gives up on it in 5 s
        assert ask(path, "PING") == "PONG"
    assert ask(path, "GET 0").startswith(b"kv0:0".hex())
    assert alive(pid)
