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
