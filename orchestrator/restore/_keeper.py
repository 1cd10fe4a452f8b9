"""The keeper: holds what the restore takes back, so nothing dies with its asker.

In the new kernel a retrieved session lives while some process holds its fd:
when the last holder closes it -- or dies -- the kernel FINISHes it and drops
every file not yet retrieved; a retrieved memfd lives while some process
holds it. So ``liveupdate resume`` never holds them alone. Before its first
kernel call it starts a keeper (or finds the one an interrupted resume left
behind); the keeper makes every RETRIEVE itself, keeps what it got, and hands
out duplicates over a Unix socket (``SCM_RIGHTS``). Whatever happens to
resume -- a crash, a SIGKILL, a check that fails -- the keeper still holds
everything, and ``liveupdate resume`` run again goes on from there. The
keeper lets go only when told to FINISH, once every file's owner holds its
own fd; SIGTERM, SIGINT and SIGHUP are ignored, so only SIGKILL or a reboot
ends it otherwise.

Standard library and the kernel layer only: it starts inside the blackout.
It is started with ``fork()`` when the caller has one thread (about a
millisecond), else as ``python -m orchestrator.restore._keeper``.

Protocol: ``SOCK_SEQPACKET`` on an abstract address derived from the state
dir; only peers with the keeper's uid are served. One request a packet,
fields separated by tabs; every answer is one packet::

    hello               -> ok  PID  RUN  ABI  MISSING-SESSIONS (comma-separated)
    fd SESSION TOKEN    -> ok  (the fd attached)  |  err ERRNO REQUEST SUBJECT
    adopt SESSION       (a session fd attached: one the kernel handed to
                        another process, e.g. systemd) -> ok  |  err ...
    finish              -> ok  (then the keeper exits)  |  err ...
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

from orchestrator._compat import TYPE_CHECKING
from orchestrator.errors import KeeperError

from ._crashpoint import crash_point

if TYPE_CHECKING:
    import selectors
    from collections.abc import Sequence

    from orchestrator.luo import Kernel, OwnedFd, RfcDevice, Session

_PEERCRED = struct.Struct("3i")
_MAX = 4096
_MAX_CLIENTS = 64
_SEND_TIMEOUT = 10.0
_CLIENT_TIMEOUT = 300.0
"""How long a client waits for an answer (a RETRIEVE of a large file is slow)."""


def address(state_dir: str | os.PathLike[str]) -> bytes:
    """The keeper's abstract socket address for *state_dir*."""
    import hashlib

    real = os.path.realpath(os.fspath(state_dir)).encode()
    return b"\0liveupdate-keeper-" + hashlib.sha256(real).hexdigest()[:40].encode()


# --- the keeper process -----------------------------------------------------------


