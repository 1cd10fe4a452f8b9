"""Prometheus metrics of live updates, computed from the journal.

Nothing is measured while the update runs: the engine journals every step
with wall-clock time, monotonic time and the boot id (``_journal.py``), and
the metrics are computed afterwards from those records (``_runs.py``). So
they are right after the kexec, when the process that started the update is
gone, and nothing of this stack runs in the blackout window. Durations within
one boot are differences of the monotonic clock; the kexec and the blackout
span two kernels and are differences of the wall clock (the monotonic clock
restarts with the new kernel) -- the same rule as ``liveupdate status``.

A :class:`JournalCollector` is registered on a ``CollectorRegistry`` the
caller passes in (never the global one), in one of two scopes:

- ``history=True`` (``liveupdate metrics serve``, a long-running process):
  counters and histograms hold every run of the journal (it keeps them all),
  re-read when the journal changes, so they only grow, as Prometheus expects;
- ``history=False`` (the textfile and the Pushgateway, written once per run):
  counters and histograms hold the observations of the last run only.

Gauges (state, last blackout, last phase durations, preserved fds and bytes,
kernel info, last update time) describe the host now and are the same in
both scopes. Known label values are exported at 0 (outcomes, the phases an
update can be cancelled in, the retries of every hook that ran), so that
queries and alerts see a series before the first event.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from orchestrator.restore._journal import read_journal

from ._runs import CANCELLABLE_PHASES, OUTCOMES, STATES, read_runs

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from pathlib import Path

    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._runs import Run

logger = logging.getLogger(__name__)

BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Histogram buckets, 1 ms to 60 s (plus +Inf)."""

METRIC_NAMES = (
    "liveupdate_phase_duration_seconds",
    "liveupdate_blackout_seconds",
    "liveupdate_vm_blackout_seconds",
    "liveupdate_last_plugin_blackout_seconds",
    "liveupdate_hook_duration_seconds",
    "liveupdate_hook_retries_total",
    "liveupdate_updates_total",
    "liveupdate_cancelled_total",
    "liveupdate_state",
    "liveupdate_update_interrupted",
    "liveupdate_last_blackout_seconds",
    "liveupdate_last_blackout_wall_seconds",
    "liveupdate_last_phase_duration_seconds",
    "liveupdate_last_run_outcome",
    "liveupdate_preserved_fds",
    "liveupdate_preserved_bytes",
    "liveupdate_kernel_info",
    "liveupdate_last_update_timestamp_seconds",
    "liveupdate_workload_running",
    "liveupdate_workloads_not_running",
)


class _Histogram:
    """Observations for one labelled histogram family."""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, list(labels)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        self.series.setdefault(labels, []).append(value)

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        if not self.labels:
            self.series.setdefault((), [])  # one series, present from the start
        for labels, values in sorted(self.series.items()):
            buckets = [(_le(b), sum(v <= b for v in values)) for b in BUCKETS]
            buckets.append(("+Inf", len(values)))
            fam.add_metric(list(labels), buckets, sum(values))
        return fam


def _le(bound: float) -> str:
    return repr(float(bound))


def families(observed: Sequence[Run], every: Sequence[Run]) -> Iterator[Metric]:
    """The metric families: counters and histograms from the runs *observed*,
    gauges from *every* run (the journal's whole history, oldest first)."""
    phase_h = _Histogram(
        "liveupdate_phase_duration_seconds",
        "Duration of each phase of a live update (kexec: reboot syscall to the "
        "new kernel's restore, wall clock)",
        ["phase"],
    )
    blackout_h = _Histogram(
        "liveupdate_blackout_seconds",
        "Blackout window of a live update: workloads paused (freeze) to every "
        "workload restored in the new kernel (wall clock, across the kexec)",
        [],
    )
    vm_h = _Histogram(
        "liveupdate_vm_blackout_seconds",
        "How long each VM was paused: QMP stop in the old kernel to cont in "
        "the new one (wall clock, recorded by the qemu plugin)",
        [],
    )
    hook_h = _Histogram(
        "liveupdate_hook_duration_seconds",
        "Duration of a plugin's hook in a phase, retries included",
        ["plugin", "phase"],
    )
    retries: dict[tuple[str, str], int] = {}
    updates = dict.fromkeys(OUTCOMES, 0)
    cancelled = dict.fromkeys(CANCELLABLE_PHASES, 0)
    for run in observed:
        for span in run.phases:
            phase_h.observe((span.phase,), span.seconds)
        if run.blackout_s is not None:
            blackout_h.observe((), run.blackout_s)
        for seconds in run.vm_blackouts.values():
            vm_h.observe((), seconds)
        for span in run.steps:
            key = (span.plugin or "unknown", span.phase)
            hook_h.observe(key, span.seconds)
            retries.setdefault(key, 0)
        for retry in run.retries:
            key = (retry.plugin or "unknown", retry.phase)
            retries[key] = retries.get(key, 0) + 1
        if run.outcome is not None:
            updates[run.outcome] = updates.get(run.outcome, 0) + 1
        if run.cancelled:
            phase = run.failed_phase or "unknown"
            cancelled[phase] = cancelled.get(phase, 0) + 1
    yield phase_h.family()
    yield blackout_h.family()
    yield vm_h.family()
    yield hook_h.family()
    fam = CounterMetricFamily(
        "liveupdate_hook_retries",
        "Failed attempts of a plugin's hook that were retried",
        labels=["plugin", "phase"],
    )
    for (plugin, phase), count in sorted(retries.items()):
        fam.add_metric([plugin, phase], count)
    yield fam
    fam = CounterMetricFamily(
        "liveupdate_updates",
        "Live updates that ended, by outcome (completed, cancelled, failed)",
        labels=["outcome"],
    )
    for outcome, count in updates.items():
        fam.add_metric([outcome], count)
    yield fam
    fam = CounterMetricFamily(
        "liveupdate_cancelled",
        "Live updates cancelled (rolled back), by the phase they failed in",
        labels=["phase"],
    )
    for phase, count in cancelled.items():
        fam.add_metric([phase], count)
    yield fam
    yield from _gauges(every)


