"""The service side of systemd's fd store, in the standard library.

A process that must not lose an fd when it dies does not hold that fd alone:
under systemd, the agent hands a copy of every fd it holds for a workload to
its service's *fd store* (``sd_pid_notify_with_fds(... "FDSTORE=1\\nFDNAME=")``,
i.e. one ``AF_UNIX`` datagram to ``$NOTIFY_SOCKET`` with the fd attached as
``SCM_RIGHTS``), and takes them back when it starts (``$LISTEN_FDS`` fds from
fd 3 on, named by ``$LISTEN_FDNAMES``, meant for ``$LISTEN_PID``). A restarted
agent (``Restart=on-failure``) thus finds its registrations again. The unit
must allow a store (``FileDescriptorStoreMax=``); with
``FileDescriptorStorePreserve=yes`` (systemd >= 261) systemd also keeps the
store's memfds across a kexec in its own LUO session, best effort.

Names: systemd accepts an ``FDNAME`` of at most 255 printable ASCII characters
without ``:``. A registration name is any 1..128 characters, so it is stored
as ``reg-`` + its UTF-8 in unpadded URL-safe base64 (at most 175 characters).

Nothing here raises for a missing systemd: outside a service (no
``$NOTIFY_SOCKET``) every call is a no-op that says so by returning False.

.. versionadded:: 0.2
"""

from __future__ import annotations

import array
import base64
import binascii
import logging
import os
import re
import select
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence

logger = logging.getLogger(__name__)

#: The first fd systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START: Final = 3
#: More than this many passed fds is not believed (a corrupt environment).
MAX_LISTEN_FDS: Final = 4096
#: The first systemd whose fd store can outlive a kexec
#: (``FileDescriptorStorePreserve=``).
FD_STORE_PRESERVE_SINCE: Final = 261
REGISTRATION_PREFIX: Final = "reg-"
#: An update's LUO session fds are parked too (``lus-`` + the session name in
#: the same base64), so that they outlive the agent: a restart before the
#: kexec, and ``systemctl kexec``'s shutdown, which stops the agent first.
SESSION_PREFIX: Final = "lus-"
_VERSION = re.compile(r"^systemd (\d+)\b", re.M)


@dataclass(frozen=True, slots=True)
class StoredFd:
    """An fd systemd handed back at start, with the name it was stored under."""

    name: str
    fd: int


@dataclass(frozen=True, slots=True)
class FdStoreSupport:
    """Whether this host's systemd keeps the agent's fd store, and why (not)."""

    #: The agent runs as a service with a notify socket: the store is usable.
    store: bool
    #: The store also survives a kexec (systemd >= 261 with the unit's
    #: ``FileDescriptorStorePreserve=yes``; whether the unit sets it is the
    #: unit's business, this checks the version).
    preserved_across_kexec: bool
    #: The systemd version found, None when there is none or it did not say.
    version: int | None
    reason: str


def _fdname(prefix: str, name: str) -> str:
    return prefix + base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()


def _named(prefix: str, fdname: str) -> str | None:
    if not fdname.startswith(prefix):
        return None
    encoded = fdname[len(prefix) :]
    try:
        raw = base64.b64decode(
            encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True
        )
        return raw.decode()
    except (binascii.Error, ValueError):
        return None


def registration_fdname(name: str) -> str:
    """The ``FDNAME`` a registration is stored under (see the module docstring)."""
    return _fdname(REGISTRATION_PREFIX, name)


def registration_name(fdname: str) -> str | None:
    """The registration an ``FDNAME`` stands for; None if it names none."""
    return _named(REGISTRATION_PREFIX, fdname)


def session_fdname(name: str) -> str:
    """The ``FDNAME`` an update's LUO session fd is stored under."""
    return _fdname(SESSION_PREFIX, name)


def session_name(fdname: str) -> str | None:
    """The LUO session an ``FDNAME`` stands for; None if it names none."""
    return _named(SESSION_PREFIX, fdname)


