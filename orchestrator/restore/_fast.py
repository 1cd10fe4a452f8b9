"""The restores the engine resolved before the kexec, run before the engine loads.

The blackout ends when the last workload runs again, so the restore path
starts them first. Before the kexec, each built-in plugin that can turns its
restore step into *spawn actions* (``lu_restore_plan``): one command per
preserved file, the file's manifest entry, and how the command tells that it
serves. The engine writes them into the restore plan (``restore`` lines, one
JSON object each). After the kexec, right after the keeper took the sessions
back, :func:`restore` runs them -- all at once -- with nothing imported but
``os``, ``json`` and the kernel layer: no argument parser, anyio, pluggy,
YAML or journal replay. Then it writes what it did to
``STATE_DIR/restore-fast`` and the engine, loaded only now, runs the restore
phase in full. Restore hooks are idempotent, so the built-in ones adopt what
this started, and the restores of third-party plugins run then, still inside
the window. The blackout ends at this module's end when every restore step
was done here, else at the end of the restore phase.

A spawn action (JSON)::

    {"index": 1, "step": "restore-host-services", "key": "kv-0",
     "entry": {"session": "lu-workloads", "token": 1},
     "argv": ["/usr/bin/python3", "-m", "orchestrator.demo.kv", ...],
     "fd_arg": "--memfd", "env": {"LIVEUPDATE_KERNEL": "real"},
     "log": "/var/lib/liveupdate/workloads/kv-0.log",
     "published": "/var/lib/liveupdate/workloads/kv-0.json"}

The command gets the retrieved file as an inherited fd, its number after
``fd_arg``; it prints the pid of the process that will serve and exits
(a daemon's usual ``--detach``), and that process writes ``published`` (JSON
with ``pid`` and ``fd``) once it serves. A process already serving the very
file (an interrupted resume started it) is adopted, not started twice.

With ``"wait": "exit"`` instead (and no ``published``), the command itself
does the whole restore and exits 0 once the workload runs: the ``qemu``
plugin's ``python -m orchestrator.vmm.restore`` (a new QEMU on the RAM,
device state loaded, ``cont``). Its stdout goes to the log.

Anything that goes wrong here is recorded and left to the engine's restore
phase, which starts what is missing the slow way: the keeper holds every
file meanwhile, so nothing is lost.
"""

from __future__ import annotations

import json
import os
import time

from orchestrator._compat import TYPE_CHECKING

from ._crashpoint import crash_point

if TYPE_CHECKING:
    from typing import Any

    from orchestrator.luo import Kernel

    from ._keeper import Keeper

RESULT_FILE = "restore-fast"  # removed with the plan (``_resume.remove_plan``)
STARTED_FILE = "restore-fast.started"  # so is this: what an attempt started
READY_TIMEOUT = 120.0
"""Seconds a restored command has to publish itself."""


def clocks(kernel: Kernel) -> dict[str, float]:
    """Now on the three clocks a blackout is measured with.

    ``boottime`` counts from this kernel's clock start (CLOCK_BOOTTIME): in the
    new kernel, the time since the kexec landed, less the part no clock sees.
    """
    return {
        "wall": time.time(),
        "mono": time.monotonic(),
        "boottime": kernel.since_boot(),
    }


class _Started:
    __slots__ = ("action", "error", "helper", "pid", "reader", "ready", "started")

    def __init__(self, action: dict[str, Any]) -> None:
        self.action = action
        self.pid: int | None = None
        self.started = 0.0
        self.ready: float | None = None
        self.reader = -1
        self.helper = -1
        self.error: str | None = None


