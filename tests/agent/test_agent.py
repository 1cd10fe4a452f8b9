"""The host agent: fd hand-over over SCM_RIGHTS, peer checks, and an update.

Clients are real processes or threads talking to a real agent over a real
Unix socket; the update runs on the simulated kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from orchestrator.agent._server import Agent, run_agent, with_agent_steps
from orchestrator.agent_client import AgentClient, AgentError, AgentRefusedError
from orchestrator.engine._phases import Phase
from orchestrator.engine._playbook import load_playbook
from orchestrator.luo.sim import SimKernel
from tests.cli._util import listening_line

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("handover", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def client_call(path: Path, fn_name: str, *args: object) -> object:
    with AgentClient(path) as client:
        return getattr(client, fn_name)(*args)


async def call(agent: Agent, fn_name: str, *args: object) -> object:
    return await anyio.to_thread.run_sync(
        client_call, agent.socket_path, fn_name, *args
    )


async def test_register_list_reclaim_round_trip(agent: Agent) -> None:
    fds = [memfd_with(f"data-{i}".encode() * 1000) for i in range(3)]
    for i, fd in enumerate(fds):
        await call(agent, "register", f"w{i}", fd)
    items = await call(agent, "list")
    assert isinstance(items, list)
    assert sorted(item["name"] for item in items) == ["w0", "w1", "w2"]
    assert {item["size"] for item in items} == {6000}
    back = await call(agent, "reclaim", "w1")
    assert isinstance(back, int)
    try:
        assert os.pread(back, 6000, 0) == b"data-1" * 1000
        assert os.fstat(back).st_ino == os.fstat(fds[1]).st_ino  # the same file
    finally:
        os.close(back)
    assert len(await call(agent, "list")) == 2  # type: ignore[arg-type]
    for fd in fds:
        os.close(fd)


async def test_several_clients_at_once(agent: Agent) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(8):
            fd = memfd_with(b"x" * (i + 1))
            tg.start_soon(call, agent, "register", f"c{i}", fd)
    assert len(agent.registrations) == 8
    assert sorted(r.size for r in agent.registrations.values()) == list(range(1, 9))


async def test_unpreservable_kind_refused_and_nothing_lost(agent: Agent) -> None:
    keep = memfd_with(b"kept")
    await call(agent, "register", "kept", keep)
    r, w = os.pipe()
    with pytest.raises(
        AgentError, match="this kernel cannot preserve a pipe; not registered"
    ):
        await call(agent, "register", "pipe", r)
    assert list(agent.registrations) == ["kept"]
    assert os.pread(agent.registrations["kept"].fd, 4, 0) == b"kept"
    for fd in (keep, r, w):
        os.close(fd)


async def test_duplicate_name_and_unknown_op(agent: Agent) -> None:
    fd = memfd_with(b"a")
    await call(agent, "register", "dup", fd)
    with pytest.raises(AgentError, match="already registered"):
        await call(agent, "register", "dup", fd)
    with pytest.raises(AgentError, match="nothing is registered under 'ghost'"):
        await call(agent, "reclaim", "ghost")
    os.close(fd)


def run_as_nobody(sock: Path, code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Run *code* as nobody with the system Python and a world-readable copy of
    the (standard-library only) client."""
    pkg = tmp / "client" / "orchestrator"
    if not pkg.exists():
        (pkg / "luo").mkdir(parents=True)
        (pkg / "agent").mkdir()
        for name in (
            "__init__.py",
            "_compat.py",
            "errors.py",
            "agent_client.py",
            "agent/__init__.py",
            "agent/client.py",
            "luo/__init__.py",
            "luo/_fds.py",
        ):
            (pkg / name).write_text((ROOT / "orchestrator" / name).read_text())
        for path in (tmp, tmp / "client", pkg, *pkg.rglob("*")):
            path.chmod(0o755)
    return subprocess.run(
        ["/usr/bin/python3", "-c", code, str(sock)],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp / "client")},
    )


