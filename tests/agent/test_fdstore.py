"""The agent's side of systemd's fd store: sd_pid_notify and LISTEN_FDS.

systemd is not PID 1 on the machines that run this suite (a container), so a
test plays systemd's part itself: a real ``AF_UNIX`` datagram socket bound in
``tmp_path`` is the service's ``$NOTIFY_SOCKET``, and what arrives there (the
message, the fds as ``SCM_RIGHTS``) is what systemd would have stored. The
way back, ``LISTEN_FDS``, runs in a child process that lays fds out from fd 3
and sets the variables as systemd does before it execs a service. The same
code under a real systemd 262 is for the VM harness (it needs a kernel with
cgroups: see docs/vm-harness.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest

from orchestrator.agent._fdstore import (
    FD_STORE_PRESERVE_SINCE,
    StoredFd,
    fd_store_support,
    kexec_via_systemd_refusal,
    notify,
    notify_barrier,
    own_unit,
    parse_systemd_version,
    registration_fdname,
    registration_name,
    remove_fd,
    session_fdname,
    session_name,
    store_fd,
)
from orchestrator.agent._server import Agent, run_agent
from orchestrator.agent_client import AgentClient
from orchestrator.luo.sim import SimKernel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("stored", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


@contextmanager
def notify_socket(address: str) -> Iterator[socket.socket]:
    """systemd's end of ``$NOTIFY_SOCKET``: a bound datagram socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(30)
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> tuple[dict[str, str], list[int]]:
    """One notification: its ``KEY=value`` fields and the fds that came with it."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 16)
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    return fields, fds


def test_stored_fd_reaches_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    fd = memfd_with(b"workload state")
    with notify_socket(path) as sock:
        assert store_fd(fd, "reg-x", environ={"NOTIFY_SOCKET": path})
        fields, fds = receive(sock)
    assert fields == {"FDSTORE": "1", "FDNAME": "reg-x"}
    assert len(fds) == 1
    os.pwrite(fd, b"W", 0)  # the same file, not a copy of its bytes
    assert read_all(fds[0]) == b"Workload state"
    os.close(fds[0])
    os.close(fd)


def test_abstract_notify_socket_and_remove(tmp_path: Path) -> None:
    name = f"luo-test-notify-{os.getpid()}-{tmp_path.name}"
    with notify_socket("\0" + name) as sock:
        assert remove_fd("reg-x", environ={"NOTIFY_SOCKET": "@" + name})
        fields, fds = receive(sock)
    assert fields == {"FDSTOREREMOVE": "1", "FDNAME": "reg-x"}
    assert fds == []


def test_without_systemd_nothing_is_sent(tmp_path: Path) -> None:
    fd = memfd_with(b"x")
    assert not store_fd(fd, "reg-x", environ={})
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1"})
    # systemd gone (socket path without a listener): reported, not raised
    gone = {"NOTIFY_SOCKET": str(tmp_path / "missing")}
    assert not store_fd(fd, "reg-x", environ=gone)
    os.close(fd)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("vm-1", id="plain"),
        pytest.param("a:b/c d", id="colon-slash-space"),
        pytest.param("données-é", id="non-ascii"),
        pytest.param("n" * 128, id="longest"),
    ],
)
def test_registration_names_make_valid_fdnames(name: str) -> None:
    fdname = registration_fdname(name)
    # systemd's fdname_is_valid(): <= 255 printable ASCII characters, no ':'
    assert len(fdname) <= 255
    assert all(0x20 < ord(c) < 0x7F for c in fdname)
    assert ":" not in fdname
    assert registration_name(fdname) == name


def test_session_fdnames_are_their_own_kind() -> None:
    fdname = session_fdname("lu-qemu.vm:1")
    assert ":" not in fdname
    assert fdname.startswith("lus-")
    assert session_name(fdname) == "lu-qemu.vm:1"
    assert registration_name(fdname) is None
    assert session_name(registration_fdname("lu-qemu.vm:1")) is None


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/liveupdate-agent.service\n", "liveupdate-agent.service"),
        ("0::/user.slice/user-0.slice/session-3.scope\n", None),
        ("12:pids:/x\n0::/\n", None),
        ("", None),
    ],
)
def test_own_unit_is_read_from_the_cgroup(cgroup: str, unit: str | None) -> None:
    assert own_unit(cgroup) == unit


def test_foreign_fdnames_name_no_registration() -> None:
    assert registration_name("session-lu-agent") is None
    assert registration_name("reg-%%%") is None


LISTEN_CHILD = """
import json, os, sys
from orchestrator.agent._fdstore import listen_fds
for target, data in ((3, b"three"), (4, b"four")):
    fd = os.memfd_create("passed")  # close-on-exec, as systemd's fds are not
    os.write(fd, data)
    if fd != target:
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
os.environ.update(LISTEN_FDS="2", LISTEN_FDNAMES="reg-a:other")
os.environ["LISTEN_PID"] = str(os.getpid() + int(sys.argv[1]))
got = listen_fds()
print(json.dumps({
    "got": [[s.name, s.fd, os.pread(s.fd, 10, 0).decode(), os.get_inheritable(s.fd)]
            for s in got],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def run_listen_child(pid_offset: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", LISTEN_CHILD, str(pid_offset)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_listen_fds_takes_what_systemd_passed() -> None:
    result = run_listen_child(0)
    assert result["got"] == [["reg-a", 3, "three", False], ["other", 4, "four", False]]
    assert result["env"] == []  # not handed on to children


def test_listen_fds_meant_for_another_process_are_left_alone() -> None:
    result = run_listen_child(1)
    assert result["got"] == []
    assert result["env"] == ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]


@pytest.mark.parametrize(
    ("text", "version"),
    [
        pytest.param("systemd 262 (262.1-1)\n+PAM +AUDIT", 262, id="sid"),
        pytest.param("systemd 252 (252.39-1~deb12u1)\n", 252, id="bookworm"),
        pytest.param("not systemd\n", None, id="garbage"),
    ],
)
def test_systemd_version_is_read_from_systemctl(text: str, version: int | None) -> None:
    assert parse_systemd_version(text) == version


def test_old_systemd_reports_preservation_unavailable() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    old = fd_store_support(FD_STORE_PRESERVE_SINCE - 4, environ=env)
    assert old.store
    assert not old.preserved_across_kexec
    assert "unavailable" in old.reason
    assert "257" in old.reason
    new = fd_store_support(262, environ=env)
    assert new.store
    assert new.preserved_across_kexec
    unknown = fd_store_support(None, environ=env)
    assert not unknown.preserved_across_kexec
    outside = fd_store_support(262, environ={})
    assert not outside.store
    assert not outside.preserved_across_kexec


@asynccontextmanager
async def answering_barriers(address: str) -> AsyncIterator[list[dict[str, str]]]:
    """systemd's end of ``$NOTIFY_SOCKET``, served while the block runs: like
    systemd, it closes a ``BARRIER=1`` message's fd once it has read that far.
    Yields every message it read."""
    seen: list[dict[str, str]] = []
    with notify_socket(address) as sock:
        sock.setblocking(False)

        async def serve() -> None:
            while True:
                await anyio.wait_readable(sock)
                fields, fds = receive(sock)
                seen.append(fields)
                for fd in fds:
                    os.close(fd)

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            yield seen
            tg.cancel_scope.cancel()


async def test_a_barrier_returns_once_systemd_has_read_up_to_it(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": path}
    async with answering_barriers(path) as seen:
        assert remove_fd("reg-x", environ=env)
        assert await anyio.to_thread.run_sync(
            lambda: notify_barrier(timeout=30, environ=env)
        )
    assert seen == [{"FDSTOREREMOVE": "1", "FDNAME": "reg-x"}, {"BARRIER": "1"}]
    with notify_socket(str(tmp_path / "deaf")):  # bound, never read
        assert not notify_barrier(
            timeout=0.2, environ={"NOTIFY_SOCKET": str(tmp_path / "deaf")}
        )
    assert not notify_barrier(environ={})


FAKE_SHOW = """#!/bin/sh
# systemctl show --property=... UNIT, as this test's unit has them
echo "$@" >> {calls}
cat {props}
"""


@pytest.mark.parametrize(
    ("props", "why"),
    [
        pytest.param(
            "FileDescriptorStorePreserve=yes\nNFileDescriptorStore=3\n"
            "FileDescriptorStoreMax=4\n",
            None,
            id="room-left",
        ),
        pytest.param(
            "FileDescriptorStorePreserve=yes\nNFileDescriptorStore=4\n"
            "FileDescriptorStoreMax=4\n",
            "liveupdate-agent.service's fd store is full (4 of "
            "FileDescriptorStoreMax=4), and systemd drops what does not fit; "
            "raise FileDescriptorStoreMax",
            id="full",
        ),
        pytest.param(
            "FileDescriptorStorePreserve=no\nNFileDescriptorStore=0\n"
            "FileDescriptorStoreMax=4\n",
            "liveupdate-agent.service does not set FileDescriptorStorePreserve=yes",
            id="not-preserved",
        ),
        pytest.param(
            "FileDescriptorStorePreserve=yes\n",
            "systemctl show liveupdate-agent.service does not say how full its "
            "fd store is",
            id="silent",
        ),
    ],
)
async def test_systemctl_kexec_is_refused_unless_the_store_keeps_every_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, props: str, why: str | None
) -> None:
    """A full store drops a parked session with no answer but a log line:
    the agent asks systemd to catch up (a barrier), then how full it is."""
    from orchestrator.agent import _fdstore

    (tmp_path / "props").write_text(props)
    script = tmp_path / "systemctl"
    script.write_text(
        FAKE_SHOW.format(calls=tmp_path / "calls", props=tmp_path / "props")
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(_fdstore, "own_unit", lambda _: "liveupdate-agent.service")
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    support = fd_store_support(262)
    async with answering_barriers(path) as seen:
        said = await anyio.to_thread.run_sync(kexec_via_systemd_refusal, support)
    assert said == why
    assert seen == [{"BARRIER": "1"}]
    assert (tmp_path / "calls").read_text().split()[-1] == "liveupdate-agent.service"


# --------------------------------------------------------------------------- agent


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The agent runs as a service: ``$NOTIFY_SOCKET`` is this socket."""
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with notify_socket(path) as sock:
        yield sock


@asynccontextmanager
async def started_agent(
    tmp_path: Path, stored: tuple[StoredFd, ...] = ()
) -> AsyncIterator[Agent]:
    kernel = SimKernel(tmp_path / "kernel")
    async with anyio.create_task_group() as tg:

        async def run(*, task_status: anyio.abc.TaskStatus[Agent]) -> None:
            await run_agent(
                tmp_path / "run" / "agent.sock",
                tmp_path / "state",
                kernel,
                stored=stored,
                task_status=task_status,
            )

        agent: Agent = await tg.start(run)
        yield agent
        tg.cancel_scope.cancel()


def client_call(path: Path, fn_name: str, *args: object) -> object:
    with AgentClient(path) as client:
        return getattr(client, fn_name)(*args)


async def call(agent: Agent, fn_name: str, *args: object) -> object:
    return await anyio.to_thread.run_sync(
        client_call, agent.socket_path, fn_name, *args
    )


async def test_restarted_agent_takes_its_registrations_back(
    tmp_path: Path, systemd: socket.socket
) -> None:
    data = b"kv state " * 4096
    fd = memfd_with(data)
    async with started_agent(tmp_path) as agent:
        await call(agent, "register", "kv0", fd)
        os.close(fd)  # the workload died with the agent's copy its only one
        fields, stored = await anyio.to_thread.run_sync(receive, systemd)
    # the first agent is gone: its own fds are closed; the store's copy is not
    assert fields == {"FDSTORE": "1", "FDNAME": registration_fdname("kv0")}
    assert len(stored) == 1
    back = (StoredFd(fields["FDNAME"], stored[0]),)
    async with started_agent(tmp_path, back) as agent:
        items = await call(agent, "list")
        assert isinstance(items, list)
        assert [(i["name"], i["uid"], i["size"]) for i in items] == [
            ("kv0", os.getuid(), len(data))
        ]
        reclaimed = await call(agent, "reclaim", "kv0")
        assert isinstance(reclaimed, int)
        assert read_all(reclaimed) == data
        os.close(reclaimed)
        fields, fds = await anyio.to_thread.run_sync(receive, systemd)
        assert fields == {"FDSTOREREMOVE": "1", "FDNAME": registration_fdname("kv0")}
        assert fds == []
        assert await call(agent, "list") == []


async def test_stored_but_unpublished_fd_is_kept_as_roots(
    tmp_path: Path, systemd: socket.socket
) -> None:
    fd = memfd_with(b"orphan")
    foreign = memfd_with(b"not the agent's")
    stored = (
        StoredFd(registration_fdname("orphan"), fd),
        StoredFd("something-else", foreign),
    )
    async with started_agent(tmp_path, stored) as agent:
        items = await call(agent, "list")
        assert isinstance(items, list)
        assert [(i["name"], i["uid"], i["size"]) for i in items] == [
            ("orphan", 0, len(b"orphan"))
        ]
        # the foreign fd was closed and dropped from the store
        fields, _ = await anyio.to_thread.run_sync(receive, systemd)
        assert fields == {"FDSTOREREMOVE": "1", "FDNAME": "something-else"}
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(foreign)


async def test_without_systemd_the_agent_serves_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fd = memfd_with(b"plain")
    async with started_agent(tmp_path) as agent:
        await call(agent, "register", "w", fd)
        reclaimed = await call(agent, "reclaim", "w")
        assert isinstance(reclaimed, int)
        assert read_all(reclaimed) == b"plain"
        os.close(reclaimed)
    os.close(fd)


async def test_a_stored_session_with_nothing_to_resume_is_released(
    tmp_path: Path, systemd: socket.socket
) -> None:
    """A session fd left in the store (the update it served has ended) would
    keep its files preserved for good: the agent drops it and closes it."""
    held, _other_end = os.pipe()  # stands in for a LUO session fd
    stored = (StoredFd(session_fdname("lu-agent"), held),)
    async with started_agent(tmp_path, stored) as agent:
        fields, _ = await anyio.to_thread.run_sync(receive, systemd)
        assert fields == {"FDSTOREREMOVE": "1", "FDNAME": session_fdname("lu-agent")}
        assert await call(agent, "list") == []  # not taken for a registration
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(held)
