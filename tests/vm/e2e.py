"""``python -m tests.vm.e2e``: real-kernel end-to-end runs in QEMU.

Ensures the LUO test kernel (build or cache, see :mod:`tests.vm.kernel`), then
runs the selected scenarios (default: all) and exits non-zero on any failure.

Scenario ``floor``: boot -> ``floor pre`` (1 GiB memfd preserved) -> kexec ->
``floor post`` (retrieve, FINISH, byte-for-byte check) -> power off; prints the
kernel's LUO/KHO lines, the verification result and a blackout breakdown.

Scenario ``engine`` (:mod:`tests.vm.e2e_engine`): the orchestrator's playbook
through a real kexec with 4 x 256 MiB of workload memfds; blackout breakdown
and the floor-vs-orchestrator table. Scenario ``contract``
(:mod:`tests.vm.e2e_contract`): the kernel-contract suite on the real device,
across two kexecs. Scenario ``cancel``: a playbook that fails after PRESERVE,
in one boot: everything back, no kexec. Scenario ``qemu``
(:mod:`tests.vm.e2e_qemu`, opt-in: only with ``--only qemu``): a nested QEMU
VM kept across the kexec by the ``qemu`` plugin. Scenario ``sid``
(:mod:`tests.vm.e2e_sid`): the engine scenario on Debian unstable's userland
(a cached debootstrap root, :mod:`tests.vm.rootfs`) with its Python 3.14.
Scenario ``qemu-sid``: scenario ``qemu`` on that root, whose QEMU 11.1 makes
the plugin use ``cpr-reboot`` (in the default set). Scenario ``systemd``
(:mod:`tests.vm.e2e_systemd`): that root with systemd 262 as PID 1, the
project's units installed by docs/deploy.md's steps, an update through the
agent across a real kexec, restored by the agent at boot; then a second one
through ``systemctl kexec`` beside a service whose memfd systemd itself keeps
(in the default set). Scenario ``fleet`` (:mod:`tests.vm.e2e_fleet`): three
VMs, each reached over SSH through QEMU's user network, live-updated by the
Ansible role in waves [1, 2] behind a Prometheus gate (in the default set).

With ``-j N`` (default 2), the scenarios but :data:`EXCLUSIVE` run first in
N lanes at once, each a child ``python -m tests.vm.e2e --only ...``; then the
exclusive ones, alone.

To add a scenario: write ``def run_<name>(kernel, args) -> list[str]`` (returns
failure messages; build a :class:`~tests.vm.harness.Scenario`, call
:func:`~tests.vm.harness.run_scenario`, inspect the :class:`~tests.vm.harness.Result`)
and register it in :data:`SCENARIOS`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.vm.e2e_blackout import run_blackout
from tests.vm.e2e_contract import run_contract
from tests.vm.e2e_engine import run_cancel, run_engine
from tests.vm.e2e_fleet import FLEET_MIB, run_fleet
from tests.vm.e2e_qemu import run_qemu, run_qemu_sid
from tests.vm.e2e_sid import run_sid
from tests.vm.e2e_systemd import run_systemd
from tests.vm.harness import (
    Mark,
    Result,
    Scenario,
    SerialLine,
    python_argv,
    run_scenario,
)
from tests.vm.kernel import Kernel, KernelBuildError, ensure_kernel
from tests.vm.report import LU_NUMBER, LUO_LINES, PRINTK_TIME, first_after, section

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# --------------------------------------------------------------------------- floor


def floor_scenario(
    mib: int = 1024, timeout: float = 600.0, kernel_args: Sequence[str] = ()
) -> Scenario:
    """The floor client is stdlib-only: ``-S`` skips site-packages (faster start)."""
    sc = Scenario.pre_post(
        "floor",
        pre=python_argv("-S", "-m", "tests.vm.floor", "pre", "--mib", str(mib)),
        post=python_argv("-S", "-m", "tests.vm.floor", "post"),
        timeout=timeout,
    )
    return dataclasses.replace(sc, kernel_args=tuple(kernel_args))


Row = tuple[str, SerialLine | None, Mark | None]


def blackout_rows(result: Result) -> list[Row]:
    """The timeline of the kexec, from host serial timestamps (boot 1 -> boot 2)."""

    def mk(name: str, boot: int) -> Row:
        m = result.mark(name, boot)
        return (name, m.line if m else None, m)

    rows: list[Row] = []
    rows.append(_label("memfd filled (pre)", mk("floor.filled", 1)))
    rows.append(_label("PRESERVE_FD done", mk("floor.preserved", 1)))
    rows.append(_label("kexec_file_load start", mk("floor.kexec_load", 1)))
    rows.append(_label("kexec_file_load done", mk("floor.kexec_loaded", 1)))
    reboot = mk("floor.reboot", 1)
    rows.append(_label("reboot(KEXEC) syscall", reboot))
    t0 = reboot[1].t if reboot[1] else 0.0
    new_banner = first_after(result, r"Linux version \d", t0)
    t_banner = new_banner.t if new_banner else float("inf")
    last_old = None
    for ln in result.serial:
        if t0 <= ln.t < t_banner and ln.source == "serial":
            if "Starting new kernel" in ln.text:
                last_old = ln
                break
    first_new = None
    if last_old is not None:
        first_new = next(
            (ln for ln in result.serial if ln.t > last_old.t and ln.source == "serial"),
            None,
        )
    rows.append(("old kernel: 'Starting new kernel'", last_old, None))
    rows.append(("new kernel: first console output", first_new, None))
    rows.append(("new kernel: 'Linux version' banner", new_banner, None))
    rows.append(
        (
            "new kernel: KHO found handover data",
            first_after(result, r"KHO: found", t0),
            None,
        )
    )
    # mm_core_init(): kho_memory_init() -> kho_mem_retrieve() runs between these
    # two lines; it is the part of the kernel boot that grows with preserved size.
    rows.append(
        (
            "new kernel: mm_core_init start",
            first_after(result, "mem auto-init:", t0),
            None,
        )
    )
    rows.append(
        (
            "new kernel: mm_core_init done (SLUB)",
            first_after(result, "SLUB: ", t0),
            None,
        )
    )
    rows.append(
        (
            "new kernel: luo retrieved (number N)",
            first_after(result, LU_NUMBER.pattern, t0),
            None,
        )
    )
    rows.append(
        (
            "new kernel: exec init",
            first_after(result, r"Run .* as init process", t0),
            None,
        )
    )
    rows.append(_label("init running (Python up)", mk("init.start", 2)))
    rows.append(_label("post stage start", mk("floor.post_start", 2)))
    rows.append(_label("/dev/liveupdate opened", mk("floor.opened", 2)))
    rows.append(_label("RETRIEVE_SESSION done", mk("floor.session_retrieved", 2)))
    rows.append(_label("memfd retrieved (RETRIEVE_FD)", mk("floor.retrieved", 2)))
    rows.append(_label("SESSION_FINISH done", mk("floor.finished", 2)))
    rows.append(_label("all bytes verified", mk("floor.verified", 2)))
    return rows


def _label(label: str, row: Row) -> Row:
    return (label, row[1], row[2])


def floor_times(result: Result) -> dict[str, float]:
    """Host times of the floor's key events (for the engine comparison)."""
    keys = {
        "reboot(": "reboot",
        "new kernel: exec init": "exec_init",
        "post stage start": "client_start",
        "RETRIEVE_SESSION done": "session_retrieved",
        "memfd retrieved": "retrieved",
        "SESSION_FINISH done": "finished",
    }
    out: dict[str, float] = {}
    for label, line, _ in blackout_rows(result):
        for prefix, key in keys.items():
            if label.startswith(prefix) and line is not None:
                out[key] = line.t
    return out


