"""Rollouts of the luo.liveupdate collection across a fleet of simulated hosts.

Ansible reaches every host over real SSH; each host is a network, mount and
PID namespace whose simulated kexec ends all its processes (see
:mod:`tests.fleet._fleet`); a real Prometheus scrapes every host. Every
scenario asserts on the hosts themselves: their boot, kernel release,
liveupdate number, journal and the workload bytes their agent holds.

Each test installs a release of its own, so that no test depends on another's
leftovers: a host is "already current" only if this test updated it.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.metrics._servers import query

from ._fleet import wait_until
from ._host import METRICS_PORT, WORKLOAD_FAILS

if TYPE_CHECKING:
    import subprocess

    from tests.metrics._servers import Server

    from ._fleet import Fleet, Host

PLAYBOOKS = Path(__file__).parent / "playbooks"
DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "liveupdate.json"
)
ROLLOUT_BY_STATUS = (
    'sum by (status) (liveupdate_rollout_host_status{job="liveupdate_rollout"})'
)


def rollout_panel_queries() -> list[str]:
    """The dashboard's rollout panels' queries (they use no Grafana variable)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"]
        for panel in doc["panels"]
        for t in panel.get("targets", [])
        if "liveupdate_rollout_" in t["expr"]
    ]
    assert ROLLOUT_BY_STATUS in exprs
    return exprs


def _snapshot(host: Host) -> dict[str, Any]:
    info = host.kernel_info()
    return {
        "boot_id": info["boot_id"],
        "release": info["release"],
        "number": info["liveupdate_number"],
    }


