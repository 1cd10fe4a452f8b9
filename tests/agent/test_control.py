"""The agent's control API: HTTP over its Unix socket, through httpx."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from orchestrator.agent._server import Agent, control_socket_for
from orchestrator.luo.sim import SimKernel
from tests.cli._util import listening_line

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(uds=str(control_socket_for(agent.socket_path)))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://agent", timeout=30
    ) as client:
        yield client


def playbook(tmp_path: Path, prepare_steps: list[dict[str, object]]) -> Path:
    image = tmp_path / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    path = tmp_path / "p.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "control",
                "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
                "phases": {
                    "preserve": {"steps": [{"plugin": "agent"}]},
                    "prepare": {"steps": [{"plugin": "kexec"}, *prepare_steps]},
                },
            }
        )
    )
    return path


def hanging(state_dir: Path) -> bool:
    """Whether the update reached the hanging fault step."""
    journal = state_dir / "journal.jsonl"
    lines = journal.read_text().splitlines() if journal.exists() else []
    return any(
        r.get("event") == "step_start" and r.get("plugin") == "faults"
        for r in map(json.loads, lines)
    )


async def wait_idle(http: httpx.AsyncClient) -> dict[str, object]:
    with anyio.fail_after(120):
        while True:
            status: dict[str, object] = (await http.get("/v1/status")).json()
            if not status["agent"]["updating"]:  # type: ignore[index]
                return status
            await anyio.sleep(0.05)


async def test_status_and_errors(http: httpx.AsyncClient) -> None:
    status = await http.get("/v1/status")
    assert status.status_code == 200
    assert status.json()["agent"] == {"updating": False, "registrations": 0}
    missing = await http.get("/v1/nope")
    assert missing.status_code == 404
    assert "/v1/status" in missing.json()["error"]
    assert (await http.get("/v1/updates")).status_code == 405
    bad = await http.post("/v1/updates", content=b"{not json")
    assert bad.status_code == 400
    unloadable = await http.post("/v1/updates", json={"playbook": "/nonexistent"})
    assert unloadable.status_code == 409
    # Not the host lock: no code says so, whatever the text.
    assert "code" not in unloadable.json(), unloadable.json()
    assert (await http.post("/v1/cancel")).status_code == 409
    assert (await http.get("/v1/report")).status_code == 404


async def test_status_reads_the_flag_before_the_journal(
    http: httpx.AsyncClient, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update that ends while its journal is read is still reported as running.

    Otherwise a poller sees ``updating: false`` beside the state the journal
    had mid-way (CANCELLING, no outcome) and stops polling too early.
    """
    from orchestrator.agent import _http

    read = _http._status

    def ends_while_read(a: Agent) -> dict[str, object]:
        a.updating = False  # the update's last step, while the journal is read
        return read(a)

    agent.updating = True
    monkeypatch.setattr(_http, "_status", ends_while_read)
    status = (await http.get("/v1/status")).json()
    assert status["agent"]["updating"] is True


async def test_start_then_cancel_an_update(
    http: httpx.AsyncClient, agent: Agent, tmp_path: Path
) -> None:
    book = playbook(tmp_path, [{"plugin": "faults", "with": {"hang": 120}}])
    started = await http.post("/v1/updates", json={"playbook": str(book)})
    assert started.status_code == 202, started.text
    again = await http.post("/v1/updates", json={"playbook": str(book)})
    assert again.status_code == 409
    assert again.json()["code"] == "update_running"
    assert "another update is running" in again.json()["error"]
    with anyio.fail_after(60):
        while not hanging(agent.state_dir):  # noqa: ASYNC110  (the journal is a file)
            await anyio.sleep(0.05)
    assert (await http.post("/v1/cancel")).status_code == 202
    status = await wait_idle(http)
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled")
    report = await http.get("/v1/report")
    assert report.status_code == 200
    assert "prepare" in report.text


def _liveupdate_run(book: Path, control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            str(book),
            "--agent",
            str(control),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _start_agent(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    kernel = SimKernel(tmp_path / "kernel")
    sock = tmp_path / "run" / "agent.sock"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "agent",
            "--socket",
            str(sock),
            "--state-dir",
            str(tmp_path / "state"),
            "--kernel",
            kernel.spec,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert agent.stdout is not None
    if "agent listening" not in listening_line(agent.stdout):
        _stop(agent)
        pytest.fail("the agent did not start")
    return agent, control_socket_for(sock)


def _stop(agent: subprocess.Popen[str]) -> None:
    agent.terminate()
    agent.wait(timeout=30)
    if agent.stdout is not None:
        agent.stdout.close()


def test_liveupdate_run_goes_through_the_agent(tmp_path: Path) -> None:
    agent, control = _start_agent(tmp_path)
    try:
        book = playbook(tmp_path, [{"plugin": "faults", "with": {"fail": "injected"}}])
        done = _liveupdate_run(book, control)
        assert done.returncode == 5, done.stdout + done.stderr
        assert "update cancelled" in done.stdout
        assert "injected" in done.stdout
    finally:
        _stop(agent)


def test_liveupdate_run_while_another_runs_exits_7_and_leaves_it(
    tmp_path: Path,
) -> None:
    """The host lock, as automation sees it: ``run`` through the agent exits 7
    (told by the 409's code, not its text) and the update that runs goes on."""
    agent, control = _start_agent(tmp_path)
    transport = httpx.HTTPTransport(uds=str(control))
    try:
        with httpx.Client(
            transport=transport, base_url="http://agent", timeout=30
        ) as http:
            first = playbook(tmp_path, [{"plugin": "faults", "with": {"hang": 120}}])
            assert http.post("/v1/updates", json={"playbook": str(first)}).is_success
            second = tmp_path / "second"
            second.mkdir()
            done = _liveupdate_run(playbook(second, []), control)
            assert done.returncode == 7, done.stdout + done.stderr
            assert "another update is running on this host" in done.stderr
            status = http.get("/v1/status").json()
            assert status["agent"]["updating"] is True
            assert status["outcome"] is None, status
            assert http.post("/v1/cancel").status_code == 202
            deadline = time.monotonic() + 60
            while http.get("/v1/status").json()["agent"]["updating"]:
                assert time.monotonic() < deadline, "the cancel did not end"
                time.sleep(0.05)
            assert http.get("/v1/status").json()["outcome"] == "cancelled"
    finally:
        _stop(agent)