def print_blackout(result: Result) -> dict[str, float]:
    rows = blackout_rows(result)
    reboot = next((ln for lbl, ln, _ in rows if lbl.startswith("reboot(")), None)
    t0 = reboot.t if reboot else None
    print(
        f"{'event':38} {'host t':>9} {'Δ prev':>8} {'Δ reboot':>9} "
        f"{'printk':>10} {'guest wall':>17}"
    )
    prev: float | None = None
    for label, line, mark in rows:
        if line is None:
            print(f"{label:38} {'(not seen)':>9}")
            continue
        d_prev = f"{line.t - prev:+8.3f}" if prev is not None else " " * 8
        d_reb = f"{line.t - t0:+9.3f}" if t0 is not None else ""
        pk = PRINTK_TIME.match(line.text)
        pk_s = f"{float(pk.group(1)):10.3f}" if pk else " " * 10
        gw = f"{mark.guest_wall:17.3f}" if mark else ""
        print(f"{label:38} {line.t:9.3f} {d_prev} {d_reb} {pk_s} {gw}")
        prev = line.t

    def at(prefix: str) -> float | None:
        for lbl, ln, _ in rows:
            if lbl.startswith(prefix) and ln is not None:
                return ln.t
        return None

    summary: dict[str, float] = {}
    spans = [
        ("kexec shutdown (reboot → 'Starting new kernel')", "reboot(", "old kernel"),
        (
            "jump + decompress (→ first new-kernel output)",
            "old kernel",
            "new kernel: first",
        ),
        (
            "kernel boot (first output → exec init)",
            "new kernel: first",
            "new kernel: exec",
        ),
        (
            "  of which mm_core_init (KHO memory retrieve)",
            "new kernel: mm_core_init start",
            "new kernel: mm_core_init done",
        ),
        (
            "init + Python start (exec init → post stage)",
            "new kernel: exec",
            "post stage",
        ),
        ("open + RETRIEVE_SESSION + RETRIEVE_FD", "post stage", "memfd retrieved"),
        ("SESSION_FINISH", "memfd retrieved", "SESSION_FINISH"),
        ("BLACKOUT reboot → memfd retrieved", "reboot(", "memfd retrieved"),
        ("BLACKOUT reboot → FINISH", "reboot(", "SESSION_FINISH"),
    ]
    print()
    for name, a, b in spans:
        ta, tb = at(a), at(b)
        if ta is not None and tb is not None:
            summary[name] = tb - ta
            print(f"  {name:52} {tb - ta:8.3f} s")
    for boot in (1, 2):
        offs = [m.clock_offset for m in result.marks() if m.boot == boot]
        if offs:
            print(
                f"  guest clock offset, kernel {boot} (host wall - guest wall, "
                f"median of {len(offs)} marks): {statistics.median(offs):+.3f} s"
            )
    return summary


def _guest_durations(result: Result) -> None:
    pre = result.read_json("floor-pre.json") or {}
    post = result.read_json("floor-post.json") or {}
    tp = pre.get("t") if isinstance(pre.get("t"), dict) else {}
    tq = post.get("t") if isinstance(post.get("t"), dict) else {}
    assert isinstance(tp, dict)
    assert isinstance(tq, dict)
    pairs = [
        (tp, "pre_start", "filled", "fill memfd (pre)"),
        (tp, "filled", "preserved", "PRESERVE_FD"),
        (tp, "kexec_load", "kexec_loaded", "kexec_file_load"),
        (tq, "post_start", "opened", "open /dev/liveupdate (post)"),
        (tq, "opened", "session_retrieved", "RETRIEVE_SESSION"),
        (tq, "session_retrieved", "retrieved", "RETRIEVE_FD"),
        (tq, "retrieved", "finished", "SESSION_FINISH"),
        (tq, "finished", "verified", "verify every byte"),
    ]
    print("guest-clock durations (same kernel, time.time() deltas):")
    for d, a, b, label in pairs:
        va, vb = d.get(a), d.get(b)
        if isinstance(va, int | float) and isinstance(vb, int | float):
            print(f"  {label:36} {vb - va:8.3f} s")


def run_floor(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    scenario = floor_scenario(args.mib, args.timeout, args.kernel_arg)
    result = run_scenario(scenario, kernel, echo=not args.quiet, accel=args.accel)
    failures = list(result.failures())

    section("floor: kernel LUO/KHO lines")
    for ln in result.kernel_lines(LUO_LINES):
        print(ln)
    numbers = [
        int(m.group(1)) for ln in result.serial if (m := LU_NUMBER.search(ln.text))
    ]
    if not numbers:
        failures.append("no 'liveupdate number: N' line in the new kernel's log")

    section("floor: verification")
    post = result.read_json("floor-post.json")
    if post is None:
        failures.append("no floor-post.json: the post stage did not report")
        print("no result from the post stage")
    else:
        print(
            f"memfd size {post.get('size')} bytes "
            f"(expected {post.get('expected_size')}), "
            f"{post.get('mismatched_bytes')} mismatched bytes in "
            f"{post.get('mismatched_pages')} pages -> "
            + ("OK, byte-for-byte identical" if post.get("ok") else "FAIL")
        )
        if not post.get("ok"):
            failures.append("memfd contents differ after the kexec")

    section(f"floor: blackout breakdown ({result.accel}, {args.mib} MiB memfd)")
    print_blackout(result)
    args.floor_times = floor_times(result)
    print()
    _guest_durations(result)

    section("floor: summary")
    print(f"kernel      {kernel.key} ({kernel.bzimage})")
    print(f"accel       {result.accel}")
    print(f"out dir     {result.out_dir}")
    print(f"qemu        exit {result.qemu_returncode}, {result.elapsed:.1f} s wall")
    print(f"boots       {result.boots()}; liveupdate number(s): {numbers}")
    for name, st in result.statuses.items():
        print(f"stage {name:5} rc={st.rc} (boot {st.boot})")
    return failures


SCENARIOS: dict[str, Callable[[Kernel, argparse.Namespace], list[str]]] = {
    "floor": run_floor,
    "engine": run_engine,
    "contract": run_contract,
    "cancel": run_cancel,
    "blackout": run_blackout,
    "qemu": run_qemu,
    "sid": run_sid,
    "qemu-sid": run_qemu_sid,
    "systemd": run_systemd,
    "fleet": run_fleet,
}
#: Run only when named (``--only NAME``), never by default.
OPT_IN = frozenset({"qemu"})
#: Never beside another VM: ``blackout`` measures speed (its rounds compare
#: the floor and the orchestrator), ``fleet`` boots three VMs itself.
EXCLUSIVE = frozenset({"blackout", "fleet"})
#: Run in one process: ``engine`` compares itself with ``floor``'s figures;
#: the scenarios on the sid root share its build and its bytecode.
TOGETHER = (("floor", "engine"), ("sid", "qemu-sid", "systemd", "qemu"))
#: Seconds each took alone under TCG on a slow machine: weights to balance lanes.
ESTIMATE = {
    "floor": 45,
    "engine": 330,
    "contract": 130,
    "cancel": 60,
    "sid": 100,
    "qemu-sid": 90,
    "systemd": 345,
    "qemu": 120,
}


def _lanes(names: Sequence[str], jobs: int) -> list[list[str]]:
    """*names* in at most *jobs* lanes of about equal length (the longest
    units first, each to the shortest lane), each lane in suite order."""
    units: list[list[str]] = []
    for name in names:
        group = next((g for g in TOGETHER if name in g), (name,))
        unit = next((u for u in units if u[0] in group), None)
        if unit is None:
            units.append([name])
        else:
            unit.append(name)
    lanes: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(units))))]
    for unit in sorted(units, key=lambda u: -sum(ESTIMATE.get(n, 120) for n in u)):
        min(lanes, key=lambda ln: sum(ESTIMATE.get(n, 120) for n in ln)).extend(unit)
    order = list(SCENARIOS)
    return [sorted(ln, key=order.index) for ln in lanes if ln]


