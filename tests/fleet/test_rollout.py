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
from typing import TYPE_CHECKING, Any

from ._fleet import wait_until

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    from tests.metrics._servers import Server

    from ._fleet import Fleet, Host

PLAYBOOKS = __import__("pathlib").Path(__file__).parent / "playbooks"


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
    healthy: Fleet, prometheus: Server, workdir: Path
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
    )
    assert proc.returncode == 0, _explain(proc)
    for host in fleet.hosts:
        _updated(host, before[host.name], release)
        _data_intact(fleet, host)
    assert sorted(summary["updated"]) == sorted(h.name for h in fleet.hosts)
    assert summary["failed"] == summary["not_started"] == []
    # 4 hosts in waves of 1, 10% (1), 50% (2): three waves, three gates passed.
    assert [r["wave"] for r in sorted(summary["hosts"], key=lambda r: r["host"])] == [
        "1",
        "2",
        "3",
        "3",
    ]
    assert [g["passed"] for g in summary["gates"]] == [True, True, True]
    blackouts = [float(r["blackout_s"]) for r in summary["hosts"]]
    assert float(summary["blackout_max_s"]) == max(blackouts)
    assert float(summary["blackout_p50_s"]) == sorted(blackouts)[1]

    # Run again: every host is already current, nothing reboots.
    again = {h.name: _snapshot(h) for h in fleet.hosts}
    proc, summary = rollout(fleet, workdir, rolling_update_target_kernel=release)
    assert proc.returncode == 0, _explain(proc)
    assert sorted(summary["already_current"]) == sorted(again)
    for host in fleet.hosts:
        _untouched(host, again[host.name])