def _published(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def serving(published: str, fd: int) -> int | None:
    """The pid of a live process that published *published* and serves the
    very file *fd* is, else None."""
    from orchestrator.luo._fds import holds_same_file

    info = _published(published)
    if info is None:
        return None
    try:
        pid, number = int(info["pid"]), int(info["fd"])
    except (TypeError, KeyError, ValueError):
        return None
    return pid if holds_same_file(pid, number, fd) else None


def _holders(fd: int, exclude: set[int]) -> set[int]:
    """The processes, but *exclude*, that hold the file *fd* is (a /proc scan)."""
    ours = os.fstat(fd)
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            links = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for link in links:
            try:
                st = os.stat(f"/proc/{entry}/fd/{link}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
                found.add(int(entry))
                break
    return found


def _adopt_earlier(published: str, fd: int, exclude: set[int]) -> int | None:
    """After an interrupted attempt: the pid of the process it started for this
    file once that one has published itself, or None if nothing of it is left.

    The attempt may have died between starting a command and its publishing:
    a second start would put two processes on one file. So wait for whoever
    holds the file to publish, or to go away.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        pid = serving(published, fd)
        if pid is not None:
            return pid
        if not _holders(fd, exclude):
            return None
        time.sleep(0.01)
    raise OSError(
        f"a process started by an earlier attempt holds the file but did not "
        f"publish itself within {READY_TIMEOUT:g} s"
    )


def _spawn(s: _Started, fd: int) -> None:
    """Start the action's command with *fd* inherited; its stdout is a pipe
    (or the log, for a command waited for until it exits)."""
    a = s.action
    argv = [str(x) for x in a["argv"]] + [str(a["fd_arg"]), str(fd)]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in a.get("env", {}).items()})
    os.makedirs(os.path.dirname(str(a["log"])) or ".", exist_ok=True)  # on a tmpfs
    reader, writer = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    log = os.open(
        str(a["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
    )
    try:
        os.set_inheritable(fd, True)
        s.helper = os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, log if _exits(a) else writer, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
        )
    except BaseException:
        os.close(reader)
        raise
    finally:
        os.set_inheritable(fd, False)
        for x in (writer, null, log):
            os.close(x)
    if a.get("wait") == "exit":
        os.close(reader)
    else:
        s.reader = reader


def _exits(a: dict[str, Any]) -> bool:
    return a.get("wait") == "exit"


def _pid_of(s: _Started) -> None:
    """Read the pid the command printed and reap it."""
    out = b""
    try:
        while chunk := os.read(s.reader, 64):
            out += chunk
    finally:
        os.close(s.reader)
        s.reader = -1
    _, status = os.waitpid(s.helper, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(f"exited with {code} (see {s.action['log']})")
    try:
        s.pid = int(out)
    except ValueError:
        raise OSError(f"printed {out[:40]!r}, not a pid") from None


def _reap(s: _Started) -> None:
    """A command that restores by itself: ready when it exited 0."""
    pid, status = os.waitpid(s.helper, os.WNOHANG)
    if pid == 0:
        return
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        s.ready = time.monotonic()
    else:
        s.error = f"exited with {code} (see {s.action['log']})"


def restore(
    kernel: Kernel,
    keeper: Keeper,
    actions: list[dict[str, Any]],
    state_dir: str,
    run_id: str,
) -> dict[str, Any]:
    """Run *actions* concurrently; write and return what was done."""
    begin = clocks(kernel)
    started = [_Started(a) for a in actions]
    marker = os.path.join(state_dir, STARTED_FILE)
    earlier = os.path.exists(marker)  # an interrupted attempt started commands
    exclude = {os.getpid(), keeper.pid}
    marks = -1
    # Start each command as soon as its file is back: the keeper retrieves the
    # next while the ones already started load.
    for s in started:
        try:
            fd = keeper.retrieve(s.action["entry"])
        except Exception as exc:  # noqa: BLE001  (recorded; the engine retries it)
            s.error = f"retrieve: {exc}"
            continue
        try:
            s.started = time.monotonic()
            published = str(s.action.get("published", ""))
            if published:
                s.pid = serving(published, fd.fileno())
                if s.pid is None and earlier:
                    s.pid = _adopt_earlier(published, fd.fileno(), exclude)
            if s.pid is not None:
                s.ready = time.monotonic()
            else:
                if marks < 0:  # before the first start: a crash may follow any time
                    marks = os.open(
                        marker,
                        os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                        0o600,
                    )
                os.write(marks, f"{s.action['key']}\n".encode())
                _spawn(s, fd.fileno())
                crash_point("spawn")
        except Exception as exc:  # noqa: BLE001
            s.error = f"start: {exc}"
        finally:
            fd.close()
    if marks >= 0:
        os.close(marks)
    for s in started:
        if s.reader >= 0:
            try:
                _pid_of(s)
            except Exception as exc:  # noqa: BLE001
                s.error = f"start: {exc}"
    waiting = [s for s in started if s.error is None and s.ready is None]
    deadline = time.monotonic() + READY_TIMEOUT
    while waiting:
        for s in list(waiting):
            if _exits(s.action):
                _reap(s)
                if s.ready is not None or s.error is not None:
                    waiting.remove(s)
                continue
            info = _published(str(s.action["published"]))
            if info is not None and info.get("pid") == s.pid:
                s.ready = time.monotonic()
                waiting.remove(s)
        if not waiting:
            break
        if time.monotonic() > deadline:
            for s in waiting:
                s.error = f"did not publish itself within {READY_TIMEOUT:g} s"
            break
        time.sleep(0.005)
    end = clocks(kernel)
    failed = {int(s.action["index"]) for s in started if s.error is not None}
    result = {
        "run": run_id,
        "boot_id": kernel.boot_id(),
        "begin": begin,
        "end": end,
        "done": sorted({int(a["index"]) for a in actions} - failed),
        "actions": [
            {
                "step": s.action["step"],
                "key": s.action["key"],
                "pid": s.pid,
                "started": s.started or None,
                "ready": s.ready,
                "error": s.error,
            }
            for s in started
        ],
    }
    _write(os.path.join(state_dir, RESULT_FILE), result)
    ok = len(started) - sum(1 for s in started if s.error is not None)
    os.write(
        2,
        f"liveupdate: restore path: {ok} of {len(started)} workloads running again, "
        f"{end['boottime']:.3f} s after this kernel started\n".encode(),
    )
    return result


def _write(path: str, result: dict[str, Any]) -> None:
    """Atomically; not fsynced: after a crash the restore runs again anyway."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def read_result(
    state_dir: str | os.PathLike[str], run_id: str
) -> dict[str, Any] | None:
    """What :func:`restore` did for run *run_id*, or None."""
    info = _published(os.path.join(state_dir, RESULT_FILE))
    return info if info is not None and info.get("run") == run_id else None
