"""Guest side of the ``engine`` and ``cancel`` VM scenarios (runs inside the VM).

``python -m tests.vm.engine_guest pre [--count N] [--mib M]``
    writes a playbook (kernel real, state dir on the out share, next kernel =
    the harness's bzImage with the next stage's command line), starts N demo
    key-value workloads of M MiB, records their SHA-256, then runs
    ``liveupdate run`` (traced, see below): it kexecs, so this never returns
    unless the update failed.
``python -m tests.vm.engine_guest post``
    *is* ``liveupdate resume PLAYBOOK --kernel real --state-dir STATE`` (traced),
    then checks ``liveupdate status --json`` and every workload's ``SUM``, and
    writes ``$LUO_VM_OUT/engine-post.json``.
``python -m tests.vm.engine_guest cancel [--count N] [--mib M]``
    one boot: a playbook whose preserve phase fails after the workloads'
    preserve step; expects exit 5 and checks that everything is back
    (``$LUO_VM_OUT/cancel.json``).

*Traced* means: the orchestrator's own CLI (``orchestrator.cli.main``, what the
``liveupdate`` console script calls) runs in this process with a
``sys.addaudithook`` hook that writes a mark to ``/dev/kmsg`` -- so the host
stamps it on the serial line -- for the kernel-facing calls: the open of
/dev/liveupdate, every LUO ioctl (and the first audited event after it,
``<name>.after``), every process spawn (workload launches), and the
``kexec_file_load``/``reboot`` syscalls. A hook is a few microseconds per
audited event; the marks are kmsg writes only (no file, no fsync).

This module's top level imports only ``os`` and ``sys``: the post stage is on
the restore path, inside the blackout window.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # as orchestrator._compat: no ``typing`` import at run time
if TYPE_CHECKING:
    from typing import Any

MARK_PREFIX = (
    "luo-vm: mark"  # == tests.vm.guest.MARK_PREFIX (not imported: cheap start)
)
SESSION_NAME = "lu-workloads"
OUT = os.environ.get("LUO_VM_OUT", "/run/luo-vm/out")
STATE = OUT + "/engine-state"
PLAYBOOK = OUT + "/engine-playbook.yaml"
REGISTRY = "/run/luo-engine/workloads"  # tmpfs: unix sockets; rebuilt after the kexec

# ioctl request -> mark name (merged ABI, _IO(0xBA, nr))
_IOCTLS = {
    0xBA00: "CREATE_SESSION",
    0xBA01: "RETRIEVE_SESSION",
    0xBA40: "PRESERVE_FD",
    0xBA41: "RETRIEVE_FD",
    0xBA42: "FINISH",
    0xBA43: "GET_NAME",
}
# first import of these = a phase of the CLI's start (marked once each)
_WATCH_IMPORTS = frozenset(
    {
        "orchestrator.cli._update",
        "orchestrator.cli._metrics",
        "orchestrator.engine._playbook",
        "orchestrator.engine._engine",
        "plugins",
        "anyio",
        "importlib.metadata",
    }
)

_kmsg_fd = -1
_boot = os.environ.get("LUO_VM_BOOT", "0")


def kmark(name: str) -> None:
    """A mark on the console only (the host stamps it); cheap enough for a hook."""
    global _kmsg_fd
    import time

    if _kmsg_fd < 0:
        try:
            _kmsg_fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
    line = f"<5>{MARK_PREFIX} boot={_boot} name={name} wall={time.time():.6f}\n"
    try:
        os.write(_kmsg_fd, line.encode())
    except OSError:
        # The keeper, forked from resume, closes every fd it inherited (this
        # one too) and keeps the audit hook: open /dev/kmsg again there.
        _kmsg_fd = -1
        try:
            _kmsg_fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
            os.write(_kmsg_fd, line.encode())
        except OSError:
            pass


def install_trace() -> None:
    """Mark the kernel-facing calls of this process (see the module docstring)."""
    pending: list[str] = []
    counts: dict[str, int] = {}

    def numbered(name: str) -> str:
        n = counts.get(name, 0) + 1
        counts[name] = n
        return f"{name}.{n}"

    def hook(event: str, args: tuple[object, ...]) -> None:
        if pending:
            kmark(pending.pop() + ".after")
        if event == "fcntl.ioctl":
            request = args[1]
            name = _IOCTLS.get(request) if isinstance(request, int) else None
            if name is not None:
                label = "lu." + numbered(name)
                kmark(label)
                pending.append(label)
        elif event == "open":
            if args[0] == "/dev/liveupdate":
                kmark("lu." + numbered("open_device"))
        elif event == "subprocess.Popen":
            argv = args[1]
            who = "?"
            if isinstance(argv, list | tuple) and "--name" in argv:
                who = str(argv[list(argv).index("--name") + 1])
            kmark(f"lu.spawn.{who}")
        elif event == "os.kill":
            if args[1] == 19 and "lu.SIGSTOP" not in counts:  # SIGSTOP: freeze
                counts["lu.SIGSTOP"] = 1
                kmark("lu.SIGSTOP.first")
        elif event == "import":
            module = str(args[0])
            if module in _WATCH_IMPORTS and module not in counts:
                counts[module] = 1
                kmark(f"import.{module}")

    sys.addaudithook(hook)


def trace_kexec() -> None:
    """Mark kexec_file_load and reboot(KEXEC): they go through ctypes, which
    raises no audit event per call, so wrap them (only for ``run``: importing
    ``_kexec`` pulls in ctypes, platform and subprocess, ~0.7 s under TCG)."""
    from orchestrator.luo import _kexec

    for fn in ("kexec_file_load", "reboot_kexec"):
        original = getattr(_kexec, fn)

        def wrapped(*a: object, _f: Any = original, _n: str = fn) -> Any:
            kmark(f"lu.{_n}")
            return _f(*a)

        setattr(_kexec, fn, wrapped)


def traced_cli(argv: list[str]) -> int:
    """``liveupdate ARGV`` in this process, traced."""
    install_trace()
    if argv[0] == "run":
        trace_kexec()
    kmark(f"cli.{argv[0]}.start")
    from orchestrator.cli import main

    rc = main(argv)
    kmark(f"cli.{argv[0]}.end")
    return rc


# --------------------------------------------------------------------------- helpers


def _next_kernel() -> tuple[str, str]:
    return os.environ["LUO_VM_KERNEL"], os.environ["LUO_VM_NEXT_CMDLINE"]


def write_playbook(
    path: str, *, extra_preserve: list[dict[str, object]] | None = None
) -> None:
    """The demo playbook's phases on the real kernel (JSON is valid YAML)."""
    import json

    image, cmdline = _next_kernel()
    ws: dict[str, object] = {"plugin": "workloads", "with": {"registry": REGISTRY}}
    playbook = {
        "name": "vm-engine",
        "description": "demo playbook phases through a real kexec in the VM harness",
        "kernel": "real",
        "state_dir": STATE,
        "next_kernel": {"image": image, "initrd": None, "cmdline": cmdline},
        # TCG is ~10x slower than a real host: generous budgets
        "blackout_budget": "120s",
        "defaults": {"timeout": "300s", "retry": {"attempts": 1}},
        "phases": {
            "quiesce": {"steps": [ws]},
            "preserve": {"steps": [ws, *(extra_preserve or [])]},
            "prepare": {"steps": [{"plugin": "kexec"}]},
            "freeze": {"steps": [ws]},
            "restore": {"steps": [ws]},
            "finish": {"steps": [ws]},
        },
    }
    with open(path, "w") as f:
        f.write("# written by tests.vm.engine_guest\n")
        json.dump(playbook, f, indent=2)
        f.write("\n")


