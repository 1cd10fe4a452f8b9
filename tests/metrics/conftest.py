"""Fixtures: the README's main job run once, and real Prometheus servers around it.

``demo`` runs ``liveupdate demo`` with ``LIVEUPDATE_TEXTFILE`` and
``LIVEUPDATE_PUSHGATEWAY`` set, so its ``resume`` exports by itself to the
node-exporter textfile directory and the Pushgateway started here; then
``liveupdate metrics serve`` serves the same journal, and a Prometheus
scrapes all three.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from orchestrator.observe._status import Status, summarize
from orchestrator.restore._journal import read_journal

from ._runs import cancelled_run, liveupdate, stop_workloads
from ._servers import Server, free_port, need, query, running, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

SERVE_JOB = "liveupdate-serve"
NODE_JOB = "node"
PUSH_JOB = "liveupdate"  # honor_labels keeps the job the orchestrator pushed


@dataclass
class Demo:
    state: Path
    status: Status
    textfile: Path
    records: list[dict[str, Any]]


@pytest.fixture(scope="session")
def textfile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("textfile")


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    binary = need("prometheus-pushgateway")
    tmp = tmp_path_factory.mktemp("pushgateway")
    port = free_port()
    argv = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        f"--persistence.file={tmp / 'data'}",
    ]
    with running(
        "pushgateway", argv, f"http://127.0.0.1:{port}", "/-/ready", tmp / "log"
    ) as server:
        yield server


@pytest.fixture(scope="session")
def node_exporter(
    tmp_path_factory: pytest.TempPathFactory, textfile_dir: Path
) -> Iterator[Server]:
    binary = need("prometheus-node-exporter")
    tmp = tmp_path_factory.mktemp("node-exporter")
    port = free_port()
    argv = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfile_dir}",
    ]
    with running(
        "node-exporter", argv, f"http://127.0.0.1:{port}", "/metrics", tmp / "log"
    ) as server:
        yield server


@pytest.fixture(scope="session")
def demo(
    tmp_path_factory: pytest.TempPathFactory, textfile_dir: Path, pushgateway: Server
) -> Iterator[Demo]:
    """``liveupdate demo`` (the README's main job), exporting after its resume."""
    state = tmp_path_factory.mktemp("demo") / "state"
    textfile = textfile_dir / "liveupdate.prom"
    done = liveupdate(
        "demo",
        "--state-dir",
        str(state),
        env={
            "LIVEUPDATE_TEXTFILE": str(textfile),
            "LIVEUPDATE_PUSHGATEWAY": pushgateway.url,
        },
    )
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"metrics written to {textfile}" in done.stdout
        assert f"metrics pushed to {pushgateway.url}" in done.stdout
        status = summarize(state)
        assert status.outcome == "completed"
        yield Demo(state, status, textfile, read_journal(state))
    finally:
        stop_workloads(state)


@pytest.fixture(scope="session")
def cancelled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The state dir of an update that retried in prepare and was cancelled in
    freeze; exported by itself to a textfile after ``run`` returned."""
    state = tmp_path_factory.mktemp("cancelled") / "state"
    state.mkdir()
    done = cancelled_run(state, env={"LIVEUPDATE_TEXTFILE": str(state / "lu.prom")})
    try:
        assert done.returncode == 5, done.stdout + done.stderr
        yield state
    finally:
        stop_workloads(state)


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory, demo: Demo) -> Iterator[Server]:
    """``liveupdate metrics serve`` on the demo's journal."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "metrics",
        "serve",
        "--state-dir",
        str(demo.state),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    with running(
        "liveupdate metrics serve",
        argv,
        f"http://127.0.0.1:{port}",
        "/metrics",
        tmp / "log",
    ) as server:
        yield server


def prometheus_config(serve: Server, node: Server, push: Server) -> dict[str, Any]:
    def target(server: Server) -> list[dict[str, list[str]]]:
        return [{"targets": [server.url.removeprefix("http://")]}]

    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": SERVE_JOB, "static_configs": target(serve)},
            {"job_name": NODE_JOB, "static_configs": target(node)},
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "static_configs": target(push),
            },
        ],
    }


@pytest.fixture(scope="session")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory,
    serve: Server,
    node_exporter: Server,
    pushgateway: Server,
) -> Iterator[Server]:
    """A real Prometheus scraping the endpoint, node-exporter and the
    Pushgateway every second; ready once it holds a few samples of each."""
    binary = need("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(serve, node_exporter, pushgateway)))
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(
        "prometheus", argv, f"http://127.0.0.1:{port}", "/-/ready", tmp / "log"
    ) as server:
        # at least three samples from every source: rate() needs two
        wait_for(
            "three scrapes of every source",
            lambda: (
                len(
                    query(
                        server,
                        "count_over_time(liveupdate_last_blackout_seconds[5m]) >= 3",
                    )
                )
                == 3
            ),
            proc=server.proc,
            log=server.log,
        )
        yield server