def _gauges(runs: Sequence[Run]) -> Iterator[Metric]:
    last = runs[-1] if runs else None
    state = last.state if last else "NORMAL"
    fam = GaugeMetricFamily(
        "liveupdate_state",
        "Where the host is in a live update: 1 for the current state, 0 for the others",
        labels=["state"],
    )
    for name in STATES:
        fam.add_metric([name], 1.0 if name == state else 0.0)
    yield fam
    with_blackout = [r for r in runs if r.blackout_s is not None]
    if with_blackout:
        yield GaugeMetricFamily(
            "liveupdate_last_blackout_seconds",
            "Blackout window of the most recent update that had one, on the "
            "kernels' monotonic clocks (the kexec itself not counted)",
            value=with_blackout[-1].blackout_s,
        )
        wall = with_blackout[-1].blackout_wall_s
        if wall is not None:
            yield GaugeMetricFamily(
                "liveupdate_last_blackout_wall_seconds",
                "The same blackout on the two kernels' wall clocks: a cross-check "
                "whose excess over liveupdate_last_blackout_seconds estimates the "
                "kexec itself",
                value=wall,
            )
    with_plugin_blackouts = [r for r in runs if r.plugin_blackouts]
    if with_plugin_blackouts:
        fam = GaugeMetricFamily(
            "liveupdate_last_plugin_blackout_seconds",
            "Longest pause of the workloads a plugin restored in the most "
            "recent update (e.g. the qemu plugin: VM stop to cont)",
            labels=["plugin"],
        )
        for plugin, seconds in sorted(
            with_plugin_blackouts[-1].plugin_blackouts.items()
        ):
            fam.add_metric([plugin], seconds)
        yield fam
    with_phases = [r for r in runs if r.phases]
    if with_phases:
        fam = GaugeMetricFamily(
            "liveupdate_last_phase_duration_seconds",
            "Duration of each phase of the most recent update",
            labels=["phase"],
        )
        for phase, seconds in with_phases[-1].phase_seconds.items():
            fam.add_metric([phase], seconds)
        yield fam
    ended = [r for r in runs if r.outcome is not None]
    if ended:
        fam = GaugeMetricFamily(
            "liveupdate_last_run_outcome",
            "Outcome of the most recent update that ended: 1 for it, 0 for the others",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            fam.add_metric([outcome], 1.0 if ended[-1].outcome == outcome else 0.0)
        yield fam
    if last is not None:
        yield GaugeMetricFamily(
            "liveupdate_preserved_fds",
            "File descriptors preserved across the kexec by the most recent update",
            value=last.preserved_fds,
        )
        if last.preserved_bytes is not None:
            yield GaugeMetricFamily(
                "liveupdate_preserved_bytes",
                "Bytes in the preserved files of the most recent update (the "
                "sizes its plugins recorded)",
                value=last.preserved_bytes,
            )
        numbers = [r.liveupdate_number for r in runs if r.liveupdate_number]
        abis = [r.abi for r in runs if r.abi]
        info = InfoMetricFamily(
            "liveupdate_kernel",
            "The kernel the orchestrator drives: /dev/liveupdate ABI, real or "
            "simulated, and how many live updates the running kernel came through",
        )
        info.add_metric(
            [],
            {
                "abi": abis[-1] if abis else "",
                "kernel": last.kernel,
                "liveupdate_number": str(numbers[-1]) if numbers else "0",
            },
        )
        yield info
    completed = [r for r in runs if r.outcome == "completed"]
    if completed:
        yield GaugeMetricFamily(
            "liveupdate_last_update_timestamp_seconds",
            "When the most recent completed update ended (Unix time)",
            value=completed[-1].end,
        )


class JournalCollector:
    """Metrics of the journal in *state_dir*, read again whenever it changes.

    :param state_dir: where ``journal.jsonl`` lives.
    :param history: counters and histograms over every run of the journal (a
        long-running endpoint), or over the last run only (one export per run).
    """

    def __init__(self, state_dir: Path | str, *, history: bool) -> None:
        self.state_dir = os.fspath(state_dir)
        self.history = history
        self._key: tuple[int, int] | None = None
        self._metrics: list[Metric] = []

    def runs(self) -> list[Run]:
        return read_runs(read_journal(self.state_dir))

    def collect(self) -> Iterable[Metric]:
        try:
            st = os.stat(os.path.join(self.state_dir, "journal.jsonl"))
            key: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        if key != self._key or not self._metrics:
            runs = self.runs()
            observed = runs if self.history else runs[-1:]
            self._metrics = list(families(observed, runs))
            self._key = key
            logger.debug("metrics: read %d runs from %s", len(runs), self.state_dir)
        # Not cached: an update is interrupted when its process dies, which
        # changes no byte of the journal.
        return [*self._metrics, interrupted_gauge(self.state_dir)]

    def describe(self) -> Iterable[Metric]:
        # No collect() at registration: the journal may not exist yet.
        return []


def interrupted_gauge(state_dir: str | os.PathLike[str]) -> Metric:
    """1 when the last update never ended and no orchestrator runs it."""
    from orchestrator.restore._journal import lock_holder, unfinished

    stuck = bool(unfinished(read_journal(state_dir))) and lock_holder(state_dir) is None
    return GaugeMetricFamily(
        "liveupdate_update_interrupted",
        "1 when the last update stopped without ending and nothing runs it: "
        "'liveupdate status' names the command that finishes or cancels it",
        value=1.0 if stuck else 0.0,
    )


# /proc/PID/stat states of a process that does not serve: zombie, dead,
# stopped (SIGSTOP), stopped by a tracer.
_NOT_RUNNING = frozenset("ZXxTt")


def process_running(pid: int) -> bool:
    """Whether *pid* names a process of this PID namespace that runs: it exists
    and is neither a zombie nor stopped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "PID (COMM) STATE ...": COMM may hold anything, the state follows its last ")".
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3].decode(errors="replace")
    return bool(state) and state not in _NOT_RUNNING


class WorkloadsCollector:
    """Whether the workloads published in *registry* run, computed at each scrape.

    A workload publishes ``REGISTRY/<name>.json`` with its ``name`` and ``pid``
    (the format of the ``workloads`` plugin, see :mod:`plugins.workloads`;
    ``*.spec.json`` files are not workloads). A workload runs when its process
    exists in this PID namespace and is neither a zombie nor stopped; a file
    that cannot be read, or names no pid, counts as not running. Nothing is
    asked of the workload itself.

    :param registry: the directory, or ``None``: no workload is known, and
        ``liveupdate_workloads_not_running`` is 0.
    """

    def __init__(self, registry: Path | str | None) -> None:
        self.registry = None if registry is None else os.fspath(registry)

    def running(self) -> dict[str, bool]:
        """Each published workload's name and whether it runs."""
        if self.registry is None:
            return {}
        try:
            names = sorted(os.listdir(self.registry))
        except FileNotFoundError:
            return {}
        found: dict[str, bool] = {}
        for entry in names:
            if not entry.endswith(".json") or entry.endswith(".spec.json"):
                continue
            name = entry.removesuffix(".json")
            try:
                with open(os.path.join(self.registry, entry), "rb") as f:
                    published = json.loads(f.read(65536))
                pid = published["pid"]
                name = str(published.get("name") or name)
            except (OSError, ValueError, KeyError, TypeError):
                found[name] = False
                continue
            found[name] = isinstance(pid, int) and pid > 0 and process_running(pid)
        return found

    def collect(self) -> Iterable[Metric]:
        running = self.running()
        each = GaugeMetricFamily(
            "liveupdate_workload_running",
            "1 when the workload published under this name runs (its process "
            "exists, not a zombie, not stopped), 0 when not",
            labels=["workload"],
        )
        for name, up in running.items():
            each.add_metric([name], 1.0 if up else 0.0)
        down = GaugeMetricFamily(
            "liveupdate_workloads_not_running",
            "published workloads whose process does not run (0 when none is published)",
            value=float(sum(not up for up in running.values())),
        )
        return [each, down]

    def describe(self) -> Iterable[Metric]:
        return []


def register_metrics(
    registry: CollectorRegistry, state_dir: Path | str, *, history: bool
) -> JournalCollector:
    """Register the live-update metrics of *state_dir* on *registry*.

    :param registry: the registry to fill (tests pass a fresh one; never the
        global ``REGISTRY``).
    :param state_dir: where the journal lives.
    :param history: see :class:`JournalCollector`.
    :return: the collector, registered.
    """
    collector = JournalCollector(state_dir, history=history)
    registry.register(collector)
    return collector
