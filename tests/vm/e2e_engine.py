"""Scenarios ``engine`` and ``cancel``: the orchestrator's playbook on a real kernel.

``engine``: N demo key-value workloads (default 4 x 256 MiB = the floor's
1 GiB) -> ``liveupdate run`` (quiesce, preserve, prepare = kexec_file_load,
freeze, kexec) -> new kernel -> ``liveupdate resume`` (retrieve, restart the
workloads on their memfds, FINISH) -> ``liveupdate status --json`` and every
workload's SUM against the SHA-256 recorded before the kexec. The blackout is
broken down on the host's serial clock (guest marks + the journal's wall
clocks converted with each kernel's clock offset) and compared with the floor
client's.

``cancel``: one boot; the preserve phase fails after the workloads' preserve
step; exit 5, status cancelled/NORMAL, no kexec (kexec_loaded 0, same boot),
the workloads answer with their data, and a session named like the engine's
can be created again (the cancelled one was dropped).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tests.vm.harness import Scenario, Stage, python_argv, run_scenario
from tests.vm.report import (
    clock_offsets,
    host_t,
    kexec_lines,
    liveupdate_numbers,
    print_timeline,
    section,
)

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import Result
    from tests.vm.kernel import Kernel


def engine_scenario(count: int, mib: int, timeout: float = 600.0) -> Scenario:
    return Scenario(
        "engine",
        stages=(
            Stage(
                "pre",
                python_argv(
                    "-m",
                    "tests.vm.engine_guest",
                    "pre",
                    "--count",
                    str(count),
                    "--mib",
                    str(mib),
                ),
            ),
            Stage("post", python_argv("-m", "tests.vm.engine_guest", "post")),
        ),
        timeout=timeout,
    )


def cancel_scenario(count: int, mib: int, timeout: float = 600.0) -> Scenario:
    return Scenario(
        "cancel",
        stages=(
            Stage(
                "cancel",
                python_argv(
                    "-m",
                    "tests.vm.engine_guest",
                    "cancel",
                    "--count",
                    str(count),
                    "--mib",
                    str(mib),
                ),
            ),
        ),
        timeout=timeout,
    )


def read_journal(result: Result) -> list[dict[str, Any]]:
    path = result.out_dir / "engine-state" / "journal.jsonl"
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class Timeline:
    """Host times (seconds since QEMU start) of the engine run's events."""

    def __init__(self, result: Result, journal: list[dict[str, Any]]) -> None:
        self.result = result
        self.journal = journal
        self.boot_ids: list[str] = []
        for rec in journal:
            if rec["boot_id"] not in self.boot_ids:
                self.boot_ids.append(rec["boot_id"])

    def mark(self, name: str, boot: int) -> float | None:
        m = self.result.mark(name, boot)
        return m.t if m else None

    def marks(self, prefix: str, boot: int) -> list[tuple[str, float]]:
        return [
            (m.name, m.t)
            for m in self.result.marks()
            if m.boot == boot and m.name.startswith(prefix)
        ]

    def journal_t(self, event: str, **match: Any) -> float | None:
        """Host time of the first journal record *event* (matching *match*)."""
        for rec in self.journal:
            if rec["event"] == event and all(rec.get(k) == v for k, v in match.items()):
                boot = self.boot_ids.index(rec["boot_id"]) + 1
                # blackout_end is journaled after the engine loaded; the
                # window ended at end_wall (the restore path's end).
                wall = rec.get("end_wall", rec["wall"])
                return host_t(self.result, boot, float(wall))
        return None


