"""Launching QEMU VMs whose guest RAM is a memfd, and finding that memfd again.

A VM is described by a :class:`VmSpec` (what to run) and, once started, by a
:class:`VmInfo` (where it runs), which :func:`launch_vm` publishes as
``REGISTRY/<name>.json``. Guest RAM is always a shared memory backend named
``ram`` and used as the machine's RAM (``-machine ...,memory-backend=ram``):

- always ``memory-backend-file,share=on,mem-path=/proc/self/fd/N`` on an
  inherited memfd: for a fresh VM one the launcher creates, for a restored VM
  the one preserved across the kexec (started with ``-S -incoming defer`` so
  that its device state can be loaded first).

The RAM block keeps the id ``ram`` in both, which is what lets a migration
stream with ``x-ignore-shared`` find it. Both sides must be the same kind of
backend: QEMU 11.1 in ``cpr-reboot`` mode left out of the stream only shared
RAM that is a *named file*; a ``memory-backend-memfd`` source sent its RAM
(976,315 bytes of stream for a 32 MiB VM instead of ~300 KB) and the
restoring QEMU, on a file backend, refused it ("block ram should not be
migrated"). QEMU 7.2 took either.

QEMU is started detached (new session, reparented away from the caller, so it
outlives the orchestrator that started it), with stdout/stderr appended to
``REGISTRY/<name>.log``. Every path handed to QEMU is absolute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

from orchestrator.errors import QmpError, VmError

if TYPE_CHECKING:
    from ._qmp import QmpClient

logger = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
RAM_ID = "ram"
_SPAWN = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
_XP_WORD = re.compile(r"0x([0-9a-fA-F]{8})\b")


@final
@dataclass(frozen=True, slots=True)
class VmSpec:
    """What to run: enough to start the same machine again after the kexec.

    :ivar image: a raw disk image, attached as the first IDE disk.
    :ivar extra: further QEMU arguments (the same on both sides of the kexec).
    """

    name: str
    image: str
    ram_mib: int = 64
    machine: str = "pc"
    accel: str = "tcg"
    extra: tuple[str, ...] = ()

    @property
    def ram_size(self) -> int:
        return self.ram_mib << 20


@final
@dataclass(frozen=True, slots=True)
class VmInfo:
    """A running VM, as published in ``REGISTRY/<name>.json``.

    :ivar ram_fd: the guest-RAM memfd's fd number inside QEMU, when known at
        launch (a restored VM); ``None`` when QEMU made the memfd itself.
    """

    spec: VmSpec
    pid: int
    qmp: str
    log: str
    ram_fd: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"]["extra"] = list(self.spec.extra)
        data["name"] = self.name
        data["ram_size"] = self.spec.ram_size
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmInfo:
        spec = dict(data["spec"])
        spec["extra"] = tuple(spec.get("extra", ()))
        return cls(
            spec=VmSpec(**spec),
            pid=int(data["pid"]),
            qmp=str(data["qmp"]),
            log=str(data["log"]),
            ram_fd=None if data.get("ram_fd") is None else int(data["ram_fd"]),
            extra=dict(data.get("extra", {})),
        )


def qemu_argv(
    spec: VmSpec, qmp: Path, serial: Path, ram_fd: int, incoming: bool
) -> list[str]:
    """QEMU's command line for *spec*, its RAM on the inherited fd *ram_fd*."""
    backend = (
        f"memory-backend-file,id={RAM_ID},size={spec.ram_mib}M,share=on,"
        f"mem-path=/proc/self/fd/{ram_fd}"
    )
    argv = [
        QEMU,
        "-name",
        spec.name,
        "-machine",
        f"{spec.machine},memory-backend={RAM_ID}",
        "-accel",
        spec.accel,
        "-m",
        f"{spec.ram_mib}M",
        "-object",
        backend,
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{serial.absolute()}",
        "-drive",
        f"file={Path(spec.image).absolute()},format=raw,if=ide",
        "-qmp",
        f"unix:{qmp.absolute()},server=on,wait=off",
        *spec.extra,
    ]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


