"""A simulated LUO kernel: both /dev/liveupdate ABIs at the ioctl level.

The emulator receives the very bytes the real kernel would (the client packs
them the same way for both), and answers with the kernel's errnos. Its state
lives in a directory of the user's choosing, so it needs no root, and it is
shared by every process that names the same directory (``sim:DIR``)::

    DIR/
      current -> boot-3          the running "kernel" (replaced atomically at kexec)
      boot-3/kernel.json         abi, boot id, liveupdate number, command line, release
      boot-3/kmsg                its kernel log
      boot-3/kexec.json          the loaded next kernel, if any
      boot-3/out/<hex name>/     sessions created in this boot (lock + files.json)
      boot-3/in/<hex name>/      sessions that came through the kexec (data files)
      boot-3/rfc.json            RFC ABI: global state and preserved tokens
      device.lock                flock'ed by the one opener of /dev/liveupdate
      mutex                      serializes "syscalls" between processes
      participants/<pid>         processes the kexec ends (see :meth:`SimKernel.join`)

How it mirrors the kernel (``kernel/liveupdate/``, ``mm/memfd_luo.c``):

- an outgoing session is alive while its fd is open: the fd holds an flock on
  the session's lock file, so closing it -- or the holder dying -- drops the
  session, as closing a session fd does in the kernel;
- a preserved file is pinned by a dup held in the preserving process; its
  contents are taken at the kexec, not at PRESERVE;
- the kexec (:meth:`SimKernel.reboot_kexec`) writes every live session's
  memfds to the next boot's state, byte for byte with size, position and
  seals, switches ``current`` atomically, then SIGKILLs every participant and
  finally the calling process: nothing else survives;
- in the new boot, retrieved files are fresh memfds with the same contents.

Simulator limits, stated so nobody mistakes them for kernel facts: a session
fd passed to another process still has its preserved files pinned by the
process that preserved them; on the RFC ABI, preserved files die with the
process that preserved them (the RFC kernel would keep them).
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from orchestrator._compat import TYPE_CHECKING, final

from . import _abi
from ._fds import shmem_can_preserve
from ._ioc import ioc_nr, ioc_type
from ._rfcstate import RfcState

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from typing import Any, Final, NoReturn

SEALS_KNOWN: Final = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20
"""MEMFD_LUO_ALL_SEALS: SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC."""
FAULTS_FILE: Final = "faults.json"
DEFAULT_CMDLINE: Final = "console=ttyS0 liveupdate=on"
DEFAULT_RELEASE: Final = "sim"
"""The release of a simulated kernel's first boot (``uname -r`` of a real one)."""


