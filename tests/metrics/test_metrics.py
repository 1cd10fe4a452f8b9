"""The metrics computed from real journals: the demo's, a cancelled run's, both."""

from __future__ import annotations

import os
import shutil
import stat
from typing import TYPE_CHECKING

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from orchestrator.errors import MetricsExportError
from orchestrator.observe._export import last_run_registry, write_textfile
from orchestrator.observe._metrics import METRIC_NAMES, register_metrics
from orchestrator.observe._runs import read_runs
from orchestrator.observe._status import summarize
from orchestrator.restore._journal import read_journal

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Demo

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_demo_metrics_equal_the_journal(demo: Demo) -> None:
    found = samples(generate_latest(last_run_registry(demo.state)).decode())
    status = demo.status
    assert status.blackout_s is not None
    assert value(found, "liveupdate_blackout_seconds_sum") == pytest.approx(
        status.blackout_s
    )
    assert value(found, "liveupdate_blackout_seconds_count") == 1
    assert value(found, "liveupdate_last_blackout_seconds") == pytest.approx(
        status.blackout_s
    )
    assert list(status.phases) == [
        "quiesce",
        "preserve",
        "prepare",
        "freeze",
        "kexec",
        "restore",
        "finish",
    ]
    for phase, seconds in status.phases.items():
        assert value(
            found, "liveupdate_phase_duration_seconds_sum", phase=phase
        ) == pytest.approx(seconds)
        assert value(
            found, "liveupdate_last_phase_duration_seconds", phase=phase
        ) == pytest.approx(seconds)
        assert value(found, "liveupdate_phase_duration_seconds_count", phase=phase) == 1
    assert value(found, "liveupdate_updates_total", outcome="completed") == 1
    assert value(found, "liveupdate_updates_total", outcome="cancelled") == 0
    assert value(found, "liveupdate_state", state="NORMAL") == 1
    assert value(found, "liveupdate_state", state="FROZEN") == 0
    assert value(found, "liveupdate_preserved_fds") == 2
    assert value(found, "liveupdate_preserved_bytes") == 2 * 128 * 2**20
    assert (
        value(
            found,
            "liveupdate_kernel_info",
            abi="merged",
            kernel="sim",
            liveupdate_number="1",
        )
        == 1
    )
    run_end = demo.records[-1]
    assert run_end["event"] == "run_end"
    assert value(found, "liveupdate_last_update_timestamp_seconds") == pytest.approx(
        run_end["wall"]
    )
    hooks = {
        dict(labels)["phase"]
        for name, labels in found
        if name == "liveupdate_hook_duration_seconds_count"
    }
    assert hooks == {"quiesce", "preserve", "prepare", "freeze", "restore", "finish"}
    # buckets are cumulative and end in +Inf
    le = [
        (dict(labels)["le"], v)
        for (name, labels), v in found.items()
        if name == "liveupdate_blackout_seconds_bucket"
    ]
    assert ("0.001", 0) in le
    assert ("+Inf", 1) in le
    assert len(le) == 16


def test_cancelled_run_metrics(cancelled: Path) -> None:
    found = samples(generate_latest(last_run_registry(cancelled)).decode())
    assert value(found, "liveupdate_updates_total", outcome="cancelled") == 1
    assert value(found, "liveupdate_updates_total", outcome="completed") == 0
    assert value(found, "liveupdate_cancelled_total", phase="freeze") == 1
    assert value(found, "liveupdate_cancelled_total", phase="quiesce") == 0
    assert (
        value(found, "liveupdate_hook_retries_total", plugin="faults", phase="prepare")
        == 2
    )
    assert (
        value(found, "liveupdate_hook_retries_total", plugin="kexec", phase="prepare")
        == 0
    )
    assert value(found, "liveupdate_last_run_outcome", outcome="cancelled") == 1
    assert value(found, "liveupdate_state", state="NORMAL") == 1
    assert value(found, "liveupdate_blackout_seconds_count") == 0, (
        "a cancelled update's blackout never ended in a new kernel"
    )
    assert ("liveupdate_last_blackout_seconds", frozenset()) not in found
    assert ("liveupdate_last_update_timestamp_seconds", frozenset()) not in found
    status = summarize(cancelled)
    for phase, seconds in status.phases.items():
        assert value(
            found, "liveupdate_phase_duration_seconds_sum", phase=phase
        ) == pytest.approx(seconds)