def running(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def log_tail(path: str | Path, lines: int = 5) -> str:
    """The last *lines* of a log, on one line (for error messages)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def _serving(path: Path) -> bool:
    """Whether QEMU's main loop answers QMP: it has started the machine.

    The socket listens, and QMP's own thread greets, before QEMU has opened
    its disks; a QEMU that then fails (a disk another QEMU holds locked)
    exits without answering a command.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            with probe.makefile("rb") as reader:  # closed before the socket
                if not reader.readline().startswith(b'{"QMP"'):
                    return False
                probe.sendall(b'{"execute": "qmp_capabilities"}\n')
                return reader.readline().startswith(b'{"return"')
        except OSError:
            return False


def launch_vm(
    registry: Path,
    spec: VmSpec,
    kernel_spec: str = "",
    *,
    ram_fd: int | None = None,
    incoming: bool = False,
    timeout: float = 60.0,
) -> VmInfo:
    """Start QEMU for *spec*, detached, and publish ``REGISTRY/<name>.json``.

    Blocks (run it in a worker thread from async code) until QEMU's QMP socket
    accepts connections. On a simulated kernel (*kernel_spec* ``sim:DIR``) the
    QEMU process is registered as one that the kexec ends.

    :param ram_fd: an fd of this process holding the guest RAM (a memfd); it
        is inherited by QEMU under the same number. Without it, a new memfd
        of the spec's RAM size is made for QEMU (and closed here once QEMU
        has it).
    :param incoming: start paused, waiting for ``migrate-incoming``.
    :raises VmError: QEMU exited or did not come up within *timeout* seconds.
    """
    registry = registry.absolute()
    registry.mkdir(parents=True, exist_ok=True)
    qmp = registry / f"{spec.name}.qmp"
    log = registry / f"{spec.name}.log"
    qmp.unlink(missing_ok=True)
    own_fd = None
    if ram_fd is None:
        try:
            own_fd = ram_fd = os.memfd_create(f"{spec.name}-ram", os.MFD_CLOEXEC)
            os.ftruncate(own_fd, spec.ram_size)
        except OSError as exc:
            if own_fd is not None:
                os.close(own_fd)
            raise VmError(spec.name, f"cannot make its guest RAM: {exc}") from exc
    argv = qemu_argv(spec, qmp, registry / f"{spec.name}.serial", ram_fd, incoming)
    with log.open("a") as out:
        out.write(f"--- {time.strftime('%F %T')} {' '.join(argv)}\n")
    try:
        done = subprocess.run(
            ["sh", "-c", _SPAWN, "sh", str(log), *argv],
            pass_fds=(ram_fd,),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
            start_new_session=True,
            timeout=30,
        )
        pid = int(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise VmError(spec.name, f"cannot start {QEMU}: {exc}") from exc
    finally:
        if own_fd is not None:
            os.close(own_fd)  # QEMU holds it now, under the same number
    deadline = time.monotonic() + timeout
    while not _serving(qmp):
        if not running(pid):
            raise VmError(
                spec.name, f"QEMU exited during start-up: {log_tail(log) or '?'}"
            )
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            raise VmError(spec.name, f"QEMU did not start within {timeout:g} s")
        time.sleep(0.02)
    if kernel_spec.startswith("sim:"):
        from orchestrator.luo.sim import SimKernel

        SimKernel(Path(kernel_spec[4:])).join(pid)
    info = VmInfo(spec=spec, pid=pid, qmp=str(qmp), log=str(log), ram_fd=ram_fd)
    publish(registry, info)
    logger.info("VM %s: QEMU pid %d (incoming=%s)", spec.name, pid, incoming)
    return info


def publish(registry: Path, info: VmInfo) -> None:
    """Write ``REGISTRY/<name>.json`` atomically."""
    tmp = registry / f".{info.name}.json.tmp"
    tmp.write_text(json.dumps(info.to_json(), sort_keys=True))
    os.replace(tmp, registry / f"{info.name}.json")


def registered_vms(registry: Path) -> list[VmInfo]:
    """Every VM published in *registry*, by name."""
    return [
        VmInfo.from_json(json.loads(p.read_text()))
        for p in sorted(registry.glob("*.json"))
    ]


def find_ram_fd(info: VmInfo) -> int:
    """The fd number, inside QEMU, of the VM's guest-RAM memfd.

    Recorded at launch (:attr:`VmInfo.ram_fd`); for a VM published without
    it, the fd is looked for: a memfd reads ``/memfd:NAME (deleted)``, one
    restored after a kexec may have lost its name (``/ (deleted)``). Either
    way it is an unlinked regular file exactly as large as guest RAM.

    :raises VmError: no such fd, or more than one candidate.
    """
    base = f"/proc/{info.pid}/fd"
    if info.ram_fd is not None:
        return info.ram_fd
    try:
        names = os.listdir(base)
    except OSError as exc:
        raise VmError(info.name, f"cannot list {base}: {exc.strerror}") from exc
    found = []
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
            st = os.stat(f"{base}/{name}")
        except OSError:
            continue
        if (
            (target.startswith("/memfd:") or target.endswith(" (deleted)"))
            and stat.S_ISREG(st.st_mode)
            and st.st_nlink == 0
            and st.st_size == info.spec.ram_size
        ):
            found.append(int(name))
    if len(found) != 1:
        raise VmError(
            info.name,
            f"expected one guest-RAM memfd of {info.spec.ram_size} bytes in {base}, "
            f"found {len(found)}: is guest RAM a shared memfd backend?",
        )
    return found[0]


async def read_words(qmp: QmpClient, address: int, count: int = 1) -> list[int]:
    """*count* 32-bit words of guest physical memory at *address* (HMP ``xp``)."""
    out = await qmp.hmp(f"xp /{count}wx {address:#x}")
    words = [
        int(m, 16)
        for line in out.splitlines()
        if ":" in line
        for m in _XP_WORD.findall(line.split(":", 1)[1])
    ]
    if len(words) != count:
        raise QmpError(qmp.path, "human-monitor-command", f"bad xp output {out!r}")
    return words
