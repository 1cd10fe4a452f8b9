"""An agent killed in the middle of an update, restarted with its fd store.

The agent parks its registrations (``reg-``) and its update's session fds
(``lus-``) in its service's fd store. systemd cannot run as PID 1 on this
host, so :class:`FdStore` plays its part: it takes ``FDSTORE=1`` and
``FDSTOREREMOVE=1`` datagrams on ``$NOTIFY_SOCKET`` and starts the agent
again with what it holds (``$LISTEN_FDS``), as ``Restart=on-failure`` would.
The ``systemd`` VM scenario runs the real systemd 262.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.agent._fdstore import registration_fdname, session_fdname
from orchestrator.agent_client import AgentClient
from orchestrator.luo import LiveUpdateDevice
from orchestrator.luo.sim import SimKernel
from tests.agent.test_control import hanging
from tests.cli._util import listening_line

ROOT = Path(__file__).resolve().parents[2]

#: Moves the fds it is given to 3, 4, ... and execs the agent with
#: ``$LISTEN_FDS`` naming them, for its own pid (what systemd does).
LAUNCH = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
)
os.execv(sys.executable, [sys.executable, "-m", "orchestrator.cli", "agent", *sys.argv[3:]])
"""


class FdStore:
    """A service's fd store, as systemd keeps it (by ``FDNAME``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.fds: dict[str, int] = {}

    def drain(self) -> dict[str, int]:
        """Take every notification sent so far; the store as it now stands."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return self.fds
            fields = dict(
                line.split("=", 1) for line in data.decode().splitlines() if "=" in line
            )
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    if name in self.fds:
                        os.close(self.fds[name])
                    self.fds[name] = fd
            elif fields.get("FDSTOREREMOVE") == "1" and name in self.fds:
                os.close(self.fds.pop(name))
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, argv: list[str], *, hand_back: bool) -> subprocess.Popen[str]:
        """Start the service: with what the store holds if *hand_back*."""
        held = list(self.drain().items()) if hand_back else []
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCH,
                ",".join(str(fd) for _, fd in held),
                ":".join(name for name, _ in held),
                *argv,
            ],
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": str(self.path)},
            pass_fds=[fd for _, fd in held],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert "agent listening" in listening_line(proc.stdout)
        return proc

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.sock.close()


def status(state: Path) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "status",
            "--state-dir",
            str(state),
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


def book(tmp_path: Path, name: str, prepare: list[dict[str, object]]) -> Path:
    image = tmp_path / "vmlinuz-next"
    image.write_bytes(b"simulated kernel image\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        json.dumps(
            {
                "name": name,
                "next_kernel": {"image": str(image), "cmdline": "liveupdate=on"},
                "phases": {"prepare": {"steps": [{"plugin": "kexec"}, *prepare]}},
            }
        )
    )
    return path


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()
    return code


def test_an_agent_killed_mid_update_keeps_its_sessions_then_cancels_and_updates_again(
    tmp_path: Path,
) -> None:
    kernel = SimKernel(tmp_path / "kernel")
    state, sock = tmp_path / "state", tmp_path / "run" / "agent.sock"
    argv = ["--socket", str(sock), "--state-dir", str(state), "--kernel", kernel.spec]
    store = FdStore(tmp_path / "notify")
    data = os.urandom(1 << 20)
    agents: list[subprocess.Popen[str]] = []
    try:
        agents.append(store.start(argv, hand_back=False))
        with AgentClient(sock) as client:
            fd = os.memfd_create("vm0-ram")
            os.write(fd, data)
            client.register("vm0-ram", fd)
            os.close(fd)  # the store's copy and the agent's are all that is left
            client.run(
                book(tmp_path, "hangs", [{"plugin": "faults", "with": {"hang": 120}}])
            )
        deadline = time.monotonic() + 60
        while not hanging(state):
            assert time.monotonic() < deadline, "the update never reached its hang"
            time.sleep(0.05)
        parked = set(store.drain())
        assert parked == {registration_fdname("vm0-ram"), session_fdname("lu-agent")}

        # Killed between PRESERVE and the kexec; systemd starts it again.
        assert stop(agents[0], signal.SIGKILL) == -signal.SIGKILL
        agents.append(store.start(argv, hand_back=True))
        st = status(state)
        assert (st["state"], st["outcome"]) == ("NORMAL", "cancelled")
        # The stored session was released, not kept alive by the store: its
        # name is free again (a live holder would make this EEXIST).
        assert set(store.drain()) == {registration_fdname("vm0-ram")}
        with LiveUpdateDevice.open(kernel) as dev:
            dev.create_session("lu-agent").close()
        with AgentClient(sock) as client:
            assert [(i["name"], i["size"]) for i in client.list()] == [
                ("vm0-ram", len(data))
            ]
            # Run again, to the end: the (simulated) kexec ends the agent.
            client.run(book(tmp_path, "again", []))
        assert agents[1].wait(timeout=120) == -signal.SIGKILL

        # After a reboot-syscall kexec systemd hands nothing back: the update does.
        agents.append(store.start(argv, hand_back=False))
        st = status(state)
        assert (st["state"], st["outcome"]) == ("NORMAL", "completed")
        with AgentClient(sock) as client:
            assert [i["state"] for i in client.list()] == ["restored"]
            back = client.reclaim("vm0-ram")
            assert os.pread(back, len(data) + 1, 0) == data  # every byte
            os.close(back)
    finally:
        for proc in agents:
            stop(proc)
        store.close()