REGISTER = (
    "import os, sys\n"
    "from orchestrator.agent_client import AgentClient\n"
    "fd = os.memfd_create('m'); os.write(fd, b'x')\n"
    "AgentClient(sys.argv[1]).register('intruder', fd)\n"
)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory under /tmp that other users can traverse (tmp_path cannot)."""
    path = Path(tempfile.mkdtemp(prefix="luo-agent-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client as another user"
)
async def test_peer_not_allowed_is_refused(world_dir: Path, tmp_path: Path) -> None:
    kernel = SimKernel(tmp_path / "kernel")
    async with anyio.create_task_group() as tg:
        agent: Agent = await tg.start(
            run_agent, world_dir / "run" / "agent.sock", tmp_path / "state", kernel
        )
        # The socket's mode (0660, directory 0750) already keeps others out...
        done = await anyio.to_thread.run_sync(
            run_as_nobody, agent.socket_path, REGISTER, world_dir / "nobody"
        )
        assert done.returncode != 0
        assert "Permission denied" in done.stderr
        # ...and SO_PEERCRED refuses them even where the file mode lets them in.
        agent.socket_path.parent.chmod(0o755)
        agent.socket_path.chmod(0o666)
        done = await anyio.to_thread.run_sync(
            run_as_nobody, agent.socket_path, REGISTER, world_dir / "nobody"
        )
        assert done.returncode != 0
        assert f"uid {NOBODY} gid {NOBODY}" in done.stderr
        assert "is not allowed to use the agent" in done.stderr
        assert "intruder" not in agent.registrations
        tg.cancel_scope.cancel()


async def test_client_dying_mid_registration_registers_nothing(agent: Agent) -> None:
    # Connected, then killed before its request went out.
    code = (
        "import os, signal, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", code, str(agent.socket_path)], check=False
        )
    )
    assert done.returncode == -signal.SIGKILL
    # Sent the fd, then died without waiting for the answer: the registration stands.
    code = (
        "import json, os, signal, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "fd = os.memfd_create('m'); os.write(fd, b'orphan')\n"
        "socket.send_fds(s, [json.dumps({'op': 'register', 'name': 'orphan'}).encode()], [fd])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", code, str(agent.socket_path)], check=False
        )
    )
    with anyio.fail_after(30):
        while "orphan" not in agent.registrations:  # noqa: ASYNC110  (polling another process)
            await anyio.sleep(0.05)
    assert os.pread(agent.registrations["orphan"].fd, 6, 0) == b"orphan"
    assert list(agent.registrations) == ["orphan"]  # nothing from the first client
    items = await call(agent, "list")  # and the agent still serves
    assert [i["name"] for i in items] == ["orphan"]  # type: ignore[attr-defined]


AGENT_STEPS = {
    "preserve": {"steps": [{"plugin": "agent"}]},
    "prepare": {"steps": [{"plugin": "kexec"}]},
    "restore": {"steps": [{"plugin": "agent"}]},
    "finish": {"steps": [{"plugin": "agent"}]},
}


@pytest.mark.parametrize(
    "phases",
    [
        pytest.param(AGENT_STEPS, id="playbook-names-agent"),
        pytest.param(
            {"prepare": {"steps": [{"plugin": "kexec"}]}}, id="playbook-without-agent"
        ),
        pytest.param(
            {
                "prepare": {"steps": [{"plugin": "kexec"}]},
                "preserve": {"steps": [{"plugin": "faults", "name": "agent"}]},
            },
            id="step-named-agent-of-another-plugin",
        ),
    ],
)
def test_update_through_the_agent_keeps_fds_across_the_kexec(
    tmp_path: Path, phases: dict[str, object]
) -> None:
    """Workloads hand memfds to the agent and exit; the agent runs the update
    (the simulated kexec ends it); started again, it resumes and hands them back
    -- whether or not the playbook names the agent's steps."""
    kernel = SimKernel(tmp_path / "kernel")
    state, sock = tmp_path / "state", tmp_path / "run" / "agent.sock"
    image = tmp_path / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    book = tmp_path / "agent.yaml"
    book.write_text(
        json.dumps(
            {
                "name": "agent-update",
                "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
                "phases": phases,
            }
        )
    )
    argv = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "agent",
        "--socket",
        str(sock),
        "--state-dir",
        str(state),
        "--kernel",
        kernel.spec,
    ]

    def start_agent() -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert "agent listening" in listening_line(proc.stdout)
        return proc

    first = start_agent()
    boot = kernel.boot_id()
    payloads = {f"vm{i}-ram": os.urandom(1 << 20) for i in range(2)}
    with AgentClient(sock) as client:
        for name, data in payloads.items():
            fd = memfd_with(data)
            client.register(name, fd)
            os.close(fd)  # the workload lets go: the agent holds it
        client.run(book)
    assert first.wait(timeout=120) == -signal.SIGKILL  # ended by the kexec
    assert first.stdout is not None
    first.stdout.close()
    assert kernel.boot_id() != boot
    second = start_agent()
    try:
        with AgentClient(sock) as client:
            listed = {i["name"]: i["state"] for i in client.list()}
            assert listed == dict.fromkeys(payloads, "restored")
            for name, data in payloads.items():
                fd = client.reclaim(name)
                assert os.pread(fd, len(data) + 1, 0) == data  # every byte
                os.close(fd)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        assert second.stdout is not None
        second.stdout.close()
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "status",
            "--state-dir",
            str(state),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout)["outcome"] == "completed"


def test_agent_steps_are_added_where_the_playbook_has_none(tmp_path: Path) -> None:
    book = tmp_path / "p.yaml"
    book.write_text(
        json.dumps(
            {
                "name": "p",
                "phases": {
                    "preserve": {"timeout": 5, "steps": [{"plugin": "faults"}]},
                    "restore": {"steps": [{"plugin": "agent", "timeout": 7}]},
                },
            }
        )
    )
    playbook = with_agent_steps(load_playbook(book))
    steps = {
        phase.value: [(s.plugin, s.name, s.index) for s in plan.steps]
        for phase, plan in playbook.phases.items()
    }
    assert steps == {
        "preserve": [("faults", "faults", 0), ("agent", "agent", 1)],
        "restore": [("agent", "agent", 0)],
        "finish": [("agent", "agent", 0)],
    }
    assert playbook.phases[Phase.PRESERVE].timeout == 5  # the playbook's own
    assert playbook.phases[Phase.RESTORE].steps[0].timeout == 7  # kept as written
    assert with_agent_steps(playbook) == playbook  # once is enough


async def test_playbook_with_a_bad_option_is_refused_up_front(
    agent: Agent, tmp_path: Path
) -> None:
    """The agent checks a playbook's options as `plan` does: a typo is a
    refusal naming the key, and nothing starts (registrations stay open)."""
    book = tmp_path / "typo.yaml"
    book.write_text(
        json.dumps(
            {
                "name": "typo",
                "phases": {
                    "prepare": {"steps": [{"plugin": "kexec", "with": {"imag": "x"}}]}
                },
            }
        )
    )
    fd = memfd_with(b"kept" * 100)
    await call(agent, "register", "w0", fd)
    with pytest.raises(AgentRefusedError, match=r"imag.*did you mean 'image'"):
        await call(agent, "run", book)
    assert not agent.updating
    back = await call(agent, "reclaim", "w0")  # not frozen: nothing started
    assert isinstance(back, int)
    assert os.pread(back, 400, 0) == b"kept" * 100
    os.close(back)
    os.close(fd)
