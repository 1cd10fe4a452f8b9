"""The agent under abuse: each case attacks a real agent process on a real
socket, then checks that the same process still serves and still holds every
registration -- the same inode and the same bytes come back on reclaim.

The agent runs as a subprocess with a small ``RLIMIT_NOFILE`` (NOFILE), so
that a connection flood past its fd limit is cheap. Clients of the wrong uid
are forked children that drop to ``nobody`` with ``os.setuid``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.agent_client import AgentClient, AgentRefusedError
from orchestrator.luo.sim import SimKernel
from tests.cli._util import listening_line

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
NOFILE = 160  # the agent's fd limit: it serves 16 connections and 32 registrations
CONNECTIONS = 16
IDLE = 2.0  # the agent's --idle-timeout in these tests
DEEP = b"[" * 2000  # the stdlib decoder recursed once per level: RecursionError

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a client as another user"
)

_LAUNCH = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'orchestrator.cli', *sys.argv[2:]])\n"
)


@dataclass
class RunningAgent:
    proc: subprocess.Popen[str]
    sock: Path
    state: Path
    log: Path
    held: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def control(self) -> Path:
        return self.sock.with_name("control.sock")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settle_fds(self, at_most: int, timeout: float = 30) -> int:
        """The agent's fd count once it is at most *at_most* (it closes a
        connection when it sees the hang-up), or when *timeout* ran out."""
        deadline = time.monotonic() + timeout
        while (count := self.fds()) > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
        return count

    def hold(self, name: str, data: bytes) -> None:
        """Register a memfd with *data*; remember its inode to check it later."""
        fd = os.memfd_create(name)
        try:
            os.write(fd, data)
            with AgentClient(self.sock, timeout=10) as client:
                client.register(name, fd)
            self.held[name] = (os.fstat(fd).st_ino, data)
        finally:
            os.close(fd)

    def assert_serves_and_holds(self) -> None:
        """Alive, answering, and every registration is the same file with the
        same bytes (reclaimed, checked and handed back)."""
        assert self.proc.poll() is None, self.log.read_text()
        with AgentClient(self.sock, timeout=10) as client:
            assert {i["name"] for i in client.list()} == set(self.held)
            for name, (inode, data) in self.held.items():
                fd = client.reclaim(name)
                try:
                    assert os.fstat(fd).st_ino == inode
                    assert os.pread(fd, len(data) + 1, 0) == data
                    client.register(name, fd)
                finally:
                    os.close(fd)


def agent_argv(sock: Path, state: Path, kernel: Path, *extra: str) -> list[str]:
    return [
        "agent",
        "--socket",
        str(sock),
        "--state-dir",
        str(state),
        "--kernel",
        SimKernel(kernel).spec,
        "--idle-timeout",
        str(IDLE),
        *extra,
    ]


def launch(argv: list[str], log: Path) -> subprocess.Popen[str]:
    with log.open("a") as err:
        return subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(NOFILE), *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def start(base: Path, *extra: str, state: Path | None = None) -> RunningAgent:
    sock, state = base / "run" / "agent.sock", state or base / "state"
    log = base / f"agent-{time.monotonic_ns()}.log"
    proc = launch(agent_argv(sock, state, base / "kernel", *extra), log)
    assert proc.stdout is not None
    assert "agent listening" in listening_line(proc.stdout), log.read_text()
    agent = RunningAgent(proc, sock, state, log)
    agent.hold("vm0-ram", os.urandom(1 << 16))
    agent.hold("cache", b"kept bytes")
    return agent


def stop(agent: RunningAgent) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
    agent.proc.wait(timeout=30)
    assert agent.proc.stdout is not None
    agent.proc.stdout.close()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory under /tmp (local) that other users can traverse."""
    path = Path(tempfile.mkdtemp(prefix="luo-abuse-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(world_dir: Path) -> Iterator[RunningAgent]:
    running = start(world_dir)
    yield running
    stop(running)


def connect(path: Path, kind: int, timeout: float = 10) -> socket.socket:
    """A connected socket; waits (up to *timeout*) while the backlog is full."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:  # the listen backlog is full: EAGAIN
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.01)


def seqpacket(path: Path, timeout: float = 10) -> socket.socket:
    return connect(path, socket.SOCK_SEQPACKET, timeout)


def first_bytes(sock: socket.socket, wait: float = 5) -> bytes:
    """What *sock* receives first within *wait* seconds (``b"(nothing)"``)."""
    sock.settimeout(wait)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b"(nothing)"


def ask(path: Path, packet: bytes, fds: list[int] | None = None) -> str:
    """Send one raw packet; the agent's answer."""
    with seqpacket(path) as sock:
        if fds:
            socket.send_fds(sock, [packet], fds)
        else:
            sock.send(packet)
        return sock.recv(1 << 16).decode()


def http(path: Path, raw: bytes, timeout: float = 10) -> bytes:
    """Send *raw* on the control socket; everything the agent answers."""
    with connect(path, socket.SOCK_STREAM, timeout) as sock:
        try:
            sock.sendall(raw)
        except BrokenPipeError:
            pass  # answered and closed before reading it all
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


# --- the hand-over socket ----------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        pytest.param(DEEP, "nested deeper than 8", id="2000-brackets"),
        pytest.param(b'{"a":' * 12_000, "nested deeper", id="12k-objects"),
        pytest.param(b"x" * 100_000, "at most 65536 bytes", id="100k-bytes"),
        pytest.param(b"\xff\xfe garbage", "not UTF-8", id="not-utf8"),
        pytest.param(b"{not json", "not JSON", id="not-json"),
        pytest.param(b"123", "expected a JSON object", id="number"),
        pytest.param(b"1" * 5000, "not JSON", id="5000-digits"),
        pytest.param(b'{"op": 5}', "unknown op 5", id="op-not-a-string"),
        pytest.param(b'{"op": "reclaim", "name": ["x"]}', "nothing is", id="name-list"),
        pytest.param(b'{"op": "run", "playbook": 7}', "no playbook", id="bad-run"),
    ],
)
def test_bad_packets_are_answered_and_nothing_is_lost(
    agent: RunningAgent, packet: bytes, error: str
) -> None:
    assert error in json.loads(ask(agent.sock, packet))["error"]
    agent.assert_serves_and_holds()


