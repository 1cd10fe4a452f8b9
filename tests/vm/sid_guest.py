"""Guest side of the ``sid`` scenario: record the userland, then run a stage.

``python -m tests.vm.sid_guest STAGE ARGS...`` writes
``$LUO_VM_OUT/sid-<stage>.json`` (the running Python's version, the versions
systemd, QEMU and kexec-tools report) and then *becomes* ``python -m
tests.vm.engine_guest STAGE ARGS...`` (``exec``: the process that holds the
LUO sessions is the one that kexecs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VERSION_COMMANDS = {
    "systemd": ["/usr/lib/systemd/systemd", "--version"],
    "qemu": ["qemu-system-x86_64", "--version"],
    "kexec": ["kexec", "--version"],
}


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=60
        )
    except OSError as exc:
        return f"not runnable: {exc}"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else f"exit {done.returncode}, no output"


def main(argv: list[str]) -> int:
    from tests.vm.guest import write_json

    stage = argv[0]
    info: dict[str, object] = {
        "stage": stage,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        **{name: first_line(cmd) for name, cmd in VERSION_COMMANDS.items()},
    }
    write_json(Path(os.environ["LUO_VM_OUT"]) / f"sid-{stage}.json", info)
    print(f"sid guest: {info}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "tests.vm.engine_guest", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