def release_of(image: str | os.PathLike[str]) -> str:
    """The release a kernel image boots, from its file name as distributions
    name them: ``/boot/vmlinuz-7.2.13-luo`` -> ``7.2.13-luo``."""
    name = Path(image).name
    return name.removeprefix("vmlinuz-") or name


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _new_boot_id() -> str:
    """A random id in the form of /proc/sys/kernel/random/boot_id."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one with its pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()[19]


def _fdinfo(pid: int, fd: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


# Plain classes rather than dataclasses: the simulator is imported on the
# restore path of a simulated host, and dataclasses cost milliseconds to import.


class _Device:
    __slots__ = ("abi",)

    def __init__(self, abi: str) -> None:
        self.abi = abi


class _OutSession:
    __slots__ = ("dups", "name", "path")

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.dups: dict[int, int] = {}  # token -> pinned dup


class _InSession:
    __slots__ = ("name", "opened", "path")

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.opened: dict[int, int] = {}  # token -> restored memfd


_Handle = _Device | _OutSession | _InSession


@final
class SimKernel:
    """A simulated kernel whose state lives in *root*.

    :param root: the state directory, created when missing.
    :param abi: ``"merged"`` or ``"rfc"``; only used when *root* is new.
    """

    def __init__(self, root: Path, abi: str = "merged") -> None:
        if abi not in ("merged", "rfc"):
            raise ValueError(f"unknown ABI {abi!r}: expected 'merged' or 'rfc'")
        self.root = root.absolute()
        self._handles: dict[int, _Handle] = {}
        self._rfc_dups: dict[int, int] = {}
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "participants").mkdir(exist_ok=True)
        with self._mutex():
            if not (self.root / "current").exists():
                self._new_boot(1, abi, 0, DEFAULT_CMDLINE, DEFAULT_RELEASE)

    @classmethod
    def existing(cls, root: Path) -> SimKernel:
        """The simulated kernel in *root*, made before by ``liveupdate sim init``.

        Nothing is created: a mistyped directory is an error, not a new kernel.

        :raises InvalidArgumentError: there is no simulated kernel in *root*.
        """
        if not (root / "current" / "kernel.json").is_file():
            from orchestrator.errors import InvalidArgumentError

            raise InvalidArgumentError(
                f"sim:{root}",
                f"no simulated kernel in {root}; create one with "
                f"'liveupdate sim init {root}'",
            )
        return cls(root)

    # --- state layout -----------------------------------------------------------

    @property
    def spec(self) -> str:
        return f"sim:{self.root}"

    @property
    def boot(self) -> Path:
        """The running boot's directory."""
        return self.root / "current"

    def info(self) -> dict[str, Any]:
        """kernel.json of the running boot: abi, boot_id, liveupdate_number, cmdline."""
        data: dict[str, Any] = _read_json(self.boot / "kernel.json")
        return data

    @property
    def abi(self) -> str:
        return str(self.info()["abi"])

    def release(self) -> str:
        """The running boot's release: the image's, after a kexec (see
        :func:`release_of`)."""
        return str(self.info().get("release", DEFAULT_RELEASE))

    def _new_boot(
        self, gen: int, abi: str, number: int, cmdline: str, release: str
    ) -> Path:
        path = self.root / f"boot-{gen}"
        shutil.rmtree(path, ignore_errors=True)
        (path / "out").mkdir(parents=True)
        (path / "in").mkdir()
        info = {
            "abi": abi,
            "boot_id": _new_boot_id(),
            "generation": gen,
            "liveupdate_number": number,
            "cmdline": cmdline,
            "release": release,
            "booted_at": time.time(),
            # The simulated kernel's clock starts here (see since_boot).
            "booted_boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
        }
        _write_json(path / "kernel.json", info)
        _write_json(path / "rfc.json", {"state": int(RfcState.NORMAL), "files": {}})
        (path / "kmsg").write_text("Linux version (simulated by luo-orchestrator)\n")
        if not (self.root / "current").exists():
            os.symlink(path.name, self.root / "current")
        return path

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        fd = os.open(self.root / "mutex", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _faults(self) -> dict[str, Any]:
        path = self.root / FAULTS_FILE
        if not path.exists():
            return {}
        data: dict[str, Any] = _read_json(path)
        return data

    def inject_fault(self, point: str, errno_name: str | None) -> None:
        """Make *point* (``"freeze"``, ``"kexec_load"``) fail with *errno_name*.

        ``None`` clears it. Used to rehearse a kernel that refuses the kexec.
        """
        faults = self._faults()
        if errno_name is None:
            faults.pop(point, None)
        else:
            if not hasattr(E, errno_name):
                raise ValueError(f"unknown errno {errno_name!r}")
            faults[point] = errno_name
        _write_json(self.root / FAULTS_FILE, faults)

    def _fault(self, point: str) -> None:
        name = self._faults().get(point)
        if name:
            raise _err(getattr(E, name))

    # --- processes ----------------------------------------------------------------

    def join(self, pid: int | None = None) -> None:
        """Register *pid* (default: this process) as ended by the next kexec."""
        pid = pid or os.getpid()
        start = _start_time(pid)
        if start is not None:
            (self.root / "participants" / str(pid)).write_text(start)

    def participants(self) -> list[int]:
        """Registered processes that are still alive."""
        alive = []
        for entry in (self.root / "participants").iterdir():
            pid = int(entry.name)
            if _start_time(pid) == entry.read_text():
                alive.append(pid)
            else:
                entry.unlink(missing_ok=True)
        return alive

    # --- Kernel protocol: device and ioctls ----------------------------------------

    def open_device(self) -> int:
        abi = self.abi
        fd = os.open(
            self.root / "device.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        if abi == "merged":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _err(E.EBUSY) from None
        self._handles[fd] = _Device(abi)
        return fd

    def _handle_of_dup(self, fd: int) -> _Handle:
        """The handle an fd duplicated from a handle's fd (dup, SCM_RIGHTS) refers to."""
        try:
            st = os.fstat(fd)
        except OSError:
            raise _err(E.EBADF) from None
        for known, handle in self._handles.items():
            try:
                other = os.fstat(known)
            except OSError:
                continue  # closed with os.close() (not ours to tell), or never here
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return handle
        # A retrieved session's fd that another process handed over (systemd
        # hands the agent's back after ``systemctl kexec``): it is the same
        # session here, as an fd is anywhere.
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.name == "lock" and path.parent.parent == (self.boot / "in").resolve():
            name = bytes.fromhex(path.parent.name).decode()
            handle = self._handles[fd] = _InSession(name, path.parent)
            return handle
        raise _err(E.ENOTTY)  # not a liveupdate file

    def close(self, fd: int) -> None:
        handle = self._handles.pop(fd, None)
        if isinstance(handle, _OutSession):
            with self._mutex():
                for dup in handle.dups.values():
                    os.close(dup)
                shutil.rmtree(handle.path, ignore_errors=True)
        elif isinstance(handle, _InSession):
            # luo_session_release(): a retrieved session is finished and removed.
            with self._mutex():
                self._finish(handle)
                shutil.rmtree(handle.path, ignore_errors=True)
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        handle = self._handles.get(fd)
        if handle is None:
            handle = self._handle_of_dup(fd)
        if ioc_type(request) != _abi.LIVEUPDATE_IOCTL_TYPE:
            raise _err(E.ENOTTY)
        with self._mutex():
            if isinstance(handle, _Device) and handle.abi == "rfc":
                self._rfc_ioctl(request, arg)
            else:
                self._merged_ioctl(handle, request, arg)

    # --- merged ABI -------------------------------------------------------------------

    # Per request: (layout, direction it applies to). Mirrors luo_ioctl_ops[] in
    # kernel/liveupdate/luo_core.c and luo_session_ioctl_ops[] in luo_session.c.
    _DEVICE_OPS: Final = {
        _abi.CREATE_SESSION.number: _abi.SESSION_CREATE,
        _abi.RETRIEVE_SESSION.number: _abi.SESSION_RETRIEVE,
    }
    _SESSION_OPS: Final = {
        _abi.FINISH.number: (_abi.SESSION_FINISH, "incoming"),
        _abi.PRESERVE_FD.number: (_abi.SESSION_PRESERVE_FD, "outgoing"),
        _abi.RETRIEVE_FD.number: (_abi.SESSION_RETRIEVE_FD, "incoming"),
        _abi.GET_NAME.number: (_abi.SESSION_GET_NAME, "all"),
    }

    def _merged_ioctl(
        self, handle: _Handle, request: int, arg: bytearray | None
    ) -> None:
        # The kernel's order: number in range (EINVAL), read the size (EFAULT),
        # exact request (ENOTTY), session direction (EINVAL), size >= minimum
        # (EINVAL), zero tail (E2BIG); then the operation itself.
        nr = ioc_nr(request)
        if isinstance(handle, _Device):
            if nr >= len(self._DEVICE_OPS):
                raise _err(E.EINVAL)
            self._user_size(arg)
            layout = self._DEVICE_OPS.get(request)
            if layout is None:
                raise _err(E.ENOTTY)
            fields = self._copy_in(layout, arg)
            assert arg is not None
            if request == _abi.CREATE_SESSION.number:
                self._create_session(fields, arg)
            else:
                self._retrieve_session(fields, arg)
            return
        base = _abi.MergedNr.SESSION_PRESERVE_FD
        if not base <= nr < base + len(self._SESSION_OPS):
            raise _err(E.EINVAL)
        self._user_size(arg)
        op = self._SESSION_OPS.get(request)
        if op is None:
            raise _err(E.ENOTTY)
        layout, applies_to = op
        incoming = isinstance(handle, _InSession)
        if applies_to != "all" and incoming != (applies_to == "incoming"):
            raise _err(E.EINVAL)
        fields = self._copy_in(layout, arg)
        assert arg is not None
        if request == _abi.PRESERVE_FD.number:
            assert isinstance(handle, _OutSession)
            self._preserve_fd(handle, fields)
        elif request == _abi.RETRIEVE_FD.number:
            assert isinstance(handle, _InSession)
            self._retrieve_fd(handle, fields, arg)
        elif request == _abi.FINISH.number:
            assert isinstance(handle, _InSession)
            if fields["reserved"]:
                raise _err(E.EINVAL)
            self._finish(handle)
        else:
            if fields["reserved"]:
                raise _err(E.EINVAL)
            self._copy_out(_abi.SESSION_GET_NAME, arg, name=handle.name.encode())

    @staticmethod
    def _user_size(arg: bytearray | None) -> int:
        """get_user(size): EFAULT when the argument is not readable."""
        if arg is None or len(arg) < 4:
            raise _err(E.EFAULT)
        return int.from_bytes(arg[:4], sys.byteorder)

    @classmethod
    def _copy_in(
        cls, layout: _abi.Layout, arg: bytearray | None
    ) -> dict[str, int | bytes]:
        """copy_struct_from_user(): EINVAL if short, E2BIG if a tail byte is set."""
        size = cls._user_size(arg)
        assert arg is not None
        if size < layout.size:
            raise _err(E.EINVAL)
        if size > len(arg):
            raise _err(E.EFAULT)
        if any(arg[layout.size : size]):
            raise _err(E.E2BIG)
        return layout.unpack(arg)

    @staticmethod
    def _copy_out(layout: _abi.Layout, arg: bytearray, **values: int | bytes) -> None:
        current = layout.unpack(arg)
        current.update(values)
        arg[: layout.size] = layout.pack(**current)

    @staticmethod
    def _name(raw: int | bytes, *, create: bool) -> str:
        """The name as the kernel reads it; CREATE wants 1..63 bytes (strnlen)."""
        assert isinstance(raw, bytes)
        if create and (raw[0] == 0 or 0 not in raw):
            raise _err(E.EINVAL)
        return _abi.decode_name(raw)

    def _create_session(self, fields: dict[str, int | bytes], arg: bytearray) -> None:
        name = self._name(fields["name"], create=True)
        path = self.boot / "out" / name.encode().hex()
        path.mkdir(exist_ok=True)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _err(E.EEXIST) from None
        # A holder that closed or died dropped its session: start afresh.
        _write_json(path / "files.json", {"name": name, "files": {}})
        self._handles[fd] = _OutSession(name, path)
        self._copy_out(_abi.SESSION_CREATE, arg, fd=fd)

    def _retrieve_session(self, fields: dict[str, int | bytes], arg: bytearray) -> None:
        name = self._name(fields["name"], create=False)
        path = self.boot / "in" / name.encode().hex()
        if not path.exists():
            raise _err(E.ENOENT)
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _err(E.EINVAL) from None  # retrieved, and its holder has it open
        state = _read_json(path / "state.json")
        if state["retrieved"]:
            # Its holder closed it or died: luo_session_release() finished and
            # removed it then. Do now what the release would have done.
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise _err(E.ENOENT)
        state["retrieved"] = True
        _write_json(path / "state.json", state)
        self._handles[fd] = _InSession(name, path)
        self._copy_out(_abi.SESSION_RETRIEVE, arg, fd=fd)

    def _live_files(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """files.json of every outgoing session whose holder still has it open."""
        for path in (self.boot / "out").iterdir():
            try:
                fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield path, _read_json(path / "files.json")
            else:  # nobody holds it: the session was closed
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)

    def _preserve_fd(self, handle: _OutSession, fields: dict[str, int | bytes]) -> None:
        # luo_preserve_file(): token (EEXIST), fget (EBADF), a handler
        # (ENOENT), not preserved elsewhere (EBUSY), then memfd_luo's seals.
        fd, token = int(fields["fd"]), int(fields["token"])
        record = _read_json(handle.path / "files.json")
        if str(token) in record["files"]:
            raise _err(E.EEXIST)
        try:
            st = os.fstat(fd)
        except OSError:
            raise _err(E.EBADF) from None
        if not shmem_can_preserve(fd):
            raise _err(E.ENOENT)
        inode = [st.st_dev, st.st_ino]
        for _, other in self._live_files():
            if any(f["inode"] == inode for f in other["files"].values()):
                raise _err(E.EBUSY)
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & ~SEALS_KNOWN:
            raise _err(E.EOPNOTSUPP)
        dup = os.dup(fd)
        handle.dups[token] = dup
        record["files"][str(token)] = {"pid": os.getpid(), "fd": dup, "inode": inode}
        _write_json(handle.path / "files.json", record)

    def _retrieve_fd(
        self, handle: _InSession, fields: dict[str, int | bytes], arg: bytearray
    ) -> None:
        token = int(fields["token"])
        if _read_json(handle.path / "state.json")["finished"]:
            raise _err(E.ENOENT)
        if token not in handle.opened:
            file = _read_json(handle.path / "meta.json")["files"].get(str(token))
            if file is None:
                raise _err(E.ENOENT)
            handle.opened[token] = _restore_memfd(handle.path / f"{token}.data", file)
        # Asked again: the same file, a new fd (get_file() in luo_retrieve_file).
        self._copy_out(_abi.SESSION_RETRIEVE_FD, arg, fd=os.dup(handle.opened[token]))

    @staticmethod
    def _finish(handle: _InSession) -> None:
        # Files retrieved before stay usable through the caller's fds.
        for restored in handle.opened.values():
            os.close(restored)
        handle.opened.clear()
        state = _read_json(handle.path / "state.json")
        state["finished"] = True
        _write_json(handle.path / "state.json", state)
        for data in handle.path.glob("*.data"):
            data.unlink()

    # --- RFC ABI ------------------------------------------------------------------------

    def _rfc_ioctl(self, request: int, arg: bytearray | None) -> None:
        state_path = self.boot / "rfc.json"
        rfc = _read_json(state_path)
        state = RfcState(rfc["state"])
        if request == _abi.RFC_GET_STATE.number:
            if arg is None or len(arg) < _abi.RFC_STATE.size:
                raise _err(E.EFAULT)
            arg[: _abi.RFC_STATE.size] = _abi.RFC_STATE.pack(state=int(state))
            return
        if request == _abi.RFC_PREPARE.number:
            self._rfc_require(state, RfcState.NORMAL)
            rfc["state"] = int(RfcState.PREPARED)
        elif request == _abi.RFC_CANCEL.number:
            self._rfc_require(state, RfcState.PREPARED, RfcState.FROZEN)
            rfc["state"] = int(RfcState.NORMAL)
        elif request == _abi.RFC_FINISH.number:
            self._rfc_require(state, RfcState.UPDATED)
            rfc["state"] = int(RfcState.NORMAL)
            shutil.rmtree(self.boot / "rfc-in", ignore_errors=True)
        elif request == _abi.RFC_FD_PRESERVE.number:
            self._rfc_require(state, RfcState.NORMAL)
            fields = self._rfc_arg(_abi.RFC_FD, arg)
            fd, token = int(fields["fd"]), int(fields["token"])
            try:
                os.fstat(fd)
            except OSError:
                raise _err(E.EBADF) from None
            if str(token) in rfc["files"]:
                raise _err(E.EEXIST)
            if not shmem_can_preserve(fd):
                raise _err(E.ENOENT)
            dup = os.dup(fd)
            self._rfc_dups[token] = dup
            rfc["files"][str(token)] = {"pid": os.getpid(), "fd": dup}
        elif request == _abi.RFC_FD_UNPRESERVE.number:
            self._rfc_require(state, RfcState.NORMAL)
            token = int(self._rfc_arg(_abi.RFC_TOKEN, arg)["token"])
            if rfc["files"].pop(str(token), None) is None:
                raise _err(E.ENOENT)
            if token in self._rfc_dups:
                os.close(self._rfc_dups.pop(token))
        elif request == _abi.RFC_FD_RESTORE.number:
            self._rfc_require(state, RfcState.UPDATED)
            token = int(self._rfc_arg(_abi.RFC_FD, arg)["token"])
            data = self.boot / "rfc-in" / f"{token}.data"
            meta_path = self.boot / "rfc-in" / "meta.json"
            meta = _read_json(meta_path) if meta_path.exists() else {}
            file = meta.pop(str(token), None)
            if file is None:
                raise _err(E.ENOENT)
            fd = _restore_memfd(data, file)
            data.unlink()
            _write_json(meta_path, meta)
            assert arg is not None
            self._copy_out(_abi.RFC_FD, arg, fd=fd)
        else:
            raise _err(E.ENOTTY)
        _write_json(state_path, rfc)

    @staticmethod
    def _rfc_require(state: RfcState, *allowed: RfcState) -> None:
        if state not in allowed:
            raise _err(E.EBUSY)

    @staticmethod
    def _rfc_arg(layout: _abi.Layout, arg: bytearray | None) -> dict[str, int | bytes]:
        if arg is None or len(arg) < layout.size:
            raise _err(E.EFAULT)
        return layout.unpack(arg)

    # --- kexec ---------------------------------------------------------------------------

    def boot_id(self) -> str:
        return str(self.info()["boot_id"])

    def since_boot(self) -> float:
        info = self.info()
        start = float(info.get("booted_boottime", 0.0))
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start

    def cmdline(self) -> str:
        return str(self.info()["cmdline"])

    def kexec_load(self, kernel: Path, initrd: Path | None, cmdline: str) -> None:
        from ._errors import KexecError

        try:
            self._fault("kexec_load")
        except OSError as exc:
            raise KexecError(
                exc.errno or E.EIO, "kexec_file_load", "injected fault"
            ) from exc
        for image in (kernel, initrd):
            if image is not None and not os.access(image, os.R_OK):
                raise KexecError(
                    E.ENOENT, "kexec_file_load", f"{image}: cannot read it"
                )
        with self._mutex():
            _write_json(
                self.boot / "kexec.json",
                {
                    "kernel": str(kernel),
                    "initrd": str(initrd or ""),
                    "cmdline": cmdline,
                },
            )

    def kexec_unload(self) -> None:
        with self._mutex():
            (self.boot / "kexec.json").unlink(missing_ok=True)

    def kexec_loaded(self) -> bool:
        return (self.boot / "kexec.json").exists()

    def log_lines(self) -> Sequence[str]:
        return (self.boot / "kmsg").read_text().splitlines()

    def reboot_kexec(self) -> NoReturn:
        """Freeze every live session into the next boot, then end every participant.

        Fails like the syscall -- the old "kernel" keeps running -- when no kernel
        is loaded (EINVAL) or a file refuses to freeze (injected ``freeze`` fault).
        """
        from ._errors import KexecError

        with self._mutex():
            if not self.kexec_loaded():
                raise KexecError(
                    E.EINVAL, "reboot(LINUX_REBOOT_CMD_KEXEC)", "no kernel is loaded"
                )
            try:
                self._fault("freeze")
            except OSError as exc:
                raise KexecError(
                    exc.errno or E.EIO,
                    "reboot(LINUX_REBOOT_CMD_KEXEC)",
                    "a preserved file refused to freeze; the kexec was cancelled",
                ) from exc
            self._kexec_locked()
        victims = [pid for pid in self.participants() if pid != os.getpid()]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for entry in (self.root / "participants").iterdir():
            entry.unlink(missing_ok=True)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: SIGKILL returned")

    def reboot_cold(self) -> None:
        """A plain reboot (power cycle, watchdog, ``reboot -f``): a new boot that
        carries nothing -- no session, no liveupdate number -- and ends every
        participant. The calling process survives (it stands for the operator)."""
        with self._mutex():
            info = self.info()
            nxt = self._new_boot(
                int(info["generation"]) + 1,
                info["abi"],
                0,
                DEFAULT_CMDLINE,
                self.release(),
            )
            old = os.readlink(self.root / "current")
            tmp = self.root / "current.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(nxt.name, tmp)
            os.replace(tmp, self.root / "current")
            shutil.rmtree(self.root / old, ignore_errors=True)
        for pid in self.participants():
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _kexec_locked(self) -> None:
        info = self.info()
        loaded = _read_json(self.boot / "kexec.json")
        gen = int(info["generation"]) + 1
        number = int(info["liveupdate_number"])
        nxt = self._new_boot(
            gen, info["abi"], number, loaded["cmdline"], release_of(loaded["kernel"])
        )
        carried = 0
        if info["abi"] == "merged":
            for path, record in self._live_files():
                dest = nxt / "in" / path.name
                dest.mkdir()
                files = {
                    token: _freeze_file(
                        int(f["pid"]), int(f["fd"]), dest / f"{token}.data"
                    )
                    for token, f in record["files"].items()
                }
                _write_json(
                    dest / "meta.json", {"name": record["name"], "files": files}
                )
                _write_json(
                    dest / "state.json", {"retrieved": False, "finished": False}
                )
                carried += 1
        else:
            rfc = _read_json(self.boot / "rfc.json")
            if RfcState(rfc["state"]) == RfcState.PREPARED:
                dest = nxt / "rfc-in"
                dest.mkdir()
                meta = {
                    token: _freeze_file(
                        int(f["pid"]), int(f["fd"]), dest / f"{token}.data"
                    )
                    for token, f in rfc["files"].items()
                }
                _write_json(dest / "meta.json", meta)
                _write_json(
                    nxt / "rfc.json", {"state": int(RfcState.UPDATED), "files": {}}
                )
                carried = 1
        with (nxt / "kmsg").open("a") as kmsg:
            kmsg.write(f"Command line: {loaded['cmdline']}\n")
            if carried:
                kmsg.write("KHO: found kexec handover data.\n")
                kmsg.write(
                    f"luo: Retrieved live update data, liveupdate number: {number + 1}\n"
                )
        if carried:
            info = _read_json(nxt / "kernel.json")
            info["liveupdate_number"] = number + 1
            _write_json(nxt / "kernel.json", info)
        old = os.readlink(self.root / "current")
        tmp = self.root / "current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(nxt.name, tmp)
        os.replace(tmp, self.root / "current")  # the kexec: atomic
        shutil.rmtree(self.root / old, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<SimKernel {self.root}>"


def _freeze_file(pid: int, fd: int, dest: Path) -> dict[str, int]:
    """Copy a pinned file's contents, size, position and seals to *dest*."""
    source = f"/dev/fd/{fd}" if pid == os.getpid() else f"/proc/{pid}/fd/{fd}"
    info = _fdinfo(pid, fd)
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        seals = fcntl.fcntl(src, fcntl.F_GET_SEALS)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < size:
                sent = os.sendfile(out, src, offset, size - offset)
                if sent == 0:
                    break
                offset += sent
        finally:
            os.close(out)
    finally:
        os.close(src)
    return {
        "size": size,
        "pos": int(info.get("pos", "0")),
        "flags": int(info.get("flags", "2"), 8),
        "seals": seals,
    }


def _restore_memfd(data: Path, file: dict[str, int]) -> int:
    """A new memfd holding *data*, with the recorded size, position and seals."""
    fd = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        src = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = file["size"]
            os.ftruncate(fd, size)
            offset = 0
            while offset < size:
                sent = os.sendfile(fd, src, None, size - offset)
                if sent == 0:
                    break
                offset += sent
        finally:
            os.close(src)
        os.lseek(fd, file["pos"], os.SEEK_SET)
        seals = file["seals"] & ~fcntl.F_SEAL_SEAL
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        if file["seals"] & fcntl.F_SEAL_SEAL:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd
