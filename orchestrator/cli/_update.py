"""``liveupdate plan | run | status | resume | cancel | demo``: the update commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from pluggy import PluginManager

    from orchestrator.engine._playbook import Playbook
    from orchestrator.luo import Kernel
    from orchestrator.luo.sim import SimKernel
    from orchestrator.restore._keeper import Keeper
    from orchestrator.restore._resume import Plan

EXIT_CANCELLED = 5
EXIT_FAILED = 1
EXIT_UNFINISHED = 6
EXIT_UPDATING = 7  # the agent runs another update: this one was not started
PREFETCHED: tuple[Plan, Keeper] | None = None
"""The plan, and the keeper that retrieved its sessions before the CLI was parsed."""


class Printer:
    """Shows journal events as they happen: phases with their timings."""

    def __init__(self, stream: Any = None) -> None:
        self.out = stream or sys.stdout
        self.tty = self.out.isatty()
        self._starts: dict[str, float] = {}

    def _p(self, text: str, color: str = "") -> None:
        if self.tty and color:
            text = f"\033[{color}m{text}\033[0m"
        print(text, file=self.out, flush=True)

    def __call__(self, rec: dict[str, Any]) -> None:
        ev = rec["event"]
        key = f"{rec.get('phase')}/{rec.get('index', '')}"
        if ev == "phase_start":
            self._starts[rec["phase"]] = rec["mono"]
            self._p(f"> {rec['phase']}", "1")
        elif ev == "phase_end":
            ms = (rec["mono"] - self._starts.get(rec["phase"], rec["mono"])) * 1e3
            mark = "ok" if rec["ok"] else f"FAILED: {rec.get('error', '')}"
            self._p(
                f"  {rec['phase']} {mark} ({ms:.1f} ms)", "32" if rec["ok"] else "31"
            )
        elif ev == "step_start":
            self._starts[key] = rec["mono"]
        elif ev == "step_end":
            ms = (rec["mono"] - self._starts.get(key, rec["mono"])) * 1e3
            tries = (
                f", {rec['attempts']} attempts" if rec.get("attempts", 1) > 1 else ""
            )
            if rec["ok"]:
                self._p(f"    {rec['step']}: ok {ms:.1f} ms{tries}")
            else:
                self._p(f"    {rec['step']}: FAILED {rec['error']}{tries}", "31")
        elif ev == "retry":
            self._p(
                f"    {rec['step']}: attempt {rec['attempt']} failed ({rec['error']}); "
                f"retrying in {rec['wait']:.2f} s",
                "33",
            )
        elif ev == "state":
            self._p(f"= {rec['state']}", "36")
        elif ev == "cancel_start":
            self._p(f"! cancelling: {rec['error']}", "31")
        elif ev in ("rollback_end",):
            self._p(
                f"    undo {rec['step']} ({rec['phase']}): "
                f"{'ok' if rec['ok'] else 'FAILED ' + rec.get('error', '')}"
            )
        elif ev == "kexec":
            self._p("> kexec: jumping into the next kernel", "1")


def _load(
    args: argparse.Namespace, *, in_blackout: bool = False
) -> tuple[Playbook, Kernel, Path, PluginManager]:
    """The playbook, kernel, state dir and plugin manager a command works with.

    Making the kernel may create its state (a simulated kernel's directory):
    a command that must change nothing uses :func:`_inputs` instead.
    """
    from orchestrator.luo import kernel_from_spec

    playbook, spec, state, pm = _inputs(args, in_blackout=in_blackout)
    return playbook, kernel_from_spec(spec), state, pm


def _inputs(
    args: argparse.Namespace, *, in_blackout: bool = False
) -> tuple[Playbook, str, Path, PluginManager]:
    """The playbook, kernel spec, state dir and plugin manager, touching nothing.

    :param in_blackout: resume after a kexec: load only the built-in plugins
        the playbook names, and third-party ones only if it names one
        (importing every plugin and scanning the installed distributions for
        entry points is slow); otherwise all are loaded, so that a misspelt
        hook fails at start-up.
    """
    from orchestrator.engine._engine import plugin_manager
    from orchestrator.engine._playbook import load_playbook
    from orchestrator.luo import KERNEL_ENV

    if in_blackout:
        playbook = load_playbook(args.playbook)
        named = {step.plugin for step in playbook.steps()}
        pm = plugin_manager(load_entry_points=False, builtins=named)
        if named - {name for name, _ in pm.list_name_plugin()}:
            pm = plugin_manager(builtins=named)  # a third-party plugin is named
            known = {name for name, _ in pm.list_name_plugin()}
            playbook = load_playbook(args.playbook, known_plugins=known)
    else:
        pm = plugin_manager()
        known = {name for name, _ in pm.list_name_plugin()}
        playbook = load_playbook(args.playbook, known_plugins=known)
    spec = (
        getattr(args, "kernel", None)
        or playbook.kernel
        or os.environ.get(KERNEL_ENV)
        or "real"
    )
    state = Path(
        getattr(args, "state_dir", None) or playbook.state_dir or "/var/lib/liveupdate"
    )
    return playbook, spec, state, pm


def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.engine._engine import check_playbook

    # Only reads: making the kernel would create a simulated kernel's directory.
    playbook, spec, state, pm = _inputs(args)
    if spec.startswith("sim:"):
        spec = f"sim:{os.path.abspath(spec[4:])}"
    problems = check_playbook(pm, playbook)
    print(f"playbook {playbook.name!r} ({playbook.path})")
    print(
        f"kernel {spec}; state dir {state}; blackout budget "
        f"{playbook.blackout_budget:g} s"
    )
    if playbook.next_kernel:
        nk = playbook.next_kernel
        print(
            f"next kernel {nk.image} initrd {nk.initrd or '-'} cmdline "
            f"{nk.cmdline or '(the running one)'}"
        )
    for phase_plan in playbook.phases.values():
        budget = f" (budget {phase_plan.timeout:g} s)" if phase_plan.timeout else ""
        print(f"{phase_plan.phase.value}{budget}")
        for step in phase_plan.steps:
            r = step.retry
            retry = (
                f", {r.attempts} attempts, backoff {r.backoff:g} s"
                if r.attempts > 1
                else ""
            )
            print(
                f"  {step.index + 1}. {step.name} [{step.plugin}] timeout "
                f"{step.timeout:g} s{retry}  {dict(step.options) or ''}"
            )
        if phase_plan.phase.value == "freeze":
            print("kexec (the engine: reboot(LINUX_REBOOT_CMD_KEXEC))")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _finish_message(outcome: Any, state: Path) -> int:
    """Print the outcome, then export metrics if configured -- after the engine
    has finished, never inside the blackout window."""
    from orchestrator.engine._engine import Outcome
    from orchestrator.observe._status import summarize

    from ._metrics import export_after_update

    export_after_update(state)

    status = summarize(state)
    print(status.render())
    if outcome is Outcome.CANCELLED:
        print(
            "update CANCELLED: the host is back in NORMAL, workloads running",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    if outcome is Outcome.FAILED:
        print("update FAILED: see 'liveupdate status'", file=sys.stderr)
        return EXIT_FAILED
    return 0


DEFAULT_CONTROL = Path("/run/liveupdate/control.sock")


def _agent_socket(args: argparse.Namespace) -> Path | None:
    """The agent's control socket if the update should go through the agent."""
    if getattr(args, "no_agent", False):
        return None
    if getattr(args, "agent", None):
        return Path(args.agent)
    return DEFAULT_CONTROL if DEFAULT_CONTROL.exists() else None


def _run_via_agent(control: Path, playbook: Path) -> int:
    """Start the update in the agent and follow it until it ends or the kexec
    takes the agent away."""
    import time

    import httpx

    transport = httpx.HTTPTransport(uds=str(control))
    with httpx.Client(transport=transport, base_url="http://agent", timeout=30) as http:
        answer = http.post("/v1/updates", json={"playbook": str(playbook.absolute())})
        if answer.status_code != 202:
            refusal = answer.json()
            if answer.status_code == 409 and refusal.get("code") == "update_running":
                print(
                    f"liveupdate: not started: {refusal.get('error')} "
                    "(the agent holds the host lock until it ends)",
                    file=sys.stderr,
                )
                return EXIT_UPDATING
            print(f"the agent refused: {refusal.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        print(
            f"the agent at {control} runs {playbook} "
            f"({answer.json()['registrations']} registration(s))"
        )
        seen = None
        while True:
            time.sleep(0.2)
            try:
                status = http.get("/v1/status").json()
            except httpx.TransportError:
                print(
                    "the agent went away: the kexec is under way; "
                    "'liveupdate status' tells the rest after the boot"
                )
                return 0
            if status["state"] != seen:
                seen = status["state"]
                print(f"= {seen}")
            if not status["agent"]["updating"]:
                outcome = status.get("outcome")
                print(f"update {outcome}: {status.get('error') or ''}".rstrip(": "))
                return EXIT_CANCELLED if outcome == "cancelled" else EXIT_FAILED


def preflight(kernel: Kernel) -> int:
    """Whether an update can start on *kernel*, asked before anything is
    journaled: 0 if so; otherwise probe's reason goes to stderr and its exit
    code (3 not possible here, 4 device busy) is returned."""
    from orchestrator.luo._probe import probe

    report = probe(kernel, try_kinds=False)
    if report.possible:
        return 0
    print(f"liveupdate: cannot run an update: {report.reason}", file=sys.stderr)
    return report.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.engine._engine import Engine, check_playbook
    from orchestrator.errors import UnfinishedUpdateError

    control = _agent_socket(args)
    if control is not None:
        return _run_via_agent(control, args.playbook)
    playbook, kernel, state, pm = _load(args)
    problems = check_playbook(pm, playbook)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if code := preflight(kernel):
        return code
    engine = Engine(playbook, kernel, state, pm=pm, reporter=Printer())
    try:
        outcome = anyio.run(engine.run)
    except UnfinishedUpdateError as exc:
        print(f"liveupdate: {exc}", file=sys.stderr)
        return EXIT_UNFINISHED
    if engine.journal_error is not None:
        print(
            f"liveupdate: {engine.journal_error}; the update was undone all the "
            f"same, but the journal could not say so: once the disk is fixed, "
            f"run 'liveupdate resume {args.playbook} --state-dir {state}' to "
            "close it",
            file=sys.stderr,
        )
    return _finish_message(outcome, state)


def _held_hint(state: Path) -> str:
    """Where the retrieved data is while no resume runs, for error messages."""
    from orchestrator.errors import KeeperError
    from orchestrator.restore._keeper import Keeper

    try:
        keeper = Keeper.connect(state)
    except KeeperError:
        return ""
    if keeper is None:
        return ""
    keeper.close()
    return (
        f"; nothing is lost: the preserved data is held by the keeper "
        f"(pid {keeper.pid}) until resume completes"
    )


def cmd_resume(args: argparse.Namespace) -> int:
    import anyio

    from orchestrator.engine._engine import Engine, Outcome
    from orchestrator.errors import OrchestratorError

    state = Path(args.state_dir) if args.state_dir else None
    try:
        playbook, kernel, state, pm = _load(args, in_blackout=PREFETCHED is not None)
        engine = Engine(playbook, kernel, state, pm=pm, reporter=Printer())
        outcome = anyio.run(engine.resume, PREFETCHED)
    except OrchestratorError as exc:
        hint = _held_hint(state) if state is not None else ""
        print(
            f"liveupdate: {exc}{hint}. Fix this, then run the same command again.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if outcome is Outcome.NOTHING:
        print("nothing to resume: no update in progress")
        return 0
    if outcome is Outcome.FAILED and engine.state_after_kexec():
        print(
            f"resume FAILED after the kexec{_held_hint(state)}. Fix the cause "
            "(see 'liveupdate status'), then run the same command again.",
            file=sys.stderr,
        )
    return _finish_message(outcome, state)


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.observe._status import summarize

    status = summarize(Path(args.state_dir))
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(status.render())
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from orchestrator.restore._journal import lock_holder

    if args.state_dir is not None:
        refusal = _cannot_cancel(Path(args.state_dir))
        if refusal:
            print(f"liveupdate cancel: {refusal}", file=sys.stderr)
            return EXIT_FAILED
    control = _agent_socket(args)
    if control is not None:
        import httpx

        transport = httpx.HTTPTransport(uds=str(control))
        with httpx.Client(
            transport=transport, base_url="http://agent", timeout=30
        ) as http:
            answer = http.post("/v1/cancel")
        if answer.status_code == 202:
            print("asked the agent to cancel its update")
            return 0
        print(f"the agent: {answer.json().get('error')}")
        return 0
    if args.state_dir is None:
        print(
            "liveupdate cancel: --state-dir is needed when no agent runs",
            file=sys.stderr,
        )
        return 2

    holder = lock_holder(Path(args.state_dir))
    if holder is None:
        print(
            "no orchestrator is running; to cancel an interrupted update run "
            "'liveupdate resume' (it cancels one that stopped before the kexec)"
        )
        return 0
    pid = int(holder.split()[1])
    os.kill(pid, signal.SIGTERM)
    print(f"asked the orchestrator (pid {pid}) to cancel")
    return 0


def _cannot_cancel(state: Path) -> str | None:
    """Why the update in *state* cannot be cancelled (None: it can)."""
    from orchestrator.luo import kernel_from_spec
    from orchestrator.restore._journal import read_journal, unfinished

    run = unfinished(read_journal(state))
    kexec = next((r for r in run if r["event"] == "kexec"), None)
    if kexec is None:
        return None
    try:
        boot = kernel_from_spec(str(run[0].get("kernel", "real"))).boot_id()
    except (OSError, ValueError):
        return None
    if boot == kexec["boot_id"]:
        return None
    return (
        f"update {run[0]['run']} is past the kexec: there is nothing left to "
        "cancel, only to finish ('liveupdate resume' does; see 'liveupdate status')"
    )


DEMO_DIR = Path(".state/demo")
DEMO_MARK = ".liveupdate-demo"
"""A file the demo leaves in its directory: only such a directory (or an
empty or new one) is ever wiped by the next demo."""
DEMO_PLUGINS = frozenset({"workloads", "kexec", "faults"})
"""Plugins whose effects the demo keeps inside its directory."""


def _demo_dir(state: Path) -> None:
    """Make *state* a fresh demo directory, wiping a previous demo's.

    :raises InvalidArgumentError: *state* holds something that is not a demo's.
    """
    from orchestrator.demo.kv import stop
    from orchestrator.errors import InvalidArgumentError

    if state.exists() and not (state / DEMO_MARK).is_file():
        if not state.is_dir() or any(state.iterdir()):
            raise InvalidArgumentError(
                str(state),
                "not a demo directory (no .liveupdate-demo in it) and not empty: "
                "the demo wipes its directory; give a new one with --state-dir",
            )
    from orchestrator.restore._journal import read_journal, resume_command, unfinished

    left = unfinished(read_journal(state)) if state.is_dir() else []
    if left:
        from orchestrator.errors import UnfinishedUpdateError

        raise UnfinishedUpdateError(
            left[0]["run"],
            next((r["state"] for r in reversed(left) if r["event"] == "state"), "?"),
            any(r["event"] == "kexec" for r in left),
            resume_command(left[0], state),
        )
    stop(state / "workloads")  # a previous demo's stores, kept with --keep
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    (state / DEMO_MARK).write_text("made by 'liveupdate demo', which may wipe it\n")


def _demo_playbook(source: Path, state: Path, kernel_spec: str) -> Path:
    """A copy of playbook *source* in *state* that writes nowhere else.

    Its ``kernel``, ``state_dir`` and ``next_kernel`` image are replaced by the
    demo's own (the image is a file the demo writes in *state*; no initrd), and
    the steps' ``registry`` and ``trace`` options are dropped (the workloads
    then live in ``STATE/workloads``).

    :raises InvalidArgumentError: a step names a plugin the demo cannot
        keep inside its directory.
    """
    import yaml

    from orchestrator.engine._playbook import load_playbook
    from orchestrator.errors import InvalidArgumentError

    playbook = load_playbook(source)  # a malformed playbook: file:line
    for step in playbook.steps():
        if step.plugin not in DEMO_PLUGINS:
            raise InvalidArgumentError(
                f"{step.where}",
                f"the demo runs only the {', '.join(sorted(DEMO_PLUGINS))} plugins "
                f"(plugin {step.plugin!r} acts outside the demo directory)",
            )
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    image = state / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    cmdline = playbook.next_kernel.cmdline if playbook.next_kernel else None
    doc.update(
        kernel=kernel_spec,
        state_dir=str(state),
        next_kernel={"image": str(image), "initrd": None, "cmdline": cmdline},
    )
    for phase in (doc.get("phases") or {}).values():
        for step in (phase or {}).get("steps") or ():
            options = step.get("with")
            if isinstance(options, dict):
                options.pop("registry", None)
                options.pop("trace", None)
    copy = state / "playbook.yaml"
    copy.write_text(
        f"# {source.absolute()}, made to run inside {state}\n"
        + yaml.safe_dump(doc, sort_keys=False),
        encoding="utf-8",
    )
    return copy


def cmd_demo(args: argparse.Namespace) -> int:
    """Start demo workloads on a simulated kernel, run the demo playbook, resume.

    Everything happens in the demo directory (``--state-dir``, default
    ``.state/demo``): the playbook's own kernel, state_dir and next_kernel are
    ignored, so a host's playbook cannot make the demo touch its files. The
    workloads are stopped at the end unless ``--keep``.
    """
    from orchestrator.demo.kv import stop

    state = Path(args.state_dir or DEMO_DIR).absolute()
    _demo_dir(state)
    from orchestrator.luo.sim import SimKernel

    kernel = SimKernel(state / "kernel")
    playbook_path = _demo_playbook(args.playbook, state, kernel.spec)
    registry = state / "workloads"
    try:
        return _demo(args.playbook, playbook_path, state, kernel)
    finally:
        if not args.keep:
            stopped = stop(registry)
            if stopped:
                print(
                    f"\n== stopped the workloads ({', '.join(stopped)}); "
                    "'liveupdate demo --keep' leaves them running"
                )


def _demo(source: Path, playbook_path: Path, state: Path, kernel: SimKernel) -> int:
    import subprocess

    from orchestrator.demo import launch, wait_published
    from orchestrator.engine._playbook import load_playbook

    playbook = load_playbook(playbook_path)
    registry = state / "workloads"
    quiesce = playbook.plan(_phase("quiesce"))
    opts = dict(quiesce.steps[0].options) if quiesce else {}
    count, size = int(opts.get("count", 2)), int(opts.get("size_mib", 128))
    print(f"== the demo runs in {state} (kernel, state, next kernel: its own)")
    print(f"== starting {count} key-value workloads, {size} MiB of memfd data each")
    for i in range(count):
        pid = launch(registry, f"kv{i}", size, kernel.spec)
        info = wait_published(registry, f"kv{i}", pid)
        print(f"   kv{i}: pid {pid}, sha256 {info['sha256'][:16]}...")
    base = [sys.executable, "-m", "orchestrator.cli"]
    common = ["--kernel", kernel.spec, "--state-dir", str(state)]
    print(f"\n== liveupdate run {source} (old kernel, boot {kernel.boot_id()[:8]})")
    run = subprocess.run(
        [*base, "run", str(playbook_path), *common, "--no-agent"], check=False
    )
    if run.returncode != -signal.SIGKILL:
        print(
            f"the update did not reach the kexec (exit {run.returncode})",
            file=sys.stderr,
        )
        return run.returncode if run.returncode > 0 else EXIT_FAILED
    print(
        f"\n== the simulated kexec ended every process; new kernel boot "
        f"{kernel.boot_id()[:8]}"
    )
    for line in kernel.log_lines():
        if "liveupdate" in line:
            print(f"   kernel: {line}")
    print(f"\n== liveupdate resume {source}")
    resume = subprocess.run([*base, "resume", str(playbook_path), *common], check=False)
    if resume.returncode != 0:
        return resume.returncode
    from orchestrator.demo.kv import ask

    print("\n== the workloads in the new kernel")
    for i in range(count):
        info = json.loads((registry / f"kv{i}.json").read_text())
        print(
            f"   kv{i}: pid {info['pid']}, sha256 {ask(info['socket'], 'SUM')[:16]}... "
            f"(same as before the kexec: every byte came back)"
        )
    return 0


def _phase(name: str) -> Any:
    from orchestrator.engine._phases import Phase

    return Phase(name)