def _span(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def _fmt(v: float | None, width: int = 9) -> str:
    return f"{v:{width}.3f}" if v is not None else f"{'-':>{width}}"


def engine_breakdown(result: Result) -> dict[str, float | None]:
    """Print the engine's blackout timeline; return its spans (seconds)."""
    tl = Timeline(result, read_journal(result))
    t_freeze = tl.journal_t("blackout_start")
    t_kexec_rec = tl.journal_t("kexec")
    t_stop = tl.mark("lu.SIGSTOP.first", 1)
    t_reboot = tl.mark("lu.reboot_kexec", 1)
    start, first_new, exec_init = kexec_lines(result, t_reboot or 0.0)
    t_init = tl.mark("init.start", 2)
    t_resume = tl.mark("resume.start", 2)
    t_open = tl.mark("lu.open_device.1", 2)
    t_rs = tl.mark("lu.RETRIEVE_SESSION.1", 2)
    t_rs_done = tl.mark("lu.RETRIEVE_SESSION.1.after", 2)
    t_updated = tl.journal_t("state", state="UPDATED")
    t_restore = tl.journal_t("phase_start", phase="restore")
    t_bo_end = tl.journal_t("blackout_end")
    t_finish = tl.mark("lu.FINISH.1", 2)
    t_kfinish = tl.journal_t("kernel_finish")
    t_end = tl.journal_t("run_end")

    rows: list[tuple[str, float | None]] = [
        ("freeze start: workloads paused (journal)", t_freeze),
        ("first workload SIGSTOP", t_stop),
        ("journal 'kexec' record", t_kexec_rec),
        ("reboot(KEXEC) syscall", t_reboot),
        ("old kernel: 'Starting new kernel'", start.t if start else None),
        ("new kernel: first console output", first_new.t if first_new else None),
        ("new kernel: exec init", exec_init.t if exec_init else None),
        ("init running (Python up)", t_init),
        ("liveupdate resume: Python up", t_resume),
        ("/dev/liveupdate opened", t_open),
        ("RETRIEVE_SESSION issued", t_rs),
        ("sessions retrieved", t_rs_done),
        *[
            (f"  import {name[len('import.') :]} (first)", t)
            for name, t in sorted(tl.marks("import.", 2), key=lambda x: x[1])
        ],
        ("state UPDATED (journal)", t_updated),
        ("restore phase start (journal)", t_restore),
    ]
    # restore: per workload RETRIEVE_FD (issue -> next event) then its restart
    fds = sorted(
        (t for name, t in tl.marks("lu.RETRIEVE_FD.", 2) if not name.endswith("after"))
    )
    fds_after = sorted(
        t for name, t in tl.marks("lu.RETRIEVE_FD.", 2) if name.endswith("after")
    )
    spawns = sorted(t for _, t in tl.marks("lu.spawn.", 2))
    retrieve_fd_total = 0.0
    restart_total = 0.0
    for i, t_fd in enumerate(fds):
        t_sp = next((s for s in spawns if s >= t_fd), None)
        t_next = fds[i + 1] if i + 1 < len(fds) else t_bo_end
        rows.append((f"  RETRIEVE_FD #{i + 1}", t_fd))
        if i < len(fds_after):
            rows.append((f"  RETRIEVE_FD #{i + 1} returned", fds_after[i]))
        if t_sp is not None:
            retrieve_fd_total += t_sp - t_fd
            if t_next is not None:
                restart_total += t_next - t_sp
    rows += [
        ("workloads restored: blackout_end (journal)", t_bo_end),
        ("SESSION_FINISH issued", t_finish),
        ("FINISH done: kernel_finish (journal)", t_kfinish),
        ("run_end (journal)", t_end),
    ]
    print_timeline(rows, t_reboot)
    offs = clock_offsets(result)
    print(
        "  guest clock offsets (host - guest, s): "
        + ", ".join(f"kernel {b}: {o:+.3f}" for b, o in sorted(offs.items()))
    )
    spans: dict[str, float | None] = {
        "freeze_to_reboot": _span(t_freeze, t_reboot),
        "reboot_to_exec_init": _span(t_reboot, exec_init.t if exec_init else None),
        "exec_init_to_client": _span(exec_init.t if exec_init else None, t_resume),
        "client_to_session": _span(t_resume, t_rs_done),
        "session_to_restore": _span(t_rs_done, t_restore),
        "retrieve_fd_total": retrieve_fd_total if fds else None,
        "workload_restarts": restart_total if fds else None,
        "restore_phase": _span(t_restore, t_bo_end),
        "blackout_host": _span(t_freeze, t_bo_end),
        "reboot_to_blackout_end": _span(t_reboot, t_bo_end),
        "blackout_end_to_finish": _span(t_bo_end, t_kfinish),
        "resume_start_to_open": _span(t_resume, t_open),
        "open_to_session": _span(t_open, t_rs_done),
        "session_to_updated": _span(t_rs_done, t_updated),
        "updated_to_restore": _span(t_updated, t_restore),
    }
    print()
    for key, label in [
        ("freeze_to_reboot", "freeze (workloads paused) -> reboot syscall"),
        ("reboot_to_exec_init", "reboot -> exec init (kexec + kernel boot)"),
        ("exec_init_to_client", "exec init -> liveupdate resume Python up"),
        (
            "resume_start_to_open",
            "  resume up -> /dev/liveupdate open (journal, imports)",
        ),
        ("open_to_session", "  open -> sessions retrieved"),
        ("session_to_updated", "  sessions retrieved -> UPDATED (CLI, engine imports)"),
        ("updated_to_restore", "  UPDATED -> restore phase start"),
        ("blackout_end_to_finish", "blackout_end -> FINISH done"),
        ("blackout_host", "BLACKOUT (freeze start -> workloads restored), host clock"),
    ]:
        print(f"  {label:62} {_fmt(spans.get(key))} s")
    return spans


def run_engine(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    count = args.engine_workloads
    mib = max(1, args.mib // count)
    scenario = engine_scenario(count, mib, args.timeout)
    result = run_scenario(scenario, kernel, echo=not args.quiet, accel=args.accel)
    failures = list(result.failures())

    section("engine: liveupdate number lines")
    if not liveupdate_numbers(result):
        failures.append("no 'liveupdate number' line in the new kernel's log")

    section("engine: verification")
    post = result.read_json("engine-post.json")
    if post is None:
        failures.append("no engine-post.json: the post stage did not report")
    else:
        status = post.get("status") or {}
        assert isinstance(status, dict)
        print(
            f"liveupdate resume exit {post.get('resume_rc')}; status: state "
            f"{status.get('state')}, outcome {status.get('outcome')}, blackout_s "
            f"{status.get('blackout_s')}, liveupdate_number "
            f"{status.get('liveupdate_number')}, boots {len(status.get('boots') or [])}"
        )
        before = post.get("before") or {}
        after = post.get("after") or {}
        assert isinstance(before, dict)
        assert isinstance(after, dict)
        for name in sorted(before):
            same = after.get(name) == before[name]
            print(
                f"  {name}: sha256 before {before[name]}\n"
                f"  {' ' * len(name)}  SUM after    {after.get(name)} "
                + ("== (byte-for-byte identical)" if same else "!= MISMATCH")
            )
        if status.get("state") != "NORMAL" or status.get("outcome") != "completed":
            failures.append(f"status {status.get('state')}/{status.get('outcome')}")
        if not before or after != before:
            failures.append("a workload's SUM differs from the one before the kexec")
        if post.get("resume_rc") != 0:
            failures.append(f"liveupdate resume exited {post.get('resume_rc')}")
    journal = read_journal(result)
    events = [r["event"] for r in journal]
    wanted = ["run_start", "blackout_start", "kexec", "blackout_end", "kernel_finish"]
    missing = [e for e in wanted if e not in events]
    end = next((r for r in journal if r["event"] == "run_end"), None)
    print(
        f"journal: {len(journal)} records, {len({r['boot_id'] for r in journal})} "
        f"boots; run_end outcome {end.get('outcome') if end else None}"
    )
    if missing or end is None or end.get("outcome") != "completed":
        failures.append(f"journal incomplete: missing {missing}, run_end {end}")

    section(f"engine: blackout breakdown ({count} x {mib} MiB, host serial clock)")
    spans = engine_breakdown(result)
    if post is not None:
        st = post.get("status") or {}
        assert isinstance(st, dict)
        bs = st.get("blackout_s")
        if isinstance(bs, int | float):
            print(
                f"  liveupdate status blackout_s (the kernels' monotonic clocks, "
                f"the kexec itself not counted): {bs:.3f} s"
            )
    print(
        "  (the restore path starts the workloads before the engine is "
        "imported: the spans after 'sessions retrieved' overlap; scenario "
        "'blackout' compares with the floor client round by round)"
    )
    args.engine_spans = spans

    section("engine: summary")
    print(f"out dir     {result.out_dir}")
    print(f"qemu        exit {result.qemu_returncode}, {result.elapsed:.1f} s wall")
    print(f"boots       {result.boots()}")
    for name, st2 in result.statuses.items():
        print(f"stage {name:5} rc={st2.rc} (boot {st2.boot})")
    return failures


def run_cancel(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    scenario = cancel_scenario(2, 64, args.timeout)
    result = run_scenario(scenario, kernel, echo=not args.quiet, accel=args.accel)
    failures = list(result.failures())

    section("cancel: liveupdate number lines")
    numbers = liveupdate_numbers(result, echo=False)
    print(f"  {numbers or '(none: the update was cancelled, no kexec happened)'}")
    if result.boots() != 1 or result.lines(r"Starting new kernel"):
        failures.append(f"a kexec happened ({result.boots()} boots)")
    st = result.statuses.get("cancel")
    if st is not None and st.boot != 1:
        failures.append(f"the stage finished in boot {st.boot}, not boot 1")

    section("cancel: verification")
    data = result.read_json("cancel.json")
    if data is None:
        failures.append("no cancel.json: the stage did not report")
        return failures
    status = data.get("status") or {}
    assert isinstance(status, dict)
    print(f"liveupdate run exit {data.get('run_rc')} (expected 5)")
    print(
        f"status: state {status.get('state')}, outcome {status.get('outcome')}, "
        f"error {status.get('error')!r}"
    )
    print(f"/sys/kernel/kexec_loaded: {data.get('kexec_loaded')}")
    print(f"same boot after the run: {data.get('same_boot')}")
    print(f"session {json.dumps('lu-workloads')} again: {data.get('recreate')}")
    before = data.get("before") or {}
    after = data.get("after") or {}
    assert isinstance(before, dict)
    assert isinstance(after, dict)
    for name in sorted(before):
        print(
            f"  {name}: SUM {after.get(name)} "
            + ("== before" if after.get(name) == before[name] else "!= before")
        )
    journal = data.get("journal") or []
    assert isinstance(journal, list)
    print("journal: " + " ".join(str(r.get("event")) for r in journal))
    recreate = data.get("recreate")
    if not isinstance(recreate, dict):
        recreate = {}
    checks = {
        "exit code 5": data.get("run_rc") == 5,
        "state NORMAL": status.get("state") == "NORMAL",
        "outcome cancelled": status.get("outcome") == "cancelled",
        "kexec_loaded 0": data.get("kexec_loaded") == "0",
        "same boot": data.get("same_boot") is True,
        "workloads' data intact": bool(before) and after == before,
        "session name reusable": recreate.get("created") is True
        and "error" not in recreate,
    }
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(f"cancel: {what}")
    print(f"\nout dir {result.out_dir}; qemu {result.elapsed:.1f} s wall")
    return failures
