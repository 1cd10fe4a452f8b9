"""The keeper on its own: it holds what it retrieved, whoever comes and goes.

A session with one memfd goes through a simulated kexec (in a child process,
which the kexec ends); then the keeper retrieves it in the "new kernel".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.errors import KeeperError
from orchestrator.luo import SessionNotFoundError
from orchestrator.luo.sim import SimKernel
from orchestrator.restore._keeper import Keeper, address

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
DATA = b"kept by the keeper\n" * 1000


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[SimKernel]:
    kernel = SimKernel(tmp_path / "kernel")
    image = tmp_path / "vmlinuz"
    image.write_bytes(b"simulated kernel image\n")
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from orchestrator.luo import LiveUpdateDevice
        from orchestrator.luo.sim import SimKernel
        k = SimKernel(Path({str(kernel.root)!r}))
        with LiveUpdateDevice.open(k) as dev:
            s = dev.create_session("lu-test")
        fd = os.memfd_create("data")
        os.write(fd, {DATA!r})
        s.preserve_fd(fd, 1)
        k.kexec_load(Path({str(image)!r}), None, "liveupdate=on")
        k.reboot_kexec()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False)
    assert done.returncode == -signal.SIGKILL  # the kexec ended it
    yield kernel
    for pid in kernel.participants():
        os.kill(pid, signal.SIGKILL)


def keeper_of(kernel: SimKernel, state: Path) -> Keeper:
    return Keeper.ensure(kernel, state, "run1", "merged", ["lu-test"])


def test_fds_come_back_the_same_file_to_every_asker(
    kernel: SimKernel, tmp_path: Path
) -> None:
    first = keeper_of(kernel, tmp_path)
    with first.retrieve({"session": "lu-test", "token": 1}) as fd:
        assert os.pread(fd.fileno(), len(DATA) + 1, 0) == DATA
        inode = os.fstat(fd.fileno()).st_ino
    first.close()  # the asker goes away; the keeper still holds it
    second = keeper_of(kernel, tmp_path)
    assert second.pid == first.pid
    with second.retrieve({"session": "lu-test", "token": 1}) as fd:
        assert os.fstat(fd.fileno()).st_ino == inode  # the very same file
    second.finish()


def test_an_idle_client_holds_nobody_up(kernel: SimKernel, tmp_path: Path) -> None:
    idle = keeper_of(kernel, tmp_path)  # connected, and asks nothing more
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as other:
        # Answered at once: a keeper serving one client at a time would keep
        # this one waiting as long as the idle one stays connected.
        other.settimeout(5.0)
        other.connect(address(tmp_path))
        other.send(b"hello")
        assert other.recv(4096).startswith(b"ok\t")
    with idle.retrieve({"session": "lu-test", "token": 1}) as fd:  # still served
        assert os.pread(fd.fileno(), 5, 0) == DATA[:5]
    idle.finish()


def test_sigterm_does_not_end_the_keeper(kernel: SimKernel, tmp_path: Path) -> None:
    keeper = keeper_of(kernel, tmp_path)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(keeper.pid, signum)
    with keeper.retrieve({"session": "lu-test", "token": 1}) as fd:
        assert os.pread(fd.fileno(), len(DATA), 0) == DATA
    keeper.finish()


def test_finish_ends_the_sessions_and_the_keeper(
    kernel: SimKernel, tmp_path: Path
) -> None:
    keeper = keeper_of(kernel, tmp_path)
    with keeper.retrieve({"session": "lu-test", "token": 1}) as fd:
        kept = os.dup(fd.fileno())  # the owner holds its own fd
    keeper.finish()
    assert Keeper.connect(tmp_path) is None  # gone
    assert os.pread(kept, len(DATA), 0) == DATA  # the owner's fd still reads
    os.close(kept)
    again = keeper_of(kernel, tmp_path)  # a new keeper finds nothing left
    assert again.missing == ["lu-test"]
    with pytest.raises(SessionNotFoundError):
        again.retrieve({"session": "lu-test", "token": 1})
    again.finish()


@pytest.mark.skipif(os.geteuid() != 0, reason="changes uid in a child")
def test_another_users_peer_gets_no_answer(kernel: SimKernel, tmp_path: Path) -> None:
    keeper = keeper_of(kernel, tmp_path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(10)
            sock.connect(address(tmp_path))
        except BaseException:  # noqa: BLE001
            os._exit(2)
        try:
            sock.send(b"fd\tlu-test\t1")
            answer, fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
        except (BrokenPipeError, ConnectionResetError):
            os._exit(0)  # hung up on: fine
        except BaseException:  # noqa: BLE001
            os._exit(3)
        os._exit(0 if answer == b"" and not fds else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with keeper.retrieve({"session": "lu-test", "token": 1}) as fd:  # unharmed
        assert os.pread(fd.fileno(), 5, 0) == DATA[:5]
    keeper.finish()


def test_a_session_another_process_retrieved_can_be_handed_to_the_keeper(
    kernel: SimKernel, tmp_path: Path
) -> None:
    """After ``systemctl kexec`` systemd retrieves the agent's parked sessions
    and hands them to the agent, which hands them to the keeper."""
    from orchestrator.luo import LiveUpdateDevice

    with LiveUpdateDevice.open(kernel) as dev:
        taken = dev.retrieve_session("lu-test")  # as systemd would have
    keeper = keeper_of(kernel, tmp_path / "state")
    try:
        assert keeper.missing == ["lu-test"]
        keeper.adopt("lu-test", taken.fileno())
        os.close(taken.fileno())  # as the agent does: the keeper has its own copy
        assert keeper.missing == []
        back = keeper.retrieve({"session": "lu-test", "token": 1})
        assert os.pread(back.fileno(), len(DATA), 0) == DATA
        back.close()
        with pytest.raises(KeeperError, match="not a missing session"):
            keeper.adopt("lu-other", os.open("/dev/null", os.O_RDONLY))
        keeper.finish()
    finally:
        keeper.close()
