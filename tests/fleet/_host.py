"""The init process of one simulated fleet host: PID 1 of its own PID namespace.

Started by :mod:`tests.fleet._fleet` inside the host's network namespace and a
new mount and PID namespace. It binds the host's directories over ``/run``
(emptied at every boot, as a tmpfs would be) and ``/media`` (the host's disk:
its simulated kernel, journal and playbooks, kept across boots), then boots:
sshd, the resume unit's command, the agent and ``liveupdate metrics serve``.

A file ``no-sshd`` on the disk makes the next boots leave sshd out: a host
that does not come back. Each boot starts a workload that publishes its pid in
``/run/workloads`` (read by the metrics endpoint); ``workload-fails`` on the
disk makes it exit as it starts: a workload that does not come back. A simulated kexec switches the kernel's ``current`` boot: init sees it, ends
every process of its PID namespace (sshd sessions included) with SIGKILL and
boots again, as the new kernel would. SIGTERM ends the host.

Run as ``python -m tests.fleet._host HOSTDIR ADDRESS``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DISK = Path("/media")
"""Where the host's disk is mounted inside its mount namespace."""
PLAYBOOK = DISK / "playbook.yaml"
STATE = DISK / "state"
KERNEL = DISK / "kernel"
METRICS_PORT = 9731
WORKLOAD_FAILS = "workload-fails"
"""A file on the disk that makes the host's workload exit as it starts."""


def _mount_bind(source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


def _kill_all() -> None:
    """SIGKILL every other process of this PID namespace and reap them."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _boot(host: Path, address: str) -> None:
    run = Path("/run")
    for entry in run.iterdir():  # a fresh tmpfs at every boot
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    (run / "sshd").mkdir(mode=0o755)
    (run / "liveupdate").mkdir(mode=0o755)
    logs = DISK / "log"
    logs.mkdir(exist_ok=True)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, LIVEUPDATE_KERNEL=f"sim:{KERNEL}")

    def start(name: str, argv: list[str], *, wait: bool = False) -> None:
        with open(logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/"
            )
        if wait:
            proc.wait()

    if not (DISK / "no-sshd").exists():  # a host that boots but is not reachable
        start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(DISK / "sshd_config")])
    if (STATE / "restore-plan").exists():
        start(
            "resume",
            [
                str(bindir / "liveupdate"),
                "resume",
                str(PLAYBOOK),
                "--state-dir",
                str(STATE),
            ],
            wait=True,
        )
    start(
        "agent",
        [str(bindir / "liveupdate"), "agent", "--state-dir", str(STATE)],
    )
    (run / "workloads").mkdir(mode=0o755)
    # The host's workload, started at each boot as its service manager would:
    # it publishes its pid, then serves (sleeps). With WORKLOAD_FAILS on the
    # disk it exits at once: a workload that does not come back.
    start(
        "workload",
        [
            "/bin/sh",
            "-c",
            'printf \'{"name": "app", "pid": %d}\' $$ > /run/workloads/app.json; '
            f"[ -e {DISK / WORKLOAD_FAILS} ] && exit 1; exec sleep infinity",
        ],
    )
    start(
        "metrics",
        [
            str(bindir / "liveupdate"),
            "metrics",
            "serve",
            "--state-dir",
            str(STATE),
            "--listen",
            f"{address}:{METRICS_PORT}",
            "--workloads",
            str(run / "workloads"),
        ],
    )
    (DISK / "booted").write_text(os.readlink(KERNEL / "current") + "\n")


def main(argv: list[str]) -> int:
    host, address = Path(argv[0]), argv[1]
    _mount_bind(host / "run", Path("/run"))
    _mount_bind(host / "disk", DISK)
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    booted = os.readlink(KERNEL / "current")
    _boot(host, address)
    while not stop:
        time.sleep(0.05)
        _reap()
        now = os.readlink(KERNEL / "current")
        if now != booted:  # a kexec (or a cold reboot): this boot is over
            _kill_all()
            booted = now
            _boot(host, address)
    _kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
