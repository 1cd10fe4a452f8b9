"""What stands between the agent's sockets and a hostile local peer.

Both of the agent's listeners (the hand-over socket and the control API) go
through :func:`serve_listener`, which holds to three rules:

* **Who before what.** The peer's credentials (``SO_PEERCRED``, and
  ``SO_PEERGROUPS`` for its supplementary groups) are read when the
  connection is accepted. A peer that is not allowed gets one refusal and
  the connection closes: none of its bytes are ever parsed.
* **Bounded.** Connections are capped well below ``RLIMIT_NOFILE`` (refused
  with an answer, never left to fail with ``EMFILE``), idle ones time out, a
  packet, an HTTP head, a body and a JSON nesting depth all have limits.
* **Contained.** Whatever a connection's handler raises is logged and ends
  that connection only.

The module also holds the single-instance lock (``flock``) and the access
rule for the socket files (POSIX ACLs written from the allow-list).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import resource
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from orchestrator.errors import AgentBusyError, AgentSetupError, BadRequestError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable
    from pathlib import Path

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_FD_RESERVE = 64  # the interpreter, the event loop, the journal, the LUO sessions
_REFUSALS = 16  # connections being refused at once (each lingers briefly)
_LINGER = 1.0  # seconds a refused connection may take to read its refusal


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one peer may ask of the agent.

    :param idle_timeout: seconds a connection may wait between requests, and
        the time one HTTP request may take to arrive whole.
    :param max_connections: connections served at once on both sockets
        together; ``None``: a quarter of the fds ``RLIMIT_NOFILE`` leaves.
    :param max_registrations: fds held at once; ``None``: what the fd budget
        leaves once every connection is counted.
    """

    idle_timeout: float = 30.0
    max_connections: int | None = None
    max_registrations: int | None = None
    max_packet: int = 1 << 16
    max_depth: int = 8
    max_head: int = 16 << 10
    max_headers: int = 64
    max_body: int = 1 << 16

    def resolve(self, nofile: int | None = None) -> Limits:
        """These limits with the connection and registration caps filled in
        from the fd budget, which they must fit.

        :raises AgentSetupError: the budget cannot hold what was asked.
        """
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
        budget = nofile - _FD_RESERVE - 2 * _REFUSALS
        # A connection holds its socket and at most one fd in flight.
        conns = self.max_connections or min(256, budget // 4)
        regs = self.max_registrations or budget - 2 * conns
        if conns < 1 or regs < 1 or 2 * conns + regs > budget:
            raise AgentSetupError(
                None,
                f"RLIMIT_NOFILE is {nofile}: too low for {conns} connection(s) and "
                f"{regs} registration(s) (each connection may hold 2 fds, "
                f"{_FD_RESERVE + 2 * _REFUSALS} are kept for the agent itself); "
                "raise LimitNOFILE= or lower --max-connections",
            )
        return Limits(
            self.idle_timeout,
            conns,
            regs,
            self.max_packet,
            self.max_depth,
            self.max_head,
            self.max_headers,
            self.max_body,
        )


# --- decoding -------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def decode_object(data: bytes, max_depth: int) -> dict[str, Any]:
    """A JSON object from *data*, refused before ``json.loads`` if it nests
    deeper than *max_depth* (the stdlib decoder recurses once per level).

    :raises BadRequestError: not UTF-8, too deep, not JSON, or not an object.
    """
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"not UTF-8 ({exc.reason})") from None
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", data)):
        depth += 1 if match[0] in b"[{" else -1
        if depth > max_depth:
            raise BadRequestError(f"JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(data)
    except ValueError as exc:  # also int_max_str_digits
        raise BadRequestError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"expected a JSON object, got {type(value).__name__}")
    return value


# --- peers and socket files -----------------------------------------------------


