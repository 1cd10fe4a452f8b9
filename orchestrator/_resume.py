"""The first thing ``liveupdate resume`` does after a kexec: take the sessions back.

This runs inside the blackout window, so it imports only the standard library,
the journal reader and the kernel layer -- no anyio, pluggy, tenacity or YAML.
It reads the journal, decides whether this boot came through the run's kexec,
and if so retrieves every session of the run's manifest: the restore path's
first kernel call. The engine (imported afterwards) then restores workloads
with the retrieved sessions.

Set ``LIVEUPDATE_EXIT_AFTER=first-kernel-call`` to exit right after that call:
``bench/resume_cold_start.py`` measures the cold start with it.
"""

from __future__ import annotations

import os

from orchestrator._compat import TYPE_CHECKING

from ._journal import last_run, read_journal
from ._preserve import Retriever
from .luo import kernel_from_spec

if TYPE_CHECKING:
    from collections.abc import Sequence


def _option(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def prefetch(argv: Sequence[str]) -> Retriever | None:
    """Retrieve the sessions of an interrupted run if this boot came through its
    kexec; ``None`` when there is nothing to retrieve or not enough to go on
    (no ``--state-dir``: the playbook must be read first, on the slow path)."""
    state_dir = _option(argv, "--state-dir")
    if state_dir is None:
        return None
    records = last_run(read_journal(state_dir))
    if not records or any(r["event"] == "run_end" for r in records):
        return None
    kexec = next((r for r in reversed(records) if r["event"] == "kexec"), None)
    spec = _option(argv, "--kernel") or records[0].get("kernel")
    kernel = kernel_from_spec(spec)
    if kexec is None or kexec["boot_id"] == kernel.boot_id():
        return None  # still the old kernel: a cancel, not time-critical
    abi = next((r["abi"] for r in records if r["event"] == "abi"), "merged")
    names = sorted(
        {
            entry["session"]
            for r in records
            if r["event"] == "step_end" and r.get("ok")
            for entry in (r.get("manifest") or {}).values()
            if "session" in entry
        }
    )
    retriever = Retriever(kernel, abi)
    retriever.open_sessions(names)
    if os.environ.get("LIVEUPDATE_EXIT_AFTER") == "first-kernel-call":
        os._exit(0)
    return retriever
