"""The demo workload: a key-value store keeping its data in a memfd.

:mod:`orchestrator.demo.kv` is the store (``python -m orchestrator.demo.kv``);
this module starts stores and talks to them, for ``liveupdate demo``, the
``workloads`` plugin, the benchmarks and the tests. Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from orchestrator._compat import lazy_exports
from orchestrator.errors import WorkloadError

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.demo.kv import ask, running, stop
else:
    # Not imported with the package: ``python -m orchestrator.demo.kv`` would
    # otherwise run the store's module twice (and runpy warns about it).
    __getattr__, __dir__ = lazy_exports(
        __name__, globals(), dict.fromkeys(("ask", "running", "stop"), ".kv")
    )

__all__ = [
    "WorkloadError",
    "ask",
    "hold",
    "holder_argv",
    "launch",
    "launch_argv",
    "running",
    "stop",
    "wait_published",
]


def launch_argv(registry: Path, name: str, size_mib: int = 0) -> list[str]:
    """The command that starts store *name* as a daemon (add ``--memfd N``)."""
    return [
        sys.executable,
        "-m",
        "orchestrator.demo.kv",
        "--name",
        name,
        "--registry",
        str(registry),
        "--size-mib",
        str(size_mib),
        "--detach",
    ]


def launch(
    registry: Path, name: str, size_mib: int, kernel_spec: str, memfd: int | None = None
) -> int:
    """Start one demo store as a daemon (it outlives whoever started it); its pid."""
    argv = launch_argv(registry, name, size_mib)
    if memfd is not None:
        argv += ["--memfd", str(memfd)]
    registry.mkdir(parents=True, exist_ok=True)
    with open(registry / f"{name}.log", "ab") as log:
        done = subprocess.run(
            argv,
            pass_fds=(memfd,) if memfd is not None else (),
            check=False,
            env={**os.environ, "LIVEUPDATE_KERNEL": kernel_spec},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=60,
        )
    if done.returncode != 0:
        raise WorkloadError(
            f"workload {name!r} failed to start (see {registry / name}.log)"
        )
    return int(done.stdout)


def wait_published(
    registry: Path, name: str, pid: int, timeout: float = 120.0
) -> dict[str, Any]:
    """The registry entry of store *name* once process *pid* has published it."""
    deadline = time.monotonic() + timeout
    path = registry / f"{name}.json"
    while time.monotonic() < deadline:
        try:
            info: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            info = {}
        if info.get("pid") == pid:
            return info
        time.sleep(0.01)
    raise WorkloadError(
        f"workload {name!r} (pid {pid}) did not start within {timeout:g} s"
    )


_HOLDER = (
    # Written in place (no rename: one process less): a reader that finds it
    # half-written reads it again, as for any other workload.
    "sleep infinity >/dev/null 2>&1 & pid=$!\n"
    'printf \'{"name": "%s", "pid": %d, "fd": %d, "session": "%s"}\\n\' '
    '"$1" "$pid" "$5" "$3" > "$2/$1.json" && echo "$pid"\n'
)


def holder_argv(registry: Path, name: str, session: str) -> list[str]:
    """The command of a *holder*: the lightest workload there is, a ``sleep``
    that keeps a memfd open (``--memfd N`` appended) and publishes itself
    without a socket -- for updates at scale (``bench.scale``)."""
    return ["/bin/sh", "-c", _HOLDER, "holder", name, str(registry), session]


def hold(registry: Path, name: str, memfd: int, session: str) -> int:
    """Start a holder of *memfd* in group *session*; its pid once published.

    Its ``REGISTRY/<name>.spec.json`` names its group and restart command, so
    the ``workloads`` plugin preserves it in that group's session and starts
    it again after the kexec.
    """
    registry.mkdir(parents=True, exist_ok=True)
    restart = {"argv": holder_argv(registry, name, session), "fd_arg": "--memfd"}
    (registry / f"{name}.spec.json").write_text(
        json.dumps({"session": session, "restart": restart})
    )
    done = subprocess.run(
        [*restart["argv"], "--memfd", str(memfd)],
        pass_fds=(memfd,),
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        timeout=60,
    )
    pid = int(done.stdout)
    wait_published(registry, name, pid)
    return pid
