"""Each export path against the real server that reads it.

After the README's main job (``liveupdate demo``), whose ``resume`` exported
by itself (``LIVEUPDATE_TEXTFILE``, ``LIVEUPDATE_PUSHGATEWAY``): node-exporter's
textfile collector, the Pushgateway and ``liveupdate metrics serve`` each
expose the phase and blackout metrics with the journal's values, and a real
Prometheus scraping them returns the same through its HTTP API.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from prometheus_client.registry import CollectorRegistry

from orchestrator.errors import MetricsExportError
from orchestrator.observe._export import parse_listen, push, serve_metrics
from orchestrator.observe._metrics import register_metrics

from ._runs import liveupdate
from ._servers import query
from .conftest import NODE_JOB, PUSH_JOB, SERVE_JOB
from .test_metrics import samples, value

if TYPE_CHECKING:
    from pathlib import Path

    from ._servers import Server
    from .conftest import Demo
    from .test_metrics import Samples


def assert_equal_to_journal(found: Samples, demo: Demo, **labels: str) -> None:
    status = demo.status
    assert status.blackout_s is not None
    assert value(found, "liveupdate_last_blackout_seconds", **labels) == pytest.approx(
        status.blackout_s
    )
    assert value(found, "liveupdate_blackout_seconds_sum", **labels) == pytest.approx(
        status.blackout_s
    )
    assert value(found, "liveupdate_blackout_seconds_count", **labels) == 1
    assert len(status.phases) == 7
    for phase, seconds in status.phases.items():
        assert value(
            found, "liveupdate_phase_duration_seconds_sum", phase=phase, **labels
        ) == pytest.approx(seconds)
        assert value(
            found, "liveupdate_last_phase_duration_seconds", phase=phase, **labels
        ) == pytest.approx(seconds)
    assert value(found, "liveupdate_updates_total", outcome="completed", **labels) == 1


def test_textfile_through_node_exporter(demo: Demo, node_exporter: Server) -> None:
    reply = node_exporter.get("/metrics")
    assert reply.status_code == 200
    assert "node_textfile_scrape_error 0" in reply.text, "node-exporter read the file"
    assert_equal_to_journal(samples(reply.text), demo)


def test_pushgateway_holds_the_run(demo: Demo, pushgateway: Server) -> None:
    import socket

    reply = pushgateway.get("/metrics")
    assert reply.status_code == 200
    group = {"job": "liveupdate", "instance": socket.gethostname()}
    assert_equal_to_journal(samples(reply.text), demo, **group)
    groups = pushgateway.get("/api/v1/metrics").json()["data"]
    assert [g["labels"] for g in groups] == [group], "one group per host, no run id"


def test_serve_endpoint(demo: Demo, serve: Server) -> None:
    reply = serve.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert_equal_to_journal(samples(reply.text), demo)
    assert serve.get("/nothing").status_code == 404


def test_prometheus_scrapes_the_journals_values(demo: Demo, prometheus: Server) -> None:
    status = demo.status
    assert status.blackout_s is not None
    for job in (SERVE_JOB, NODE_JOB, PUSH_JOB):
        (blackout,) = query(
            prometheus, f'liveupdate_last_blackout_seconds{{job="{job}"}}'
        )
        assert float(blackout["value"][1]) == pytest.approx(status.blackout_s), job
        (total,) = query(prometheus, f'liveupdate_blackout_seconds_sum{{job="{job}"}}')
        assert float(total["value"][1]) == pytest.approx(status.blackout_s), job
        phases = query(
            prometheus, f'liveupdate_phase_duration_seconds_sum{{job="{job}"}}'
        )
        got = {r["metric"]["phase"]: float(r["value"][1]) for r in phases}
        assert got == pytest.approx(status.phases), job
    (state,) = query(prometheus, f'liveupdate_state{{job="{SERVE_JOB}"}} == 1')
    assert state["metric"]["state"] == "NORMAL"


def test_push_command_replaces_the_hosts_group(demo: Demo, pushgateway: Server) -> None:
    done = liveupdate(
        "metrics",
        "push",
        "--state-dir",
        str(demo.state),
        "--gateway",
        pushgateway.url,
        "--instance",
        "other-host",
    )
    assert done.returncode == 0, done.stderr
    found = samples(pushgateway.get("/metrics").text)
    assert_equal_to_journal(found, demo, job="liveupdate", instance="other-host")
    response = httpx.delete(
        f"{pushgateway.url}/metrics/job/liveupdate/instance/other-host", timeout=30
    )
    assert response.status_code == 202


def test_push_to_nowhere_is_a_clear_error(demo: Demo) -> None:
    with pytest.raises(MetricsExportError, match=r"http://127\.0\.0\.1:1"):
        push(demo.state, "http://127.0.0.1:1", timeout=5)
    done = liveupdate(
        "metrics",
        "push",
        "--state-dir",
        str(demo.state),
        "--gateway",
        "http://127.0.0.1:1",
    )
    assert done.returncode == 1
    assert "metrics to http://127.0.0.1:1" in done.stderr


def test_textfile_command(demo: Demo, tmp_path: Path) -> None:
    out = tmp_path / "x.prom"
    done = liveupdate(
        "metrics", "textfile", "--state-dir", str(demo.state), "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert_equal_to_journal(samples(out.read_text()), demo)


def test_listen_address_is_checked() -> None:
    assert parse_listen("127.0.0.1:9731") == ("127.0.0.1", 9731)
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(MetricsExportError, match="HOST:PORT"):
        parse_listen("9731")


async def test_serve_rereads_the_journal_as_it_grows(
    demo: Demo, cancelled: Path, tmp_path: Path
) -> None:
    """In-process: the endpoint answers while the journal gains runs."""
    shutil.copy(demo.state / "journal.jsonl", tmp_path / "journal.jsonl")
    registry = CollectorRegistry(auto_describe=False)
    register_metrics(registry, tmp_path, history=True)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, registry, "127.0.0.1", 0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30
        ) as client:
            before = samples((await client.get("/metrics")).text)
            journal = await anyio.Path(tmp_path / "journal.jsonl").read_bytes()
            journal += await anyio.Path(cancelled / "journal.jsonl").read_bytes()
            await anyio.Path(tmp_path / "journal.jsonl").write_bytes(journal)
            after = samples((await client.get("/metrics")).text)
            head = await client.head("/metrics")
            post = await client.post("/metrics")
        tg.cancel_scope.cancel()
    assert value(before, "liveupdate_updates_total", outcome="cancelled") == 0
    assert value(after, "liveupdate_updates_total", outcome="cancelled") == 1
    assert value(after, "liveupdate_updates_total", outcome="completed") == 1
    assert value(after, "liveupdate_cancelled_total", phase="freeze") == 1
    assert value(after, "liveupdate_last_run_outcome", outcome="cancelled") == 1
    assert (head.status_code, head.content) == (200, b"")
    assert post.status_code == 405