def _run_lanes(
    lanes: list[list[str]],
    args: argparse.Namespace,
    failed: dict[str, list[str]],
    took: dict[str, float],
) -> None:
    """Run each lane as ``python -m tests.vm.e2e --only ...`` at once, its
    output to a log (printed whole when the lane ends)."""
    import tempfile

    from tests.vm.harness import DEFAULT_OUT_BASE

    base = Path(os.environ.get("LUO_VM_OUT_BASE", str(DEFAULT_OUT_BASE)))
    base.mkdir(parents=True, exist_ok=True)
    forward = [
        *("--mib", str(args.mib), "--engine-workloads", str(args.engine_workloads)),
        *("--blackout-rounds", str(args.blackout_rounds)),
        *("--blackout-mib", str(args.blackout_mib), "--fleet-mib", str(args.fleet_mib)),
        *("--timeout", str(args.timeout), "--jobs", "1"),
        *(("--accel", args.accel) if args.accel else ()),
        *(x for arg in args.kernel_arg for x in ("--kernel-arg", arg)),
        *(("--quiet",) if args.quiet else ()),
    ]
    running = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, lane in enumerate(lanes, 1):
        log = base / f"e2e-lane{i}-{stamp}.log"
        fd, spot = tempfile.mkstemp(prefix=f"e2e-lane{i}-", suffix=".json", dir=base)
        os.close(fd)
        argv = [sys.executable, "-m", "tests.vm.e2e", *forward, "--result-json", spot]
        argv += [x for scenario in lane for x in ("--only", scenario)]
        with log.open("wb") as out:  # its own process group: QEMU stops with it
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        print(
            f"lane {i}: {', '.join(lane)} (pid {proc.pid}; output: {log})", flush=True
        )
        running.append((i, lane, proc, log, Path(spot), time.monotonic()))
    try:
        while running:  # each lane reported as it ends
            for lane_run in [r for r in running if r[2].poll() is not None]:
                _report_lane(*lane_run, failed, took)
                running.remove(lane_run)
            time.sleep(0.5)
    finally:  # interrupted: no lane goes on alone
        for _, _, proc, *_ in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _report_lane(
    i: int,
    lane: list[str],
    proc: subprocess.Popen[bytes],
    log: Path,
    result: Path,
    t1: float,
    failed: dict[str, list[str]],
    took: dict[str, float],
) -> None:
    """Wait for lane *i*, print its output and take its results."""
    code = proc.wait()
    section(f"lane {i}: {', '.join(lane)} (exit {code}, {time.monotonic() - t1:.0f} s)")
    sys.stdout.write(log.read_text(errors="replace"))
    sys.stdout.flush()
    try:
        done = json.loads(result.read_text() or "{}")
    except ValueError:
        done = {}
    result.unlink(missing_ok=True)
    for name in lane:
        if name in done:
            took[name] = float(done[name]["took"])
            if done[name]["errors"]:
                failed[name] = list(done[name]["errors"])
        else:
            took[name] = time.monotonic() - t1
            failed[name] = [f"lane {i} exited {code} before it ran (see {log})"]