def peer_of(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded when *sock*'s peer connected."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    groups: tuple[int, ...] = ()
    for size in (4 * 256, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # an old kernel: the primary gid only
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
        break
    return Peer(pid, uid, gid, groups)


_ACL_XATTR = "system.posix_acl_access"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ = 0x01, 0x02, 0x04
_ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def _acl(
    owner: int,
    group: int,
    other: int,
    uids: Iterable[int],
    gids: Iterable[int],
    perm: int,
) -> bytes:
    entries = [(_ACL_USER_OBJ, owner, _NO_ID)]
    entries += [(_ACL_USER, perm, uid) for uid in sorted(uids)]
    entries += [(_ACL_GROUP_OBJ, group, _NO_ID)]
    entries += [(_ACL_GROUP, perm, gid) for gid in sorted(gids)]
    entries += [(_ACL_MASK, group | perm, _NO_ID), (_ACL_OTHER, other, _NO_ID)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _group_obj(path: Path, mode: int) -> int:
    """The owning group's own permissions (with an ACL, the mode shows the mask)."""
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        return mode >> 3 & 7
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, _id = struct.unpack_from("<HHI", raw, offset)
        if tag == _ACL_GROUP_OBJ:
            return int(perm)
    return mode >> 3 & 7


def grant_access(sock_path: Path, uids: Collection[int], gids: Collection[int]) -> None:
    """Let exactly root and *uids*/*gids* connect to the socket at *sock_path*.

    The socket becomes ``rw`` for its owner (root) and, through POSIX ACL
    entries, for each allowed uid and gid; nobody else (its owning group
    included). Its directory keeps its mode and gains ``--x`` entries for
    the same uids and gids, so they can reach the socket but not list the
    directory. With an empty allow-list no ACL is written.

    :raises AgentSetupError: the filesystem has no ACLs and an allow-list was given.
    """
    os.chmod(sock_path, 0o600)
    directory = sock_path.parent
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    group = _group_obj(directory, mode)
    try:
        if not uids and not gids:
            for path in (sock_path, directory):
                try:
                    os.removexattr(path, _ACL_XATTR)
                except OSError as exc:
                    if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                        raise
            os.chmod(directory, mode & 0o707 | group << 3)
            return
        os.setxattr(sock_path, _ACL_XATTR, _acl(6, 0, 0, uids, gids, 6))
        os.setxattr(
            directory,
            _ACL_XATTR,
            _acl(mode >> 6 & 7, group, mode & 7, uids, gids, 1),
        )
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise AgentSetupError(
                sock_path,
                "--allow-uid/--allow-gid need POSIX ACLs on this filesystem "
                "(tmpfs, ext4, xfs and btrfs have them); it has none",
            ) from exc
        raise AgentSetupError(
            sock_path, f"cannot set who may connect: {exc.strerror}"
        ) from exc


def listen_unix(path: Path, kind: int, backlog: int) -> socket.socket:
    """A listening, non-blocking socket at *path*; a stale socket file there
    is replaced (the caller holds the instance lock), anything else is not.

    :raises AgentSetupError: *path* is not a socket, or cannot be bound.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # left by an agent that died: nobody serves it
        else:
            raise AgentSetupError(path, "exists and is not a socket; not replacing it")
    except FileNotFoundError:
        pass
    sock = socket.socket(
        socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)  # until grant_access; nobody can connect before listen()
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise AgentSetupError(path, f"cannot listen: {exc.strerror}") from exc
    return sock


@dataclass(slots=True)
class InstanceLock:
    """``flock`` on one file per guarded resource, held while the agent runs.

    A second agent finds the lock taken and learns the first one's pid from
    the file, without touching anything the first one owns.
    """

    paths: tuple[Path, ...]
    fds: list[int] = field(default_factory=list)

    def acquire(self) -> None:
        """:raises AgentBusyError: another agent holds one of the locks."""
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AgentSetupError(
                path, f"cannot open the lock: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 128, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AgentBusyError(path, holder or "pid unknown") from None
        self.fds.append(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        except OSError as exc:
            raise AgentSetupError(
                path, f"cannot write the lock: {exc.strerror}"
            ) from exc

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


# --- serving --------------------------------------------------------------------


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write *data* to a non-blocking stream socket (or as one packet)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


async def receive_some(sock: socket.socket, size: int) -> bytes:
    """Up to *size* bytes (or one packet, cut to *size*), ``b""`` at the end."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await anyio.wait_readable(sock)


@dataclass(slots=True)
class Slots:
    """Connections served now, against the cap (one count for both sockets)."""

    limit: int
    active: int = 0
    refusing: int = 0


async def serve_listener(
    listener: socket.socket,
    slots: Slots,
    allowed: Callable[[Peer], bool],
    handle: Callable[[socket.socket, Peer], Awaitable[None]],
    refusal: Callable[[Peer, str], bytes],
    what: str,
) -> None:
    """Accept on *listener* until cancelled; each allowed peer, while there is
    room, gets its own task running *handle*; the others get *refusal*."""
    async with anyio.create_task_group() as tg:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await anyio.wait_readable(listener)
                continue
            except OSError as exc:
                # EMFILE or ENFILE despite the cap (another part of the process):
                # the peer waits in the backlog; do not spin on a readable listener.
                logger.warning("%s: cannot accept: %s", what, exc.strerror)
                await anyio.sleep(0.2)
                continue
            try:
                conn.setblocking(False)
                peer = peer_of(conn)
            except OSError as exc:
                logger.info("%s: a peer went away before its check: %s", what, exc)
                conn.close()
                continue
            if not allowed(peer):
                reason = "peer"
            elif slots.active >= slots.limit:
                reason = "busy"
            else:
                slots.active += 1
                tg.start_soon(_contained, conn, peer, handle, slots, what)
                continue
            logger.warning(
                "%s: refused pid %d uid %d gid %d (%s)",
                what,
                peer.pid,
                peer.uid,
                peer.gid,
                "not allowed" if reason == "peer" else f"{slots.limit} connections",
            )
            if slots.refusing >= _REFUSALS:
                # Refusing many already: answer if it fits the socket buffer,
                # without waiting for the peer to read it.
                with contextlib.suppress(OSError):
                    conn.send(refusal(peer, reason))
                    for _ in range(16):  # what it sent already: closing on unread
                        if not conn.recv(4096, socket.MSG_DONTWAIT):  # data resets
                            break
                conn.close()
            else:
                slots.refusing += 1
                tg.start_soon(_refuse, conn, refusal(peer, reason), slots)


async def _contained(
    conn: socket.socket,
    peer: Peer,
    handle: Callable[[socket.socket, Peer], Awaitable[None]],
    slots: Slots,
    what: str,
) -> None:
    try:
        await handle(conn, peer)
    except Exception:  # a connection's failure ends that connection only
        logger.exception("%s: the connection of pid %d failed", what, peer.pid)
    finally:
        conn.close()
        slots.active -= 1


async def _refuse(conn: socket.socket, answer: bytes, slots: Slots) -> None:
    """Send *answer*, then let the peer read it: wait briefly for it to hang up,
    discarding (never reading into anything) what it sends meanwhile."""
    try:
        with anyio.move_on_after(_LINGER):
            await send_all(conn, answer)
            conn.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < 1 << 16:
                chunk = await receive_some(conn, 4096)  # fds attached are dropped
                if not chunk:
                    break
                drained += len(chunk)
    except OSError:
        pass  # the peer went away first
    finally:
        conn.close()
        slots.refusing -= 1
