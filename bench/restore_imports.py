"""Which modules ``liveupdate resume`` has imported by its first kernel call.

    python -m bench.restore_imports

Sets up a host that went through a (simulated) kexec with a journal to
resume, then runs ``python -X importtime -m orchestrator.cli resume PLAYBOOK
--state-dir DIR`` with ``LIVEUPDATE_EXIT_AFTER=first-kernel-call`` (it exits
right after RETRIEVE_SESSION, the restore path's first kernel call) and with
``LIVEUPDATE_TEXTFILE`` and ``LIVEUPDATE_PUSHGATEWAY`` set, as on a host that
exports metrics. Prints every module imported by then (the project's, the
third-party ones, and how many of the standard library) and exits 1 if any of
the metrics or report stack, or another heavy library, is among them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.resume_cold_start import ROOT, prepare

FORBIDDEN = {
    "prometheus_client",
    "httpx",
    "anyio",
    "pluggy",
    "tenacity",
    "yaml",
    "cairosvg",
    "orchestrator.observe",
    "orchestrator.observe._metrics",
    "orchestrator.observe._export",
    "orchestrator.observe._report",
    "orchestrator.observe._runs",
    "orchestrator.cli._metrics",
    "orchestrator.engine._engine",
}


def imported_by_first_kernel_call(state: Path, book: Path) -> list[str]:
    """The modules, in import order, from ``-X importtime``'s report."""
    env = {
        **os.environ,
        "LIVEUPDATE_EXIT_AFTER": "first-kernel-call",
        "LIVEUPDATE_TEXTFILE": str(state / "liveupdate.prom"),
        "LIVEUPDATE_PUSHGATEWAY": "http://127.0.0.1:9091",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "orchestrator.cli",
            "resume",
            str(book),
            "--state-dir",
            str(state),
            "--kernel",
            f"sim:{state / 'kernel'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    modules = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                modules.append(name)
    return modules


def release(state: Path) -> None:
    """Let go of the keeper the measured resume left holding the sessions."""
    from orchestrator.restore._keeper import Keeper

    keeper = Keeper.connect(state)
    if keeper is not None:
        keeper.finish()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        snapshot, book = prepare(base)
        state = base / "run"
        shutil.copytree(snapshot, state, symlinks=True)
        modules = imported_by_first_kernel_call(state, book)
        exported = (state / "liveupdate.prom").exists()
        release(state)
    stdlib = [m for m in modules if m.split(".")[0] in sys.stdlib_module_names]
    ours = [m for m in modules if m.split(".")[0] in ("orchestrator", "plugins")]
    other = [m for m in modules if m not in stdlib and m not in ours]
    print(f"modules imported by the first kernel call: {len(modules)}")
    print(f"  orchestrator: {', '.join(ours)}")
    print(f"  third-party:  {', '.join(other) or '(none)'}")
    print(f"  stdlib:       {len(stdlib)} modules")
    bad = sorted(m for m in modules if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN)
    if bad or exported:
        print(f"FAIL: on the restore path: {', '.join(bad) or 'a metrics export'}")
        return 1
    print(
        "none of the metrics or report stack (prometheus_client, "
        "orchestrator.observe, orchestrator.cli._metrics) nor anyio, pluggy, "
        "tenacity, yaml, httpx"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
