"""Owned file descriptors and plain-words descriptions of what an fd is."""

from __future__ import annotations

import os
import stat

from orchestrator._compat import TYPE_CHECKING, final

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self


class Closing:
    """``with`` support for a class whose ``close()`` releases what it holds."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@final
class OwnedFd(Closing):
    """A file descriptor with one owner that closes it exactly once.

    Use it as a context manager, or call :meth:`close`. :meth:`detach` hands the
    raw fd over to a new owner (e.g. ``os.fdopen``) and forgets it.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("I/O operation on a closed fd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def detach(self) -> int:
        """Give up ownership and return the raw fd."""
        fd = self.fileno()
        self._fd = None
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        # Last resort only: owners close deterministically.
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return f"<OwnedFd {self._fd if self._fd is not None else 'closed'}>"


def fd_target(fd: int) -> str:
    """What ``/proc/self/fd/N`` points at (``""`` when it cannot be read)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def describe_fd(fd: int) -> str:
    """A short description of the kind of file *fd* is, for error messages.

    ``"a memfd ('vm-ram')"``, ``"a pipe"``, ``"a socket"``, ``"the device /dev/kvm"``,
    ``"a regular file (/var/lib/x)"``, ``"a KVM VM (anon_inode:kvm-vm)"`` ...
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return f"fd {fd} (not open)"
    target = fd_target(fd)
    if target.startswith("/memfd:"):
        name = target[len("/memfd:") :].removesuffix(" (deleted)")
        hugetlb = " hugetlb" if st.st_blksize > 65536 else ""
        return f"a{hugetlb} memfd ({name!r})"
    if target.startswith("anon_inode:"):
        what = target[len("anon_inode:") :].strip("[]")
        known = {
            "kvm-vm": "a KVM VM",
            "kvm-vcpu": "a KVM vCPU",
            "iommufd": "an iommufd",
        }
        return f"{known.get(what, 'an anonymous inode')} ({target})"
    if stat.S_ISFIFO(st.st_mode):
        return "a pipe"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    if stat.S_ISCHR(st.st_mode):
        return f"the character device {target or '?'}"
    if stat.S_ISDIR(st.st_mode):
        return f"a directory ({target})"
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink == 0:
            return f"an unlinked file ({target})"
        return f"a regular file ({target})"
    return f"a file ({target or 'unknown'})"


def shmem_can_preserve(fd: int) -> bool:
    """Whether the 7.2 kernel's memfd handler takes *fd*: ``memfd_luo_can_preserve()``
    accepts an unlinked shmem file (a memfd, an O_TMPFILE on tmpfs), not hugetlb.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
        return False
    target = fd_target(fd)
    if target.startswith("/memfd:"):
        return st.st_blksize <= 65536  # hugetlbfs reports the huge page size
    return _fs_type(target.removesuffix(" (deleted)")) == "tmpfs"


def _fs_type(path: str) -> str:
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as mounts:
            table = [line.split()[1:3] for line in mounts]
    except OSError:
        return kind
    for mnt, fstype in table:
        under = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if under and len(mnt) > len(best):
            best, kind = mnt, fstype
    return kind


def holds_same_file(pid: int, number: int, fd: int) -> bool:
    """Whether process *pid* -- alive, not a zombie -- has, as its fd
    *number*, the very file *fd* is (same device and inode): a workload
    serving a preserved file, found through ``/proc``."""
    try:
        theirs = os.stat(f"/proc/{pid}/fd/{number}")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    ours = os.fstat(fd)
    same = (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
    return same and state not in (b"Z", b"X")