def start_workloads(count: int, mib: int) -> list[dict[str, object]]:
    """Start *count* demo stores of *mib* MiB, one after the other; their entries.

    One at a time on purpose: started side by side, their memfd pages
    interleave physically, and the next kernel's KHO memory retrieve (one
    ``memblock_reserve`` per preserved folio, merged only when adjacent) took
    1.41 s instead of 0.46 s for the same 1 GiB.
    """
    from pathlib import Path

    from orchestrator.demo import launch, wait_published
    from tests.vm.guest import mark

    registry = Path(REGISTRY)
    mark("workloads.start", count=count, mib=mib)
    infos = []
    for i in range(count):
        pid = launch(registry, f"kv{i}", mib, "real")
        infos.append(dict(wait_published(registry, f"kv{i}", pid, timeout=300)))
    mark("workloads.published")
    for info in infos:
        print(
            f"workload {info['name']}: pid {info['pid']}, {info['size']} bytes, "
            f"sha256 {info['sha256']}",
            flush=True,
        )
    return infos


def liveupdate(*args: str, echo: bool = True) -> tuple[int, str]:
    """``liveupdate ARGS`` as a separate process (the console script); rc, stdout."""
    import subprocess

    exe = os.path.join(os.path.dirname(sys.executable), "liveupdate")
    done = subprocess.run(
        [exe, *args], capture_output=True, text=True, check=False, timeout=300
    )
    if echo:
        sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode, done.stdout


def status_json() -> dict[str, object]:
    import json

    rc, out = liveupdate("status", "--state-dir", STATE, "--json", echo=False)
    data: dict[str, object] = json.loads(out) if rc == 0 else {"rc": rc}
    return data


def sums(infos: list[dict[str, object]]) -> dict[str, str]:
    from orchestrator.demo.kv import ask

    return {str(i["name"]): ask(str(i["socket"]), "SUM", timeout=300) for i in infos}


def _write(name: str, data: object) -> None:
    from pathlib import Path

    from tests.vm.guest import write_json

    write_json(Path(OUT) / name, data)


def _journal() -> list[dict[str, object]]:
    from orchestrator.restore._journal import read_journal

    return read_journal(STATE)


# --------------------------------------------------------------------------- stages