class _Holdings:
    """Everything the keeper retrieved, by session and token."""

    def __init__(self, kernel: Kernel, run_id: str, abi: str) -> None:
        self.kernel = kernel
        self.run_id = run_id
        self.abi = abi
        self.sessions: dict[str, Session] = {}
        self.rfc: RfcDevice | None = None
        self.files: dict[tuple[str, int], OwnedFd] = {}
        self.missing: list[str] = []

    def retrieve_sessions(self, names: Sequence[str]) -> None:
        from orchestrator.luo import KernelError, SessionNotFoundError

        if self.abi == "rfc":
            from orchestrator.luo import RfcDevice

            self.rfc = RfcDevice.open(self.kernel)
            from orchestrator.luo import RfcState

            if self.rfc.state() != RfcState.UPDATED:
                self.missing.append("rfc")  # this boot did not come through LUO
            return
        from orchestrator.luo import LiveUpdateDevice

        with LiveUpdateDevice.open(self.kernel) as dev:
            for name in names:
                try:
                    self.sessions[name] = dev.retrieve_session(name)
                except SessionNotFoundError:
                    self.missing.append(name)
                except KernelError:
                    # Held elsewhere (retrieved by another process): not ours
                    # to take; the restore reports it when it needs the files.
                    self.missing.append(name)

    def adopt(self, name: str, fd: int) -> None:
        """Hold session *name* from *fd*: one the kernel had handed to another
        process (systemd, after ``systemctl kexec``), passed on to the keeper."""
        if name in self.sessions:
            os.close(fd)  # held already: this copy is not needed
            return
        if self.abi != "merged" or name not in self.missing:
            os.close(fd)
            raise ValueError(f"{name} is not a missing session of run {self.run_id}")
        from orchestrator.luo import Session

        self.sessions[name] = Session(self.kernel, fd, name, incoming=True)
        self.missing.remove(name)

    def fd(self, session: str, token: int) -> int:
        key = (session, token)
        held = self.files.get(key)
        if held is None:
            if self.rfc is not None:
                held = self.rfc.restore_fd(token)
            else:
                owner = self.sessions.get(session)
                if owner is None:
                    from orchestrator.luo._errors import kernel_error

                    raise kernel_error(2, "RETRIEVE_SESSION", session)
                held = owner.retrieve_fd(token)
            self.files[key] = held
        return held.fileno()

    def finish(self) -> None:
        if self.rfc is not None:
            self.rfc.finish()
            self.rfc.close()
            self.rfc = None
        for name in list(self.sessions):
            session = self.sessions[name]
            session.finish()
            session.close()
            del self.sessions[name]
        for held in self.files.values():
            held.close()
        self.files.clear()


def _answer(h: _Holdings, fields: list[str], fds: list[int]) -> tuple[str, list[int]]:
    from orchestrator.luo import KernelError

    verb = fields[0] if fields else ""
    if verb == "adopt" and len(fields) == 2 and len(fds) == 1:
        try:
            h.adopt(fields[1], fds[0])
        except ValueError as exc:
            return f"err\t0\t{verb}\t{exc}", []
        return "ok", []
    for fd in fds:  # sent with a request that takes none
        os.close(fd)
    try:
        if verb == "hello":
            return f"ok\t{os.getpid()}\t{h.run_id}\t{h.abi}\t{','.join(h.missing)}", []
        if verb == "fd" and len(fields) == 3:
            return "ok", [h.fd(fields[1], int(fields[2]))]
        if verb == "finish":
            h.finish()
            return "ok", []
    except KernelError as exc:
        return f"err\t{exc.errno}\t{exc.request}\t{exc.subject}", []
    except (OSError, ValueError) as exc:
        return f"err\t0\t{verb}\t{exc}", []
    return f"err\t0\t{verb}\tunknown request {fields!r}", []


def _serve(sock: socket.socket, h: _Holdings) -> None:
    """Answer every client, each request as it comes: no client can hold the
    others up (an idle one costs nothing; there is no idle timeout to cut a
    resume that works for minutes between two requests)."""
    import selectors

    uid = os.getuid()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _events in sel.select():
            if key.fileobj is sock:
                _accept(sock, sel, uid)
                continue
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                raw, got, _flags, _addr = socket.recv_fds(conn, _MAX, 1)
            except OSError:
                raw, got = b"", []
            if not raw:
                for fd in got:
                    os.close(fd)
                sel.unregister(conn)
                conn.close()
                continue
            text, fds = _answer(h, raw.decode(errors="replace").split("\t"), got)
            finished = text == "ok" and raw == b"finish"
            if finished:
                # Free the address before saying so: whoever comes next
                # starts afresh instead of reaching a keeper on its way out.
                sel.unregister(sock)
                sock.close()
            try:
                if fds:
                    socket.send_fds(conn, [text.encode()], fds)
                else:
                    conn.send(text.encode())
            except OSError:
                sel.unregister(conn)
                conn.close()
            if finished:
                os._exit(0)  # done, whether or not the asker is still there