def test_253_fds_in_one_packet_are_refused_and_closed(agent: RunningAgent) -> None:
    memfd = os.memfd_create("flood")
    fds = [os.dup(memfd) for _ in range(253)]  # SCM_MAX_FD
    before = agent.fds()
    try:
        request = json.dumps({"op": "register", "name": "flood"}).encode()
        for _ in range(5):
            answer = json.loads(ask(agent.sock, request, fds))
            assert "at most 1 fd per request" in answer["error"]
    finally:
        for fd in [memfd, *fds]:
            os.close(fd)
    assert agent.settle_fds(before) <= before  # none of the 5 x 253 stayed
    agent.assert_serves_and_holds()


def test_many_requests_on_one_connection(agent: RunningAgent) -> None:
    with seqpacket(agent.sock) as sock:
        for _ in range(2000):
            sock.send(b'{"op": "list"}')
            assert json.loads(sock.recv(1 << 16))["ok"]
    agent.assert_serves_and_holds()


def test_connection_flood_is_refused_with_an_answer(agent: RunningAgent) -> None:
    before = agent.settle_fds(0, timeout=0)
    flood: list[socket.socket] = []
    try:
        for _ in range(3 * NOFILE):  # past the agent's fd limit
            flood.append(seqpacket(agent.sock, timeout=IDLE + 5))  # noqa: PERF401  (the finally closes what is open)
        # The first CONNECTIONS are served (and idle); later ones are refused.
        answers = [first_bytes(sock) for sock in flood[CONNECTIONS:]]
        refused = [a for a in answers if b"serving 16 connections, its limit" in a]
        assert len(refused) == len(answers)  # each answered, none dropped silently
        assert agent.proc.poll() is None
        # A fresh client while the flood holds every slot: a clear refusal.
        with pytest.raises(AgentRefusedError, match="its limit; try again later"):
            with AgentClient(agent.sock, timeout=10) as client:
                client.list()
    finally:
        for sock in flood:
            sock.close()
    assert agent.settle_fds(before) <= before  # every connection closed
    assert "cannot accept" not in agent.log.read_text()  # never hit EMFILE
    agent.assert_serves_and_holds()