def rollout(
    fleet: Fleet,
    workdir: Path,
    *,
    check: bool = False,
    forks: int | None = None,
    **variables: Any,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the role over the fleet; its process and the summary it wrote."""
    summary = workdir / "summary.json"
    summary.unlink(missing_ok=True)
    extra = {
        "rolling_update_playbook": "/media/playbook.yaml",
        "rolling_update_summary_file": str(summary),
        "rolling_update_reboot_timeout": 60,
        "rolling_update_resume_timeout": 60,
        "liveupdate_state_dir": "/media/state",
        **variables,
    }
    (workdir / "vars.json").write_text(json.dumps(extra))
    inventory = fleet.inventory(workdir / "inventory.json")
    proc = fleet.playbook(
        PLAYBOOKS / "rollout.yml",
        inventory,
        "-e",
        f"@{workdir / 'vars.json'}",
        *(("--forks", str(forks)) if forks else ()),
        check=check,
    )
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return proc, data


def _explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def _updated(host: Host, before: dict[str, Any], release: str) -> None:
    now = _snapshot(host)
    assert now["boot_id"] != before["boot_id"], host.name
    assert now["release"] == release, host.name
    assert now["number"] == before["number"] + 1, host.name
    status = host.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "completed"), status


def _untouched(host: Host, before: dict[str, Any]) -> None:
    assert _snapshot(host) == before, host.name


def _data_intact(fleet: Fleet, host: Host) -> None:
    wait_until(f"{host.name} up", host.up)
    assert host.data_digest() == fleet.digests[host.name], host.name


def test_canary_and_waves_complete(
    healthy: Fleet, prometheus: Server, pushgateway: Server, workdir: Path
) -> None:
    fleet = healthy
    release = fleet.target("6.19.1-waves")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(
        fleet,
        workdir,
        rolling_update_target_kernel=release,
        rolling_update_prometheus_url=prometheus.url,
        rolling_update_blackout_budget=30,
        rolling_update_gate_interval=1,
        rolling_update_gate_successes=2,
        rolling_update_gate_timeout=60,
        rolling_update_pushgateway_url=pushgateway.url,
    )
    assert proc.returncode == 0, _explain(proc)
    for host in fleet.hosts:
        _updated(host, before[host.name], release)
        _data_intact(fleet, host)
    assert sorted(summary["updated"]) == sorted(h.name for h in fleet.hosts)
    assert summary["failed"] == summary["not_started"] == []
    # 4 hosts in waves of 1, 10% (1), 50% (2): three waves, three gates passed.
    # (ansible-core 2.18 templates the wave number as a string, 2.19 as an int)
    waves = [str(r["wave"]) for r in sorted(summary["hosts"], key=lambda r: r["host"])]
    assert waves == ["1", "2", "3", "3"]
    assert [g["passed"] for g in summary["gates"]] == [True, True, True]
    blackouts = [float(r["blackout_s"]) for r in summary["hosts"]]
    assert float(summary["blackout_max_s"]) == max(blackouts)
    assert float(summary["blackout_p50_s"]) == sorted(blackouts)[1]
    # Each host's result reached the Pushgateway; the dashboard's rollout
    # panels show them once Prometheus has scraped it.
    by_status = wait_until(
        "the rollout in Prometheus",
        lambda: (
            {
                s["metric"]["status"]: float(s["value"][1])
                for s in query(prometheus, ROLLOUT_BY_STATUS)
            }.get("updated")
            == 4
            and query(prometheus, ROLLOUT_BY_STATUS)
        ),
    )
    assert {s["metric"]["status"]: s["value"][1] for s in by_status}["failed"] == "0"
    for expr in rollout_panel_queries():
        assert query(prometheus, expr), expr

    # Run again: every host is already current, nothing reboots.
    again = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(fleet, workdir, rolling_update_target_kernel=release)
    assert proc.returncode == 0, _explain(proc)
    assert sorted(summary["already_current"]) == sorted(again)
    for host in fleet.hosts:
        _untouched(host, again[host.name])


def test_refused_freeze_cancels_the_host_and_stops_the_rollout_then_resumes(
    healthy: Fleet, workdir: Path
) -> None:
    """host1 (wave 2) has a kernel that refuses the freeze: it is cancelled, back
    in NORMAL on the same boot with its bytes intact, and wave 3 is never
    started. Run again once the fault is gone: host0 is already current, the
    rest are updated."""
    fleet = healthy
    canary, bad, *later = fleet.hosts
    release = fleet.target("6.19.2-freeze")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    bad.kernel.inject_fault("freeze", "EIO")
    proc, summary = rollout(fleet, workdir, rolling_update_target_kernel=release)
    assert proc.returncode != 0, _explain(proc)
    _updated(canary, before[canary.name], release)
    _untouched(bad, before[bad.name])
    status = bad.status()
    assert (status["state"], status["outcome"]) == ("NORMAL", "cancelled"), status
    _data_intact(fleet, bad)
    for host in later:
        _untouched(host, before[host.name])
    assert summary["updated"] == [canary.name]
    assert summary["failed"] == [bad.name]
    assert sorted(summary["not_started"]) == sorted(h.name for h in later)
    (result,) = [r for r in summary["hosts"] if r["host"] == bad.name]
    assert result["cancelled"] is True
    assert "back in NORMAL and was not rebooted" in result["msg"], result
    assert "wave 2" in summary["stop_reason"]

    bad.kernel.inject_fault("freeze", None)
    middle = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(fleet, workdir, rolling_update_target_kernel=release)
    assert proc.returncode == 0, _explain(proc)
    _untouched(canary, middle[canary.name])
    for host in (bad, *later):
        _updated(host, middle[host.name], release)
        _data_intact(fleet, host)
    assert summary["already_current"] == [canary.name]
    assert sorted(summary["updated"]) == sorted(h.name for h in (bad, *later))


def _gate_rollout(
    fleet: Fleet, prometheus: Server, workdir: Path, release: str, **variables: Any
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, Any]]:
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(
        fleet,
        workdir,
        rolling_update_target_kernel=release,
        rolling_update_prometheus_url=prometheus.url,
        rolling_update_gate_interval=1,
        rolling_update_gate_successes=2,
        rolling_update_waves=[1, "100%"],
        **variables,
    )
    canary, *rest = fleet.hosts
    _updated(canary, before[canary.name], release)
    for host in rest:
        _untouched(host, before[host.name])
    assert proc.returncode != 0, _explain(proc)
    assert summary["updated"] == [canary.name]
    assert sorted(summary["not_started"]) == sorted(h.name for h in rest)
    (gate,) = summary["gates"]
    assert gate["passed"] is False
    return proc, summary, gate


def _gate_values(gate: dict[str, Any], check: str) -> list[Any]:
    """Every value the gate's *check* saw, round after round."""
    return [
        v["value"]
        for r in gate["rounds"]
        for c in r["checks"]
        if c["name"] == check
        for v in c["values"]
    ]


def test_gate_sees_a_blackout_over_budget_and_stops(
    healthy: Fleet, prometheus: Server, workdir: Path
) -> None:
    release = healthy.target("6.19.3-budget")
    _, summary, gate = _gate_rollout(
        healthy,
        prometheus,
        workdir,
        release,
        rolling_update_blackout_budget=0.000001,
        rolling_update_gate_timeout=60,
    )
    assert gate["reason"].startswith("blackout under budget: "), gate
    seen = _gate_values(gate, "blackout under budget")
    assert seen, gate
    assert seen[-1] > 0.000001
    assert summary["stop_reason"].startswith(
        "wave 1: gate failed: blackout under budget: "
    ), summary


def test_gate_with_no_data_holds_then_fails_at_its_deadline(
    healthy: Fleet, prometheus: Server, workdir: Path
) -> None:
    release = healthy.target("6.19.4-nodata")
    _, _, gate = _gate_rollout(
        healthy,
        prometheus,
        workdir,
        release,
        rolling_update_gate_timeout=4,
        rolling_update_gate_checks=[
            {
                "name": "never exported",
                "query": 'liveupdate_no_such_metric{instance=~"{{ _luo_wave_instances }}"}',
                "condition": "== 1",
            }
        ],
    )
    assert gate["reason"] == "deadline: never exported: no data after 4 s", gate
    # It held: evaluated again and again, every round without data.
    assert len(gate["rounds"]) >= 3
    assert all(r["checks"][0]["no_data"] for r in gate["rounds"])


def test_gate_sees_a_workload_that_did_not_come_back_and_stops(
    healthy: Fleet, prometheus: Server, workdir: Path
) -> None:
    """The canary's update completes, but its workload exits as it starts in
    the new boot: the default gate's "workloads healthy" check sees it (the
    host's metrics endpoint reads the workload's published pid) and no later
    wave is started."""
    fleet = healthy
    canary = fleet.hosts[0]
    release = fleet.target("6.19.15-workload")
    assert (
        query(
            prometheus,
            f'liveupdate_workload_running{{instance="{canary.address}:{METRICS_PORT}",'
            'workload="app"}',
        )[0]["value"][1]
        == "1"
    )
    (canary.disk / WORKLOAD_FAILS).touch()
    try:
        _, summary, gate = _gate_rollout(
            fleet,
            prometheus,
            workdir,
            release,
            rolling_update_blackout_budget=30,
            rolling_update_gate_timeout=10,
        )
    finally:
        (canary.disk / WORKLOAD_FAILS).unlink()
        canary.kernel.reboot_cold()  # boots again, its workload with it
        wait_until(f"{canary.name} up", canary.up)
        fleet.digests[canary.name] = fleet.register_data(canary)
    assert gate["reason"].startswith("workloads healthy: "), gate
    seen = _gate_values(gate, "workloads healthy")
    assert seen, gate
    assert seen[-1] == 1, gate
    assert "gate failed" in summary["stop_reason"]


def test_unreachable_host_stops_the_rollout(healthy: Fleet, workdir: Path) -> None:
    fleet = healthy
    canary, lost, *later = fleet.hosts
    release = fleet.target("6.19.5-link")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    lost.set_link(False)
    proc, summary = rollout(fleet, workdir, rolling_update_target_kernel=release)
    lost.set_link(True)
    assert proc.returncode != 0, _explain(proc)
    _updated(canary, before[canary.name], release)
    for host in (lost, *later):
        _untouched(host, before[host.name])
    (result,) = [r for r in summary["hosts"] if r["host"] == lost.name]
    assert result["status"] == "unreachable"
    assert summary["failed"] == [lost.name]
    assert sorted(summary["not_started"]) == sorted(h.name for h in later)


def test_host_not_back_within_reboot_timeout_fails_and_stops(
    healthy: Fleet, workdir: Path
) -> None:
    """The canary's kexec happens, but the host it boots has no sshd: the task
    fails at reboot_timeout and no later wave is touched."""
    fleet = healthy
    canary, *rest = fleet.hosts
    release = fleet.target("6.19.11-gone")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    (canary.disk / "no-sshd").touch()
    try:
        proc, summary = rollout(
            fleet,
            workdir,
            rolling_update_target_kernel=release,
            rolling_update_reboot_timeout=5,
        )
    finally:
        (canary.disk / "no-sshd").unlink()
        canary.kernel.reboot_cold()  # boots again, with sshd
        wait_until(f"{canary.name} up", canary.up)
        # A cold boot carries nothing: the workload hands its data over again.
        fleet.digests[canary.name] = fleet.register_data(canary)
    assert proc.returncode != 0
    (result,) = [r for r in summary["hosts"] if r["host"] == canary.name]
    assert result["status"] == "failed"
    assert "did not come back within reboot_timeout (5 s)" in result["msg"], result
    for host in rest:
        _untouched(host, before[host.name])
    assert sorted(summary["not_started"]) == sorted(h.name for h in rest)


def test_facts_are_the_hosts_own(healthy: Fleet, workdir: Path) -> None:
    fleet = healthy
    out = workdir / "facts.json"
    inventory = fleet.inventory(workdir / "inventory.json")
    proc = fleet.playbook(
        PLAYBOOKS / "facts.yml",
        inventory,
        "-e",
        f"out={out} target={fleet.hosts[0].kernel.release()}",
    )
    assert proc.returncode == 0, _explain(proc)
    facts = json.loads(out.read_text())
    assert len(facts) == len(fleet.hosts)
    for host, fact in zip(fleet.hosts, facts, strict=True):
        info = host.kernel_info()
        assert fact["boot_id"] == info["boot_id"]
        assert fact["running_kernel"] == info["release"]
        assert fact["liveupdate_number"] == info["liveupdate_number"]
        assert fact["possible"] is True
        assert fact["abi"] == "merged"
        assert fact["agent_running"] is True
        assert fact["agent_updating"] is False
        assert fact["last_update"]["state"] == host.status()["state"]
    assert facts[0]["target_running"] is True


def test_facts_say_when_the_liveupdate_command_is_missing(
    healthy: Fleet, workdir: Path
) -> None:
    inventory = healthy.inventory(workdir / "inventory.json")
    proc = healthy.playbook(
        PLAYBOOKS / "facts.yml",
        inventory,
        "-e",
        f"out={workdir / 'facts.json'} liveupdate_command=/nonexistent/liveupdate",
    )
    assert proc.returncode != 0
    assert (
        "the liveupdate command '/nonexistent/liveupdate' is not on this host"
        in proc.stdout
    ), _explain(proc)
    assert not (workdir / "facts.json").exists()


def _pushed(pushgateway: Server) -> list[str]:
    """The rollout results the Pushgateway holds, as exposition lines."""
    text = httpx.get(f"{pushgateway.url}/metrics", timeout=10).text
    return [x for x in text.splitlines() if x.startswith("liveupdate_rollout_")]


def test_check_mode_changes_nothing(
    healthy: Fleet, pushgateway: Server, workdir: Path
) -> None:
    """Not the hosts, and not the dashboard's last results: a check run pushes
    nothing to the Pushgateway (the summary file, on the controller, is
    written)."""
    fleet = healthy
    release = fleet.target("6.19.6-check")
    before = {h.name: (_snapshot(h), h.status()) for h in fleet.hosts}
    pushed = _pushed(pushgateway)
    proc, summary = rollout(
        fleet,
        workdir,
        check=True,
        rolling_update_target_kernel=release,
        rolling_update_pushgateway_url=pushgateway.url,
    )
    assert proc.returncode == 0, _explain(proc)
    for host in fleet.hosts:
        assert (_snapshot(host), host.status()) == before[host.name]
    assert summary["updated"] == []
    assert sorted(r["status"] for r in summary["hosts"]) == ["planned"] * 4
    assert _pushed(pushgateway) == pushed
    assert "blackout p50 - s, max - s" in proc.stdout, _explain(proc)


def test_closed_window_starts_no_host(healthy: Fleet, workdir: Path) -> None:
    fleet = healthy
    release = fleet.target("6.19.7-window")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(
        fleet,
        workdir,
        rolling_update_target_kernel=release,
        rolling_update_not_after="2020-01-01T00:00:00+00:00",
    )
    assert proc.returncode == 0, _explain(proc)
    for host in fleet.hosts:
        _untouched(host, before[host.name])
    assert summary["window_closed"] is True
    assert sorted(summary["not_started"]) == sorted(h.name for h in fleet.hosts)


def _slow(host: Host, seconds: int) -> None:
    """Make *host*'s update (of the last :meth:`Fleet.target`) hang in quiesce."""
    book = host.disk / "playbook.yaml"
    book.write_text(
        book.read_text().replace(
            "phases:\n",
            "phases:\n"
            "  quiesce:\n"
            "    steps:\n"
            f"      - {{plugin: faults, timeout: 120s, with: {{hang: {seconds}}}}}\n",
        )
    )


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_window_closing_during_the_canary_starts_no_later_wave(
    healthy: Fleet, workdir: Path
) -> None:
    """The window closes while the canary updates: the canary finishes, and the
    role starts no later wave -- it does not even reach its hosts (one of them
    is unreachable, and is not counted failed). The play ends cleanly."""
    fleet = healthy
    canary, lost, *later = fleet.hosts
    release = fleet.target("6.19.13-window-waves")
    _slow(canary, 25)
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    lost.set_link(False)
    try:
        proc, summary = rollout(
            fleet,
            workdir,
            rolling_update_target_kernel=release,
            rolling_update_waves=[1, "100%"],
            rolling_update_not_after=_in(15),
        )
    finally:
        lost.set_link(True)
    assert proc.returncode == 0, _explain(proc)
    _updated(canary, before[canary.name], release)
    _data_intact(fleet, canary)
    for host in (lost, *later):
        _untouched(host, before[host.name])
    assert summary["updated"] == [canary.name]
    assert summary["failed"] == []
    assert sorted(summary["not_started"]) == sorted(h.name for h in (lost, *later))
    assert summary["window_closed"] is True
    assert summary["stop_reason"].endswith("before wave 2"), summary
    assert f"not started: {lost.name}, " in proc.stdout, _explain(proc)


def test_window_closing_during_a_wave_leaves_no_host_half_updated(
    healthy: Fleet, workdir: Path
) -> None:
    """One wave of four, two hosts at a time: the window closes while the first
    two update. They finish (NORMAL, completed, data intact); the other two are
    never started; the play ends cleanly and says which were not started."""
    fleet = healthy
    first = fleet.hosts[:2]
    rest = fleet.hosts[2:]
    release = fleet.target("6.19.14-window-wave")
    for host in first:
        _slow(host, 25)
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(
        fleet,
        workdir,
        forks=2,
        rolling_update_target_kernel=release,
        rolling_update_waves=["100%"],
        rolling_update_not_after=_in(15),
    )
    assert proc.returncode == 0, _explain(proc)
    for host in first:
        _updated(host, before[host.name], release)
        _data_intact(fleet, host)
    for host in rest:
        _untouched(host, before[host.name])
        assert host.status()["state"] == "NORMAL"
    assert sorted(summary["updated"]) == sorted(h.name for h in first)
    assert sorted(summary["not_started"]) == sorted(h.name for h in rest)
    assert summary["failed"] == []
    assert summary["window_closed"] is True
    assert summary["stop_reason"].endswith("during wave 1"), summary
    for result in summary["hosts"]:
        if result["host"] in {h.name for h in rest}:
            assert "maintenance window closed" in result["msg"], result
    assert "not started: {}, {}".format(*(h.name for h in rest)) in proc.stdout


@pytest.mark.parametrize(
    ("variables", "said"),
    [
        pytest.param(
            {"rolling_update_wavez": [1], "rolling_update_target_kernel": "x"},
            "unknown variable(s) rolling_update_wavez",
            id="unknown-variable",
        ),
        pytest.param(
            {
                "rolling_update_reboot_timeout": "soon",
                "rolling_update_target_kernel": "x",
            },
            "rolling_update_reboot_timeout",
            id="wrong-type",
        ),
        pytest.param({}, "rolling_update_target_kernel", id="missing-target"),
    ],
)
def test_bad_role_variables_fail_before_any_host_is_touched(
    healthy: Fleet, workdir: Path, variables: dict[str, Any], said: str
) -> None:
    fleet = healthy
    fleet.target("6.19.8-bad")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(fleet, workdir, **variables)
    assert proc.returncode != 0
    assert said in proc.stdout, _explain(proc)
    assert summary == {}
    for host in fleet.hosts:
        _untouched(host, before[host.name])
    assert "Live-update this wave" not in proc.stdout


def test_host_without_luo_fails_preflight_with_probes_reason(
    healthy: Fleet, workdir: Path
) -> None:
    """The hosts probe the real kernel, which has no /dev/liveupdate here: the
    canary fails preflight with probe's reason, not as a cancelled update, and
    no host is updated."""
    fleet = healthy
    release = fleet.target("6.19.9-noluo")
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(
        fleet,
        workdir,
        rolling_update_target_kernel=release,
        liveupdate_kernel="real",
    )
    assert proc.returncode != 0
    for host in fleet.hosts:
        _untouched(host, before[host.name])
    (result,) = [r for r in summary["hosts"] if r["host"] == fleet.hosts[0].name]
    assert result["status"] == "failed"
    assert result["cancelled"] is False
    assert result["msg"].startswith("preflight: no /dev/liveupdate"), result


def test_host_already_updating_is_told_so_and_not_counted_failed(
    healthy: Fleet, workdir: Path
) -> None:
    """Another update runs on the canary (its agent holds the host lock): the
    rollout says so, counts the canary busy rather than failed, and stops;
    the update that was running is left alone."""
    fleet = healthy
    canary = fleet.hosts[0]
    release = fleet.target("6.19.10-busy")
    (canary.disk / "hang.yaml").write_text(
        "name: maintenance\n"
        "kernel: sim:/media/kernel\n"
        "state_dir: /media/state\n"
        "phases:\n"
        "  quiesce:\n"
        "    steps:\n"
        "      - {plugin: faults, timeout: 300s, with: {hang: 300}}\n"
    )
    before = {h.name: _snapshot(h) for h in fleet.hosts}
    control = canary.root / "run" / "liveupdate" / "control.sock"
    transport = httpx.HTTPTransport(uds=str(control))
    with httpx.Client(
        transport=transport, base_url="http://agent", timeout=30
    ) as agent:
        started = agent.post("/v1/updates", json={"playbook": "/media/hang.yaml"})
        assert started.status_code == 202, started.text
        try:
            proc, summary = rollout(
                fleet, workdir, rolling_update_target_kernel=release
            )
            assert agent.get("/v1/status").json()["agent"]["updating"] is True
        finally:
            assert agent.post("/v1/cancel").status_code == 202
        wait_until(
            "the maintenance update cancelled",
            lambda: not agent.get("/v1/status").json()["agent"]["updating"],
        )
    assert proc.returncode != 0
    for host in fleet.hosts:
        _untouched(host, before[host.name])
    assert summary["busy"] == [canary.name]
    assert summary["failed"] == []
    (result,) = [r for r in summary["hosts"] if r["host"] == canary.name]
    assert "another update is running on this host" in result["msg"], result
    assert canary.status()["outcome"] == "cancelled"
    _data_intact(fleet, canary)


def test_second_update_racing_past_preflight_is_refused_by_the_host_lock(
    healthy: Fleet, workdir: Path
) -> None:
    """Two live_update runs on one host, the second past its preflight before
    the first starts: the agent refuses the second (409 ``update_running``,
    ``liveupdate run`` exits 7), which fails that run with the reason; the
    first is not disturbed and completes, the data intact.

    The race is made deterministic with a seam, not a fake: the second run's
    ``liveupdate_command`` is a script on the host that holds ``plan`` until
    the first update runs, then execs the real ``liveupdate``.
    """
    fleet = healthy
    canary = fleet.hosts[0]
    release = fleet.target("6.19.12-race")
    book = (canary.disk / "playbook.yaml").read_text()
    (canary.disk / "slow.yaml").write_text(
        book.replace(
            "phases:\n",
            "phases:\n"
            "  quiesce:\n"
            "    steps:\n"
            "      - {plugin: faults, timeout: 300s,"
            " with: {hang: 240, until: /media/release-first}}\n",
        )
    )
    held = canary.disk / "held-liveupdate"
    held.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = plan ]; then\n'
        "  touch /media/second-planning\n"
        "  while [ ! -e /media/go ]; do sleep 0.1; done\n"
        "fi\n"
        f'exec {Path(sys.executable).parent / "liveupdate"} "$@"\n'
    )
    held.chmod(0o755)
    before = _snapshot(canary)
    inventory = fleet.inventory(workdir / "inventory.json")

    def start(name: str, **variables: str) -> subprocess.Popen[str]:
        extra = {
            "target_host": canary.name,
            "release": release,
            "out": str(workdir / f"{name}.json"),
            **variables,
        }
        (workdir / f"{name}-vars.json").write_text(json.dumps(extra))
        return fleet.start_playbook(
            PLAYBOOKS / "update.yml",
            inventory,
            "-e",
            f"@{workdir / f'{name}-vars.json'}",
        )

    control = canary.root / "run" / "liveupdate" / "control.sock"
    transport = httpx.HTTPTransport(uds=str(control))
    first = second = None
    try:
        with httpx.Client(
            transport=transport, base_url="http://agent", timeout=30
        ) as agent:
            second = start(
                "second", book="/media/playbook.yaml", command="/media/held-liveupdate"
            )
            wait_until(
                "the second run past preflight",
                (canary.disk / "second-planning").exists,
                120,
            )
            assert agent.get("/v1/status").json()["agent"]["updating"] is False
            first = start("first", book="/media/slow.yaml")
            wait_until(
                "the first update running",
                lambda: agent.get("/v1/status").json()["agent"]["updating"],
                120,
            )
            (canary.disk / "go").touch()
            out, err = second.communicate(timeout=240)
            assert agent.get("/v1/status").json()["agent"]["updating"] is True
            (canary.disk / "release-first").touch()  # the first may go on now
        out1, err1 = first.communicate(timeout=240)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        for name in (
            "held-liveupdate",
            "second-planning",
            "go",
            "slow.yaml",
            "release-first",
        ):
            (canary.disk / name).unlink(missing_ok=True)
    refused = json.loads((workdir / "second.json").read_text())
    assert refused["failed"] is True, (refused, out, err)
    assert refused["locked"] is True, refused
    assert refused["changed"] is False
    assert refused["outcome"] == "not started"
    assert "another update is running on this host" in refused["msg"], refused
    assert not refused["msg"].startswith("preflight"), refused
    done = json.loads((workdir / "first.json").read_text())
    assert done.get("failed") is not True, (done, out1, err1)
    assert (done["changed"], done["outcome"]) == (True, "completed"), done
    _updated(canary, before, release)
    _data_intact(fleet, canary)


def test_invalid_promql_fails_the_gate_with_prometheus_message(
    fleet: Fleet, prometheus: Server, workdir: Path
) -> None:
    out = workdir / "gate.json"
    extra = {
        "url": prometheus.url,
        "out": str(out),
        "checks": [{"name": "bad", "query": "sum(", "condition": "== 0"}],
    }
    (workdir / "vars.json").write_text(json.dumps(extra))
    (workdir / "hosts").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    proc = fleet.playbook(
        PLAYBOOKS / "gate.yml", workdir / "hosts", "-e", f"@{workdir / 'vars.json'}"
    )
    assert proc.returncode == 0, _explain(proc)
    gate = json.loads(out.read_text())
    assert gate["failed"] is True
    assert gate["passed"] is False
    assert gate["reason"].startswith("Prometheus: bad_data: "), gate
    assert "parse error" in gate["reason"]