def _accept(sock: socket.socket, sel: selectors.BaseSelector, uid: int) -> None:
    import selectors

    try:
        conn, _ = sock.accept()
    except OSError:
        return
    _pid, peer_uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    if peer_uid != uid or len(sel.get_map()) > _MAX_CLIENTS:
        conn.close()  # not even read: only the keeper's own user is served
        return
    conn.settimeout(_SEND_TIMEOUT)  # answers are small; a peer that never reads
    sel.register(conn, selectors.EVENT_READ)


def _daemon(
    kernel: Kernel, addr: bytes, run_id: str, abi: str, names: Sequence[str], ready: int
) -> None:
    """The keeper's life, in a process of its own (never returns)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for entry in os.listdir("/proc/self/fd"):  # nothing of the caller's stays open
        fd = int(entry)
        if fd > 2 and fd != ready:
            try:
                os.close(fd)
            except OSError:
                pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(addr)
    except OSError:
        _tell(ready, "exists")  # another keeper won the race: use it
        os._exit(0)
    sock.listen(8)
    join = getattr(kernel, "join", None)
    if join is not None:
        join()  # a simulated kexec ends the keeper, as a real one would
    holdings = _Holdings(kernel, run_id, abi)
    try:
        holdings.retrieve_sessions(names)
    except Exception as exc:  # noqa: BLE001  (told to the starter, who reports it)
        _tell(ready, f"error {type(exc).__name__}: {exc}")
        os._exit(1)
    # From here on the keeper holds sessions: nothing may end it -- not even
    # its starter dying before it reads this.
    _tell(ready, "ready")
    while True:
        try:
            _serve(sock, holdings)
        except Exception:  # noqa: BLE001  (one bad client must not drop the data)
            continue


def _tell(fd: int, what: str) -> None:
    try:
        os.write(fd, f"{what}\n".encode())
    except OSError:
        pass  # the starter is gone: whoever comes next connects instead
    finally:
        os.close(fd)


def _detach_and_run(
    kernel: Kernel, addr: bytes, run_id: str, abi: str, names: Sequence[str], ready: int
) -> None:
    """In a child: a new session, a grandchild that keeps, the child exits."""
    try:
        os.setsid()
        if os.fork() == 0:
            _daemon(kernel, addr, run_id, abi, names, ready)
    except BaseException:  # noqa: BLE001  (a child never returns into the caller)
        os._exit(1)
    os._exit(0)


def _single_threaded() -> bool:
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() == 1


def _spawn(
    kernel: Kernel, addr: bytes, run_id: str, abi: str, names: Sequence[str]
) -> str:
    """Start a keeper; what it said when ready (``ready``, ``exists``, ``error ...``)."""
    r, w = os.pipe()
    try:
        if _single_threaded():
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _detach_and_run(kernel, addr, run_id, abi, names, w)
            os.waitpid(pid, 0)
        else:
            import subprocess

            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "orchestrator.restore._keeper",
                    kernel.spec,
                    addr[1:].decode(),
                    run_id,
                    abi,
                    str(w),
                    *names,
                ],
                pass_fds=(w,),
                stdin=subprocess.DEVNULL,
                check=True,
            )
        os.close(w)
        w = -1
        said = b""
        while chunk := os.read(r, 4096):
            said += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return said.decode(errors="replace").strip()


# --- the client -------------------------------------------------------------------


class Keeper:
    """A connection to the keeper of one state dir; a ``Retriever`` for the engine.

    :ivar pid: the keeper's pid.
    :ivar missing: planned sessions the kernel did not have (ENOENT).
    """

    def __init__(self, sock: socket.socket) -> None:
        import _thread

        self._sock = sock
        # One request at a time: restores run concurrently, in threads.
        self._lock = _thread.allocate_lock()
        try:
            fields = self._call("hello")[0]
        except KeeperError:
            sock.close()
            raise
        self.pid = int(fields[1])
        self.run_id = fields[2]
        self.abi = fields[3]
        self.missing = [n for n in fields[4].split(",") if n]

    @classmethod
    def connect(cls, state_dir: str | os.PathLike[str]) -> Keeper | None:
        """The keeper of *state_dir*, or None when none runs."""
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        sock.settimeout(_CLIENT_TIMEOUT)
        try:
            sock.connect(address(state_dir))
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise KeeperError(f"cannot reach the keeper: {exc.strerror}") from exc
        return cls(sock)

    @classmethod
    def ensure(
        cls,
        kernel: Kernel,
        state_dir: str | os.PathLike[str],
        run_id: str,
        abi: str,
        sessions: Sequence[str],
    ) -> Keeper:
        """The keeper holding run *run_id*'s sessions: the running one, or a new one."""
        import time

        for _ in range(40):
            try:
                keeper = cls.connect(state_dir)
            except KeeperError:
                time.sleep(0.05)  # one on its way out: its address frees soon
                continue
            if keeper is not None:
                if keeper.run_id != run_id:
                    keeper.close()
                    raise KeeperError(
                        f"a keeper (pid {keeper.pid}) holds run {keeper.run_id}'s "
                        f"sessions, not run {run_id}'s"
                    )
                return keeper
            said = _spawn(kernel, address(state_dir), run_id, abi, sessions)
            if said.startswith("error"):
                raise KeeperError(f"the keeper could not retrieve: {said[6:]}")
            if said != "ready":
                time.sleep(0.05)  # another one took the address: ask it
        raise KeeperError("the keeper did not start (its address stayed taken)")

    def _call(
        self, *fields: str, fds: Sequence[int] = ()
    ) -> tuple[list[str], list[int]]:
        crash_point("keeper")
        try:
            with self._lock:
                request = "\t".join(fields).encode()
                if fds:
                    socket.send_fds(self._sock, [request], list(fds))
                else:
                    self._sock.send(request)
                crash_point("keeper-sent")  # asked, and gone before the answer
                raw, fds, _flags, _addr = socket.recv_fds(self._sock, _MAX, 1)
        except OSError as exc:
            raise KeeperError(f"the keeper did not answer: {exc}") from exc
        answer = raw.decode(errors="replace").split("\t")
        if answer[0] == "ok":
            return answer, fds
        for fd in fds:
            os.close(fd)
        if answer[0] == "err" and len(answer) == 4 and answer[1] not in ("", "0"):
            from orchestrator.luo._errors import kernel_error

            raise kernel_error(int(answer[1]), answer[2], answer[3])
        raise KeeperError(f"the keeper refused {fields[0]}: {answer[-1] or raw!r}")

    def retrieve(self, entry: dict[str, object]) -> OwnedFd:
        """The fd preserved under *entry* (a manifest entry), yours to own."""
        from orchestrator.luo import OwnedFd

        session = str(entry.get("session", "-"))
        _, fds = self._call("fd", session, str(entry["token"]))
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise KeeperError(f"the keeper sent {len(fds)} fds for one file")
        return OwnedFd(fds[0])

    def adopt(self, session: str, fd: int) -> None:
        """Have the keeper hold *session*, which it could not retrieve, from
        *fd* (a duplicate is sent: *fd* stays the caller's)."""
        self._call("adopt", session, fds=[fd])
        if session in self.missing:
            self.missing.remove(session)

    def finish(self) -> None:
        """FINISH every session: the keeper lets go of everything and exits."""
        self._call("finish")
        self.close()

    def close(self) -> None:
        self._sock.close()


def main(argv: Sequence[str]) -> int:
    """``python -m orchestrator.restore._keeper SPEC ADDR RUN ABI READY-FD SESSION...``"""
    from orchestrator.luo import kernel_from_spec

    spec, addr, run_id, abi, ready, *names = argv
    _detach_and_run(
        kernel_from_spec(spec), b"\0" + addr.encode(), run_id, abi, names, int(ready)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