def test_idle_connection_is_closed(agent: RunningAgent) -> None:
    with seqpacket(agent.sock, timeout=IDLE + 10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # the agent hung up
        assert IDLE - 0.5 < time.monotonic() - started < IDLE + 5
    agent.assert_serves_and_holds()


def test_unreadable_state_dir_refuses_registration_only(agent: RunningAgent) -> None:
    blocker = agent.state / "agent-registrations.json.tmp"
    blocker.mkdir()  # the registrations file cannot be written (EISDIR)
    try:
        fd = os.memfd_create("late")
        with AgentClient(agent.sock, timeout=10) as client:
            with pytest.raises(AgentRefusedError, match="cannot record registrations"):
                client.register("late", fd)
            with pytest.raises(AgentRefusedError, match="nothing changed"):
                client.withdraw("cache")
            assert {i["name"] for i in client.list()} == set(agent.held)
        os.close(fd)
        assert agent.proc.poll() is None
    finally:
        blocker.rmdir()
    agent.hold("late", b"now it can")
    agent.assert_serves_and_holds()
    recorded = json.loads((agent.state / "agent-registrations.json").read_text())
    assert {r["name"] for r in recorded} == set(agent.held)


def test_second_agent_refuses_and_touches_nothing(
    agent: RunningAgent, world_dir: Path
) -> None:
    inode = os.stat(agent.sock).st_ino
    published = (agent.state / "agent-registrations.json").read_bytes()
    for base, state in [
        (world_dir, agent.state),  # same socket, same state dir
        (world_dir, world_dir / "other-state"),  # same socket
        (world_dir / "other", agent.state),  # same state dir
    ]:
        argv = agent_argv(base / "run" / "agent.sock", state, world_dir / "kernel")
        second = launch(argv, world_dir / "second.log")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 4, (world_dir / "second.log").read_text()
        message = (world_dir / "second.log").read_text().strip().splitlines()[-1]
        assert f"another agent (pid {agent.proc.pid}) already holds" in message
        assert "agent listening" not in out
    assert os.stat(agent.sock).st_ino == inode
    assert (agent.state / "agent-registrations.json").read_bytes() == published
    agent.assert_serves_and_holds()


# --- the control socket ------------------------------------------------------------

_GET = b"GET /v1/registrations HTTP/1.1\r\nhost: agent\r\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        pytest.param(b"\x00\xff\x16\x03 garbage\r\n\r\n", b"400", id="garbage"),
        pytest.param(
            _GET + b"x-big: " + b"a" * 100_000 + b"\r\n\r\n", b"400", id="100k-head"
        ),
        pytest.param(
            _GET + b"".join(b"x-%d: 1\r\n" % i for i in range(100)) + b"\r\n",
            b"431",
            id="100-headers",
        ),
        pytest.param(
            b"POST /v1/updates HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000000\r\n\r\n",
            b"413",
            id="1GB-content-length",
        ),
        pytest.param(
            b"POST /v1/updates HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"10000\r\n"
            + b"x" * 0x10000
            + b"\r\n"
            + b"10000\r\n"
            + b"x" * 0x10000,
            b"413",
            id="128k-chunked",
        ),
        pytest.param(
            b"POST /v1/updates HTTP/1.1\r\nhost: a\r\ncontent-length: 2000\r\n\r\n"
            + DEEP,
            b"400",
            id="2000-brackets-body",
        ),
        pytest.param(
            b"POST /v1/updates HTTP/1.1\r\nhost: a\r\ncontent-length: 15\r\n\r\n"
            b'{"playbook": 5}',
            b"409",
            id="playbook-not-a-string",
        ),
        pytest.param(
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"400", id="20k-target"
        ),
    ],
)
def test_bad_http_is_answered_and_nothing_is_lost(
    agent: RunningAgent, raw: bytes, status: bytes
) -> None:
    answer = http(agent.control, raw)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert http(agent.control, _GET + b"\r\n").startswith(b"HTTP/1.1 200")
    agent.assert_serves_and_holds()