def precompile() -> None:
    """Write the checkout's bytecode on the host before booting.

    The guest sees the host's ``/`` read-only and runs with
    PYTHONDONTWRITEBYTECODE: a source file changed since the host last
    imported it is compiled again at *every* guest start (0.5 s for a dozen
    modules under TCG, inside the measured blackout). A deployed host has its
    bytecode; so does the guest after this.
    """
    import compileall

    from tests.vm.harness import REPO_ROOT

    for sub in ("orchestrator", "plugins", "tests"):
        compileall.compile_dir(REPO_ROOT / sub, quiet=2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.e2e", description=__doc__)
    p.add_argument(
        "scenarios",
        nargs="*",
        help=f"of {sorted(SCENARIOS)}; default: all but {sorted(OPT_IN)}",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this scenario (repeatable; same as naming it)",
    )
    p.add_argument(
        "--mib",
        type=int,
        default=1024,
        help="floor memfd size = engine total workload size (MiB)",
    )
    p.add_argument(
        "--engine-workloads",
        type=int,
        default=4,
        metavar="N",
        help="engine: number of workloads sharing --mib (default 4)",
    )
    p.add_argument(
        "--blackout-rounds",
        type=int,
        default=4,
        metavar="N",
        help="blackout: floor/orchestrator turns in one VM run (default 4: an "
        "even count puts both sides of every round on boots of the same parity)",
    )
    p.add_argument(
        "--blackout-mib",
        type=int,
        default=32,
        metavar="M",
        help="blackout: MiB of each of the --engine-workloads stores (default 32)",
    )
    p.add_argument(
        "--fleet-mib",
        type=int,
        default=FLEET_MIB,
        metavar="M",
        help=f"fleet: MiB of each VM's workload memfd (default {FLEET_MIB})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="per QEMU run (s): a bound for a hang, not a speed",
    )
    p.add_argument("--accel", choices=["tcg", "kvm"], default=None)
    p.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra kernel parameter for every kernel (repeatable)",
    )
    p.add_argument("--refresh-kernel", action="store_true", help="check sid")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo serial")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="run the scenarios that share the machine well in N VMs at once "
        f"(each lane's output is printed when it ends); {sorted(EXCLUSIVE)} "
        "always run alone, after them; default: %(default)s",
    )
    p.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    wanted = [*args.scenarios, *args.only]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")
    selected = (
        [s for s in SCENARIOS if s in wanted]
        if wanted
        else [s for s in SCENARIOS if s not in OPT_IN]
    )
    if "engine" in selected and "floor" not in selected:
        selected.insert(0, "floor")  # the engine's blackout is compared with it

    t0 = time.monotonic()
    section("kernel")
    try:
        kernel = ensure_kernel(refresh=args.refresh_kernel)
    except KernelBuildError as e:
        print(f"ERROR: {e}", flush=True)
        return 2
    if kernel.build_seconds is not None:
        print(
            f"build time: {kernel.build_seconds:.0f} s "
            f"({'built now' if kernel.built else 'cached build'})"
        )

    precompile()
    failed: dict[str, list[str]] = {}
    took: dict[str, float] = {}
    shared = [s for s in selected if s not in EXCLUSIVE]
    lanes = _lanes(shared, args.jobs) if args.result_json is None else []
    if len(lanes) > 1:  # one lane is the plain run, with its console live
        _run_lanes(lanes, args, failed, took)
        selected = shared + [s for s in selected if s in EXCLUSIVE]
    for name in selected:
        if name in took:
            continue
        section(f"scenario {name}")
        t1 = time.monotonic()
        try:
            errs = SCENARIOS[name](kernel, args)
        except Exception as e:  # noqa: BLE001 - one scenario's crash is its FAIL
            import traceback

            traceback.print_exc()
            errs = [f"the runner crashed: {type(e).__name__}: {e}"]
        took[name] = time.monotonic() - t1
        if errs:
            failed[name] = errs

    if args.result_json is not None:  # a lane of a parallel run: its parent reports
        args.result_json.write_text(
            json.dumps(
                {n: {"errors": failed.get(n, []), "took": took[n]} for n in took}
            )
        )
    section("result")
    print(f"{'scenario':10} {'result':6} {'time':>8}")
    for name in selected:
        errs = failed.get(name, [])
        print(f"{name:10} {'PASS' if not errs else 'FAIL':6} {took[name]:7.1f}s")
        for err in errs:
            print(f"    - {err}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
