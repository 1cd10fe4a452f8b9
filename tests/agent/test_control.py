"""The agent's control API: HTTP over its Unix socket, through httpx."""

from __future__ import annotations

import json
import subprocess
import sys
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
    assert (
        await http.post("/v1/updates", json={"playbook": "/nonexistent"})
    ).status_code == 409
    assert (await http.post("/v1/cancel")).status_code == 409
    assert (await http.get("/v1/report")).status_code == 404


async def test_start_then_cancel_an_update(
    http: httpx.AsyncClient, agent: Agent, tmp_path: Path
) -> None:
    book = playbook(tmp_path, [{"plugin": "faults", "with": {"hang": 120}}])
    started = await http.post("/v1/updates", json={"playbook": str(book)})
    assert started.status_code == 202, started.text
    again = await http.post("/v1/updates", json={"playbook": str(book)})
    assert again.status_code == 409
    assert "already running" in again.json()["error"]
    with anyio.fail_after(60):
        while not hanging(agent.state_dir):  # noqa: ASYNC110  (the journal is a file)
            await anyio.sleep(0.05)
    assert (await http.post("/v1/cancel")).status_code == 202
    status = await wait_idle(http)
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled")
    report = await http.get("/v1/report")
    assert report.status_code == 200
    assert "prepare" in report.text


def test_liveupdate_run_goes_through_the_agent(tmp_path: Path) -> None:
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
    try:
        assert agent.stdout is not None
        assert "agent listening" in listening_line(agent.stdout)
        book = playbook(tmp_path, [{"plugin": "faults", "with": {"fail": "injected"}}])
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator.cli",
                "run",
                str(book),
                "--agent",
                str(control_socket_for(sock)),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 5, done.stdout + done.stderr
        assert "update cancelled" in done.stdout
        assert "injected" in done.stdout
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        if agent.stdout is not None:
            agent.stdout.close()