def test_cancelled_run_exported_itself_after_run(cancelled: Path) -> None:
    """``liveupdate run`` returned cancelled and wrote LIVEUPDATE_TEXTFILE."""
    found = samples((cancelled / "lu.prom").read_text())
    assert value(found, "liveupdate_updates_total", outcome="cancelled") == 1


def test_history_accumulates_every_run_and_rereads(
    demo: Demo, cancelled: Path, tmp_path: Path
) -> None:
    """Counters and histograms of ``serve`` cover every run of the journal and
    grow as it grows; the per-run export covers the last run only."""
    journal = tmp_path / "journal.jsonl"
    shutil.copy(demo.state / "journal.jsonl", journal)
    registry = CollectorRegistry(auto_describe=False)
    register_metrics(registry, tmp_path, history=True)
    first = samples(generate_latest(registry).decode())
    assert value(first, "liveupdate_updates_total", outcome="completed") == 1
    with open(journal, "ab") as f:
        f.write((cancelled / "journal.jsonl").read_bytes())
        f.write((demo.state / "journal.jsonl").read_bytes())
    found = samples(generate_latest(registry).decode())
    assert value(found, "liveupdate_updates_total", outcome="completed") == 2
    assert value(found, "liveupdate_updates_total", outcome="cancelled") == 1
    assert value(found, "liveupdate_blackout_seconds_count") == 2
    assert value(found, "liveupdate_phase_duration_seconds_count", phase="quiesce") == 3
    assert (
        value(found, "liveupdate_hook_retries_total", plugin="faults", phase="prepare")
        == 2
    )
    last = samples(generate_latest(last_run_registry(tmp_path)).decode())
    assert value(last, "liveupdate_updates_total", outcome="completed") == 1
    assert value(last, "liveupdate_updates_total", outcome="cancelled") == 0
    assert value(last, "liveupdate_blackout_seconds_count") == 1
    assert len(read_runs(read_journal(tmp_path))) == 3


def test_no_journal_yet(tmp_path: Path) -> None:
    found = samples(generate_latest(last_run_registry(tmp_path)).decode())
    assert value(found, "liveupdate_state", state="NORMAL") == 1
    assert value(found, "liveupdate_updates_total", outcome="completed") == 0


def test_textfile_is_atomic_and_has_no_timestamps(demo: Demo, tmp_path: Path) -> None:
    out = tmp_path / "liveupdate.prom"
    out.write_text("old contents\n")
    write_textfile(demo.state, out)
    assert sorted(os.listdir(tmp_path)) == ["liveupdate.prom"], "no temporary left"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    text = out.read_text()
    for line in text.splitlines():
        if not line.startswith("#"):
            rest = line.rsplit("}", 1)[1] if "}" in line else line.split(" ", 1)[1]
            assert len(rest.split()) == 1, f"a value and no timestamp: {line}"
    assert "liveupdate_blackout_seconds_sum" in text
    with pytest.raises(MetricsExportError, match="nosuchdir"):
        write_textfile(demo.state, tmp_path / "nosuchdir" / "x.prom")


def test_the_global_registry_is_untouched(demo: Demo) -> None:
    last_run_registry(demo.state)
    names = {m.name for m in REGISTRY.collect()}
    assert not {n for n in names if n.startswith("liveupdate")}
    assert all(n.startswith("liveupdate_") for n in METRIC_NAMES)
