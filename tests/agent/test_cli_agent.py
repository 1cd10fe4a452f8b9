"""``liveupdate handover`` and ``liveupdate agent``: expected errors are one line
and a documented exit code, never a traceback."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio.to_thread
import pytest

from orchestrator.luo.sim import SimKernel
from tests.cli._util import ROOT, liveupdate, one_line

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from orchestrator.agent._server import Agent


async def handover(
    agent: Agent, *argv: str, fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        lambda: liveupdate(
            "handover", "--socket", str(agent.socket_path), *argv, fds=fds
        )
    )


async def test_fd_not_open_is_a_usage_error(agent: Agent) -> None:
    done = await handover(agent, "register", "x", "--fd", "99")
    assert done.returncode == 2
    assert "--fd 99: not an open fd of this process" in one_line(done)
    assert agent.registrations == {}


async def test_refused_request_exits_1(agent: Agent) -> None:
    fd = os.memfd_create("m")
    os.write(fd, b"data")
    try:
        done = await handover(agent, "register", "x", "--fd", str(fd), fds=(fd,))
        assert done.returncode == 0, done.stderr
        assert "registered x: a memfd ('m'), 4 bytes" in done.stdout
        again = await handover(agent, "register", "x", "--fd", str(fd), fds=(fd,))
    finally:
        os.close(fd)
    assert again.returncode == 1
    assert "the agent refused 'register': 'x' is already registered" in one_line(again)
    gone = await handover(agent, "withdraw", "ghost")
    assert gone.returncode == 1
    assert "nothing is registered under 'ghost'" in one_line(gone)
    assert list(agent.registrations) == ["x"]


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("list",), id="list"),
        pytest.param(("withdraw", "x"), id="withdraw"),
        pytest.param(("run", "p.yaml"), id="run"),
    ],
)
def test_unreachable_agent_exits_6(tmp_path: Path, argv: tuple[str, ...]) -> None:
    done = liveupdate("handover", "--socket", str(tmp_path / "none.sock"), *argv)
    assert done.returncode == 6
    assert "cannot reach the agent at" in one_line(done)
    assert "No such file or directory" in done.stderr


def test_agent_that_cannot_start_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "run" / "agent.sock"
    blocker.parent.mkdir()
    blocker.write_text("not a socket")
    SimKernel(tmp_path / "kernel")
    done = liveupdate(
        "agent",
        "--socket",
        str(blocker),
        "--state-dir",
        str(tmp_path / "state"),
        "--kernel",
        f"sim:{tmp_path / 'kernel'}",
    )
    assert done.returncode == 1
    assert "exists and is not a socket; not replacing it" in one_line(done)
    assert blocker.read_text() == "not a socket"


@pytest.mark.skipif(os.path.exists("/dev/liveupdate"), reason="this host has LUO")
def test_an_agent_on_a_host_without_luo_says_why_and_exits_3(tmp_path: Path) -> None:
    """Exit status 3 is the one the unit does not restart."""
    sock = tmp_path / "agent.sock"
    done = liveupdate(
        "agent",
        "--kernel",
        "real",
        "--socket",
        str(sock),
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert done.returncode == 3, done.stdout + done.stderr
    line = one_line(done)
    assert "no live update on this host" in line
    assert "no /dev/liveupdate" in line
    assert not sock.exists()
    unit = (ROOT / "deploy/systemd/liveupdate-agent.service").read_text()
    assert "\nRestartPreventExitStatus=3\n" in unit
