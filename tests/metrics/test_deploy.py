"""deploy/: the Prometheus rules (promtool) and the Grafana dashboard's queries.

Every PromQL query of the dashboard runs against a real Prometheus that
scraped the demo update (the endpoint, node-exporter's textfile and the
Pushgateway), with Grafana's variables replaced as Grafana would expand them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._servers import need, query

if TYPE_CHECKING:
    from ._servers import Server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "liveupdate.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "liveupdate.json"
VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "5m",
    "$__interval": "5m",
    "$host": ".*",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("promtool"), *args],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_rules_check() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_rules_unit_tests() -> None:
    done = promtool("test", "rules", "liveupdate.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


ROLLOUT = "liveupdate_rollout_"
"""The rollout panels' metrics, pushed by the fleet role: tests/fleet checks them."""


def dashboard_queries(*, rollout: bool = False) -> list[pytest.ParameterSet]:
    """The dashboard's queries, Grafana's variables expanded: the host panels'
    (default), or the rollout panels' (*rollout*)."""
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    found = []
    for panel in doc["panels"]:
        targets = panel.get("targets", [])
        if any(ROLLOUT in t["expr"] for t in targets) != rollout:
            continue
        for target in targets:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unexpanded variable in {target['expr']}"
            found.append(pytest.param(expr, id=f"{panel['title']}/{target['refId']}"))
    return found


def test_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "liveupdate"
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "host"}
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert len(dashboard_queries()) >= 15
    assert len(dashboard_queries(rollout=True)) >= 4
    exprs = " ".join(p.values[0] for p in dashboard_queries())  # type: ignore[misc]
    for metric in ("blackout", "phase_duration", "updates_total", "retries_total"):
        assert re.search(rf"liveupdate_\w*{metric}", exprs), metric


@pytest.mark.parametrize("expr", dashboard_queries())
def test_dashboard_query_returns_data(expr: str, prometheus: Server) -> None:
    result = query(prometheus, expr)
    assert result, f"no data for {expr}"