def stage_pre(count: int, mib: int) -> int:
    from tests.vm.guest import mark

    write_playbook(PLAYBOOK)
    infos = start_workloads(count, mib)
    _write("engine-pre.json", {"workloads": infos, "count": count, "mib": mib})
    mark("run.spawn")
    argv = ["run", PLAYBOOK, "--kernel", "real", "--state-dir", STATE]
    print(f"liveupdate {' '.join(argv)}", flush=True)
    # Returns only when the update did not reach the kexec.
    rc = traced_cli(argv)
    print(f"liveupdate run returned {rc}: no kexec", flush=True)
    return rc or 1


def stage_post() -> int:
    kmark("resume.start")  # Python is up (site included, as for the console script)
    argv = ["resume", PLAYBOOK, "--kernel", "real", "--state-dir", STATE]
    rc = traced_cli(argv)

    import json

    from tests.vm.guest import mark

    mark("resume.exited", rc=rc)
    print(f"liveupdate resume exited with {rc}", flush=True)
    pre = json.loads(open(OUT + "/engine-pre.json").read())
    before = {str(i["name"]): str(i["sha256"]) for i in pre["workloads"]}
    status = status_json()
    registry = []
    for name in sorted(before):
        with open(f"{REGISTRY}/{name}.json") as f:
            registry.append(json.load(f))
    mark("sums.start")
    after = sums(registry)
    mark("sums.done")
    for name in sorted(before):
        same = "==" if after.get(name) == before[name] else "!="
        print(
            f"{name}: SUM after {after.get(name)} {same} before {before[name]}",
            flush=True,
        )
    ok = (
        rc == 0
        and status.get("state") == "NORMAL"
        and status.get("outcome") == "completed"
        and after == before
    )
    _write(
        "engine-post.json",
        {
            "resume_rc": rc,
            "status": status,
            "before": before,
            "after": after,
            "registry": registry,
            "journal": _journal(),
            "ok": ok,
        },
    )
    return 0 if ok else 1


def stage_cancel(count: int, mib: int) -> int:
    import json

    from orchestrator.luo import LiveUpdateDevice, RealKernel
    from tests.vm.guest import mark

    write_playbook(
        PLAYBOOK,
        extra_preserve=[
            {"plugin": "faults", "with": {"fail": "injected after PRESERVE"}}
        ],
    )
    infos = start_workloads(count, mib)
    before = {str(i["name"]): str(i["sha256"]) for i in infos}
    boot_before = RealKernel().boot_id()
    mark("run.spawn")
    rc, _ = liveupdate("run", PLAYBOOK, "--kernel", "real", "--state-dir", STATE)
    mark("run.exited", rc=rc)
    print(f"liveupdate run exited with {rc} (expected 5: cancelled)", flush=True)
    status = status_json()
    with open("/sys/kernel/kexec_loaded") as f:
        kexec_loaded = f.read().strip()
    after = sums(infos)
    # The cancelled session was dropped: its name can be created again, and the
    # workloads' memfds can be preserved again (EBUSY if still held elsewhere).
    recreate: dict[str, object] = {}
    try:
        with LiveUpdateDevice.open(RealKernel()) as dev:
            with dev.create_session(SESSION_NAME) as session:
                recreate["created"] = True
                for n, info in enumerate(infos, start=1):
                    fd = os.open(
                        f"/proc/{info['pid']}/fd/{info['fd']}", os.O_RDWR | os.O_CLOEXEC
                    )
                    try:
                        session.preserve_fd(fd, n)
                    finally:
                        os.close(fd)
                recreate["re_preserved"] = len(infos)
    except Exception as exc:  # noqa: BLE001 - reported to the host
        recreate["error"] = f"{type(exc).__name__}: {exc}"
    same_boot = RealKernel().boot_id() == boot_before
    print(
        f"status {json.dumps({k: status.get(k) for k in ('state', 'outcome', 'error')})}"
        f"; kexec_loaded {kexec_loaded}; same boot {same_boot}; recreate {recreate}",
        flush=True,
    )
    for name in sorted(before):
        same = "==" if after.get(name) == before[name] else "!="
        print(f"{name}: SUM {after.get(name)} {same} before {before[name]}", flush=True)
    ok = (
        rc == 5
        and status.get("state") == "NORMAL"
        and status.get("outcome") == "cancelled"
        and kexec_loaded == "0"
        and after == before
        and same_boot
        and recreate.get("created") is True
        and "error" not in recreate
    )
    _write(
        "cancel.json",
        {
            "run_rc": rc,
            "status": status,
            "kexec_loaded": kexec_loaded,
            "same_boot": same_boot,
            "before": before,
            "after": after,
            "recreate": recreate,
            "journal": _journal(),
            "ok": ok,
        },
    )
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["post"]:
        return stage_post()  # no argparse: cheap start on the restore path
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.vm.engine_guest")
    p.add_argument("stage", choices=["pre", "post", "cancel"])
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args(argv)
    if args.stage == "pre":
        return stage_pre(args.count, args.mib)
    return stage_cancel(args.count, args.mib)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