def _address(environ: MutableMapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    if path:
        logger.warning("NOTIFY_SOCKET=%s is not a Unix socket: not notifying", path)
    return None


def notify(
    message: str,
    fds: Sequence[int] = (),
    *,
    environ: MutableMapping[str, str] | None = None,
) -> bool:
    """Send *message* (``KEY=value`` lines) with *fds* to ``$NOTIFY_SOCKET``.

    Blocking (one ``sendmsg`` on a datagram socket): call it from a worker
    thread in async code.

    :return: True when sent, False when there is no notify socket or sending
        failed (logged: systemd went away or refused the fds).
    """
    env = os.environ if environ is None else environ
    address = _address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sock.sendmsg([message.encode()], rights if fds else [], 0, address)
    except OSError as exc:
        logger.warning("cannot notify systemd (%s): %s", message.split("\n")[0], exc)
        return False
    return True


def store_fd(
    fd: int, fdname: str, *, environ: MutableMapping[str, str] | None = None
) -> bool:
    """Put a copy of *fd* in the service's fd store under *fdname*."""
    return notify(f"FDSTORE=1\nFDNAME={fdname}", [fd], environ=environ)


def remove_fd(fdname: str, *, environ: MutableMapping[str, str] | None = None) -> bool:
    """Drop every fd stored under *fdname* from the service's fd store."""
    return notify(f"FDSTOREREMOVE=1\nFDNAME={fdname}", environ=environ)


def listen_fds(
    *, environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[StoredFd]:
    """The fds systemd passed to this process (``sd_listen_fds_with_names``).

    Only when ``$LISTEN_PID`` is this process (the variables are inherited by
    children, which must not take the fds for theirs). The fds are made
    close-on-exec and the three variables are removed from the environment.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    if not 0 <= count <= MAX_LISTEN_FDS:
        logger.warning("LISTEN_FDS=%d is not believable: ignored", count)
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    out = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            logger.warning("LISTEN_FDS says fd %d was passed; it is not open", fd)
            continue
        out.append(StoredFd(names[i] if i < len(names) else "unknown", fd))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return out


def parse_systemd_version(text: str) -> int | None:
    """The version in ``systemctl --version``'s output (``systemd 262 (...)``)."""
    m = _VERSION.search(text)
    return int(m.group(1)) if m else None


def systemd_version(*, run_dir: Path = Path("/run/systemd/system")) -> int | None:
    """The running systemd's version; None when the host is not booted with it."""
    if not run_dir.is_dir():
        return None
    try:
        done = subprocess.run(
            ["systemctl", "--version"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_systemd_version(done.stdout)


def fd_store_support(
    version: int | None, *, environ: MutableMapping[str, str] | None = None
) -> FdStoreSupport:
    """What the fd store can do for the agent here, and the reason in words."""
    env = os.environ if environ is None else environ
    if _address(env) is None:
        return FdStoreSupport(
            False,
            False,
            version,
            "not run by systemd (no NOTIFY_SOCKET): the agent alone holds "
            "its registrations' fds",
        )
    if version is None:
        return FdStoreSupport(
            True,
            False,
            None,
            "fd store in use; systemd's version unknown: its preservation "
            "across a kexec is not assumed",
        )
    if version < FD_STORE_PRESERVE_SINCE:
        return FdStoreSupport(
            True,
            False,
            version,
            f"fd store in use; systemd {version} < {FD_STORE_PRESERVE_SINCE}: "
            "fd-store preservation across a kexec is unavailable",
        )
    return FdStoreSupport(
        True,
        True,
        version,
        f"fd store in use; systemd {version} can keep it across a kexec "
        "(with FileDescriptorStorePreserve=yes)",
    )


def own_unit(cgroup: str) -> str | None:
    """The service unit a ``/proc/self/cgroup`` text puts this process in."""
    for line in cgroup.splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy == "0" and path:
            leaf = path.rstrip("/").rsplit("/", 1)[-1]
            return leaf if leaf.endswith(".service") else None
    return None


def unit_properties(unit: str, *names: str) -> dict[str, str]:
    """``systemctl show --property=NAME ... UNIT`` as a dict; empty when
    systemctl cannot be asked. A property this systemd does not know is
    missing or empty."""
    try:
        done = subprocess.run(
            ["systemctl", "show", *(f"--property={n}" for n in names), unit],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (line.partition("=") for line in done.stdout.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def store_preserved_by_unit(unit: str) -> bool:
    """Whether *unit* has ``FileDescriptorStorePreserve=yes``.

    ``systemctl show`` of an older systemd without the property prints
    nothing for it: not preserved.
    """
    props = unit_properties(unit, "FileDescriptorStorePreserve")
    return props.get("FileDescriptorStorePreserve") == "yes"


def notify_barrier(
    *, timeout: float = 10.0, environ: MutableMapping[str, str] | None = None
) -> bool:
    """Wait until systemd has handled every notification this process sent
    before (``sd_notify_barrier``): ``BARRIER=1`` carries a pipe's write end,
    which systemd closes once it got that far.

    :return: False without a notify socket, or if systemd did not answer in
        *timeout* seconds.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        sent = notify("BARRIER=1", [w], environ=environ)
        os.close(w)
        w = -1
        if not sent:
            return False
        poll = select.poll()
        poll.register(r, select.POLLHUP)  # POLLHUP: the last write end closed
        return bool(poll.poll(int(timeout * 1000)))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def kexec_via_systemd_refusal(support: FdStoreSupport) -> str | None:
    """Why ``systemctl kexec`` would lose this agent's sessions; None when it won't.

    systemd stops the agent early in the shutdown. Its sessions live on only
    in its fd store, which must survive the kexec: systemd >= 261, and the
    unit's ``FileDescriptorStorePreserve=yes``. And they must be in it: a
    full store (``FileDescriptorStoreMax=``) drops what is sent to it with
    no answer but a log line, so a store found full, once systemd has handled
    everything this agent sent it, is refused too (asked again after the
    sessions are parked).
    """
    if not support.preserved_across_kexec:
        return support.reason
    try:
        unit = own_unit(Path("/proc/self/cgroup").read_text())
    except OSError:
        unit = None
    if unit is None:
        return "the agent does not run as a systemd service"
    if not notify_barrier():
        return "systemd did not confirm that it handled the fd store's updates"
    props = unit_properties(
        unit,
        "FileDescriptorStorePreserve",
        "NFileDescriptorStore",
        "FileDescriptorStoreMax",
    )
    if props.get("FileDescriptorStorePreserve") != "yes":
        return f"{unit} does not set FileDescriptorStorePreserve=yes"
    try:
        held, room = (
            int(props["NFileDescriptorStore"]),
            int(props["FileDescriptorStoreMax"]),
        )
    except (KeyError, ValueError):
        return f"systemctl show {unit} does not say how full its fd store is"
    if held >= room:
        return (
            f"{unit}'s fd store is full ({held} of FileDescriptorStoreMax={room}), "
            "and systemd drops what does not fit; raise FileDescriptorStoreMax"
        )
    return None