def test_slow_http_client_times_out(agent: RunningAgent) -> None:
    with connect(agent.control, socket.SOCK_STREAM, IDLE + 10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/status HTTP/1.1\r\n")
        answer = b""
        for i in range(100):  # one header byte every 0.2 s, never done in time
            ready, _, _ = select.select([sock], [], [], 0.2)
            if ready:
                answer = sock.recv(4096)
                break
            sock.sendall(b"xyz"[i % 3 : i % 3 + 1])
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < IDLE + 5
    agent.assert_serves_and_holds()


def test_a_journal_the_status_cannot_read_fails_that_request_only(
    agent: RunningAgent,
) -> None:
    (agent.state / "journal.jsonl").write_text('123\n"text"\n[1]\n')
    for _ in range(3):
        answer = http(agent.control, b"GET /v1/status HTTP/1.1\r\nhost: a\r\n\r\n")
        assert answer[9:12] in (b"200", b"500"), answer[:200]
        report = http(agent.control, b"GET /v1/report HTTP/1.1\r\nhost: a\r\n\r\n")
        assert report[9:12] in (b"200", b"404", b"500"), report[:200]
    assert http(agent.control, _GET + b"\r\n").startswith(b"HTTP/1.1 200")
    agent.assert_serves_and_holds()


def test_control_flood_shares_the_cap(agent: RunningAgent) -> None:
    flood: list[socket.socket] = []
    try:
        for _ in range(NOFILE):
            flood.append(connect(agent.control, socket.SOCK_STREAM))  # noqa: PERF401  (the finally closes what is open)
        answers = [first_bytes(sock) for sock in flood[CONNECTIONS:]]
        assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable") for a in answers)
    finally:
        for sock in flood:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the idle ones are closed
        if http(agent.control, _GET + b"\r\n").startswith(b"HTTP/1.1 200"):
            break
        time.sleep(0.2)
    agent.assert_serves_and_holds()


# --- peers that are not allowed ------------------------------------------------------


def as_nobody(fn: Callable[[], str]) -> str:
    """Run *fn* in a forked child that dropped to uid/gid nobody; what it returns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:60000])
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 1)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def _register_as_nobody(sock: Path) -> Callable[[], str]:
    def fn() -> str:
        fd = os.memfd_create("m")
        os.write(fd, b"nobody's")
        with AgentClient(sock, timeout=10) as client:
            return json.dumps(client.register("nobody-ram", fd))

    return fn


@needs_root
def test_refused_peer_is_not_parsed(agent: RunningAgent) -> None:
    # File modes that let anyone in: SO_PEERCRED is what refuses them.
    agent.sock.parent.chmod(0o755)
    agent.sock.chmod(0o666)
    agent.control.chmod(0o666)

    def deep() -> str:
        answers = []
        for _ in range(20):
            with seqpacket(agent.sock) as sock:
                sock.send(DEEP)
                answers.append(sock.recv(4096).decode())
        return "\n".join(answers)

    answers = as_nobody(deep).splitlines()
    assert len(answers) == 20
    for answer in answers:
        error = json.loads(answer)["error"]
        assert f"uid {NOBODY} gid {NOBODY}" in error
        assert "is not allowed to use the agent" in error
    status = as_nobody(
        lambda: http(
            agent.control, b"POST /v1/updates HTTP/1.1\r\n\r\n" + DEEP
        ).decode()
    )
    assert status.startswith("HTTP/1.1 403"), status
    agent.assert_serves_and_holds()


@needs_root
def test_refused_peers_do_not_take_the_allowed_peers_slots(
    agent: RunningAgent,
) -> None:
    agent.sock.parent.chmod(0o755)
    agent.sock.chmod(0o666)

    def flood() -> str:
        socks = [seqpacket(agent.sock, timeout=10) for _ in range(3 * NOFILE)]
        time.sleep(IDLE / 2)  # held open while root uses the agent
        for sock in socks:
            sock.close()
        return "done"

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = as_nobody(flood)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    time.sleep(0.2)
    for i in range(20):
        agent.hold(f"during-flood-{i}", b"%d" % i)
    assert os.read(r, 100) == b"done"
    os.close(r)
    os.waitpid(pid, 0)
    agent.assert_serves_and_holds()


@needs_root
@pytest.mark.parametrize(
    ("extra", "admitted"),
    [
        pytest.param(["--allow-uid", str(NOBODY)], True, id="allow-uid-nobody"),
        pytest.param(["--allow-gid", str(NOBODY)], True, id="allow-gid-nobody"),
        pytest.param(["--allow-uid", "12345"], False, id="allow-uid-someone-else"),
        pytest.param([], False, id="root-only"),
    ],
)
def test_allow_list_admits_exactly_those_peers(
    world_dir: Path, extra: list[str], admitted: bool
) -> None:
    agent = start(world_dir, *extra)
    try:
        out = as_nobody(_register_as_nobody(agent.sock))
        if admitted:
            answer = json.loads(out)
            assert answer["ok"]
            assert answer["size"] == len(b"nobody's")
            with AgentClient(agent.sock, timeout=10) as client:
                fd = client.reclaim("nobody-ram")
            assert os.pread(fd, 100, 0) == b"nobody's"
            os.close(fd)
        else:
            # The socket file itself keeps nobody out.
            assert out.startswith("AgentUnreachableError"), out
            assert "Permission denied" in out
        agent.assert_serves_and_holds()
    finally:
        stop(agent)
