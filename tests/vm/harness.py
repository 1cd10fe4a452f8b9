"""Host side of the VM harness: boot the LUO test kernel in QEMU and run stages.

A :class:`Scenario` is a chain of :class:`Stage` s.  The first kernel boots into
``stages[0]``; a stage that ends with a kexec (see :mod:`tests.vm.kexec`) makes
the next kernel boot into the following stage (the harness prepares every
stage's kernel command line in advance, so the kexec helper never reuses the
old one).  The last stage's exit resets the VM and QEMU exits (``-no-reboot``).

The guest sees the host's ``/`` read-only over virtio-9p (so it runs this
checkout and the host's venv) and a writable 9p share, the scenario's *out
dir*, where the init and the stages write results (``status-<stage>.json``,
``boot-<n>.json``, ``marks.jsonl``, anything else); the serial console is saved
to ``<out>/serial.log`` with host timestamps.

To add a scenario::

    sc = Scenario.pre_post(
        "contract",
        pre=python_argv("-m", "pytest", "tests/kernel", "-k", "pre"),
        post=python_argv("-m", "pytest", "tests/kernel", "-k", "post"),
    )
    result = run_scenario(sc, ensure_kernel())
    assert result.ok, result.failures()

A stage that must cross the kexec calls :func:`tests.vm.kexec.kexec` (or
``python -m tests.vm.kexec``) as its last action.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.vm.guest import MARK_PREFIX

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from tests.vm.kernel import Kernel

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).resolve().with_name("guest_init.py")
ROOT_TAG = "hostroot"
OUT_TAG = "luo-out"
DEFAULT_OUT_BASE = REPO_ROOT / ".state" / "vm"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC_TAG = "luo-src"
#: Where the guest finds the kernel to kexec when its root is not the host's.
GUEST_OUT = "/run/luo-vm/out"
#: The scenario's disk in its out dir (:attr:`Scenario.disk_mib`).
DISK_IMAGE = "disk.img"


def venv_python() -> str:
    """The Python the guest should use: this interpreter, symlinks *not* resolved.

    Keeping the venv's ``bin/python`` path (not its target) keeps the venv active
    inside the guest.
    """
    return str(Path(sys.executable).absolute())


def python_argv(*args: str) -> tuple[str, ...]:
    """argv running the venv's Python inside the guest (cwd = repo root)."""
    return (venv_python(), *args)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Stage:
    """One command run inside the guest by the init (cwd = repo root)."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestRoot:
    """A root filesystem other than the host's ``/`` (see :mod:`tests.vm.rootfs`).

    The tree is shared read-only as the guest's root; the checkout is shared
    read-only too and mounted at ``src`` by the root's boot shim (the
    executable ``init``), which then runs ``exec_init`` -- the harness's
    Python init, or another PID 1 such as systemd.
    """

    #: Host path of the tree.
    path: Path
    #: Guest path of the venv's Python (runs the stages and the harness init).
    python: str
    #: Guest path where the checkout is mounted.
    src: str
    #: Guest path of the boot shim given to the kernel as ``init=``.
    init: str
    #: What the shim execs once the checkout is mounted: empty = the harness's
    #: init (``python -S <src>/tests/vm/guest_init.py``).
    exec_init: tuple[str, ...] = ()

    @property
    def venv(self) -> str:
        return str(Path(self.python).parent.parent)


@dataclass(frozen=True)
class Scenario:
    """A chain of stages; each but the last is expected to end in a kexec."""

    name: str
    stages: tuple[Stage, ...]
    memory: str = "3G"
    cpus: int = 1
    #: Overall wall-clock limit for QEMU (seconds).
    timeout: float = 600.0
    #: Extra kernel parameters (added to every kernel of the chain).
    kernel_args: tuple[str, ...] = ()
    #: The guest's root: None = the host's own ``/``.
    root: GuestRoot | None = None
    #: Size of an empty ext4 disk (``<out>/disk.img``, virtio-blk ``vda``) made
    #: for the run, 0 for none: a writable place that survives the kexecs of
    #: the chain (e.g. the upper layer of the sid root's overlay).
    disk_mib: int = 0
    #: TCP ports of the guest forwarded from the host's loopback, as
    #: (host port, guest port): empty = no NIC at all. With any, the guest
    #: gets a virtio-net NIC on QEMU's user network (guest 10.0.2.15, host
    #: 10.0.2.2), restricted: the guest reaches nothing outside it.
    forwards: tuple[tuple[int, int], ...] = ()

    @classmethod
    def pre_post(
        cls,
        name: str,
        pre: Sequence[str],
        post: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        memory: str = "3G",
        timeout: float = 600.0,
    ) -> Scenario:
        """The common shape: ``pre`` (ends in a kexec), then ``post``."""
        e = dict(env or {})
        return cls(
            name=name,
            stages=(Stage("pre", tuple(pre), e), Stage("post", tuple(post), e)),
            memory=memory,
            timeout=timeout,
        )


@dataclass(frozen=True)
class SerialLine:
    """One console line, stamped by the host when its first byte arrived."""

    #: Seconds since QEMU was started (host monotonic clock).
    t: float
    #: Host wall clock (time.time()) at the same instant.
    wall: float
    text: str
    source: str = "serial"  # or "qemu-stderr"

    def __str__(self) -> str:
        return f"[{self.t:9.3f}] {self.text}"


@dataclass(frozen=True)
class Mark:
    """A guest mark (see :func:`tests.vm.guest.mark`) as seen on the serial line."""

    boot: int
    name: str
    guest_wall: float
    line: SerialLine

    @property
    def t(self) -> float:
        return self.line.t

    @property
    def clock_offset(self) -> float:
        """host wall - guest wall when the line arrived (guest clock error + lag)."""
        return self.line.wall - self.guest_wall


@dataclass(frozen=True)
class StageStatus:
    name: str
    #: Exit status, None if the stage never returned to the init (kexec/crash).
    rc: int | None
    boot: int | None = None
    start_wall: float | None = None
    end_wall: float | None = None


@dataclass
class Result:
    scenario: Scenario
    kernel: Kernel
    out_dir: Path
    accel: str
    serial: list[SerialLine]
    statuses: dict[str, StageStatus]
    qemu_returncode: int | None
    timed_out: bool
    elapsed: float
    #: Stages that were entered (``stage.start`` mark seen), in boot order.
    started: list[str] = field(default_factory=list)

    # -------------------------------------------------------------- queries
    def lines(self, pattern: str | re.Pattern[str]) -> list[SerialLine]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [ln for ln in self.serial if rx.search(ln.text)]

    def kernel_lines(self, pattern: str | re.Pattern[str]) -> list[SerialLine]:
        """printk lines (``[ seconds] ...``) matching, excluding the harness marks."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [
            ln
            for ln in self.serial
            if _PRINTK.match(ln.text) and "luo-vm" not in ln.text and rx.search(ln.text)
        ]

    def marks(self) -> list[Mark]:
        out: list[Mark] = []
        for ln in self.serial:
            m = _MARK.search(ln.text)
            if m:
                out.append(Mark(int(m["boot"]), m["name"], float(m["wall"]), line=ln))
        return out

    def mark(self, name: str, boot: int | None = None) -> Mark | None:
        for mk in self.marks():
            if mk.name == name and (boot is None or mk.boot == boot):
                return mk
        return None

    def read_json(self, name: str) -> dict[str, object] | None:
        try:
            data = json.loads((self.out_dir / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def boots(self) -> int:
        return len(self.lines(r"Linux version \d"))

    # -------------------------------------------------------------- verdict
    def failures(self) -> list[str]:
        errs: list[str] = []
        if self.timed_out:
            errs.append(f"timeout after {self.scenario.timeout:.0f} s")
        names = [s.name for s in self.scenario.stages]
        for i, name in enumerate(names):
            last = i == len(names) - 1
            st = self.statuses.get(name)
            if name not in self.started:
                errs.append(f"stage {name!r} never started")
            elif last:
                if st is None or st.rc is None:
                    errs.append(f"stage {name!r} did not finish")
                elif st.rc != 0:
                    errs.append(f"stage {name!r} exited with {st.rc}")
            elif st is not None:
                errs.append(
                    f"stage {name!r} returned ({st.rc}) instead of kexec'ing "
                    f"into {names[i + 1]!r}"
                )
        if (self.out_dir / "init-error.txt").exists():
            errs.append("guest init crashed (see init-error.txt)")
        if self.lines(r"Kernel panic|BUG:|Oops|WARNING: CPU"):
            errs.append("kernel panic/BUG/WARNING on the console")
        return errs

    @property
    def ok(self) -> bool:
        return not self.failures()


_PRINTK = re.compile(r"^\[\s*\d+\.\d+\]")
_MARK = re.compile(
    re.escape(MARK_PREFIX)
    + r" boot=(?P<boot>\d+) name=(?P<name>\S+) wall=(?P<wall>[\d.]+)"
)


# --------------------------------------------------------------------------- accel

_accel_cache: str | None = None


def kvm_usable(kernel: Kernel, *, timeout: float = 20.0) -> tuple[bool, str]:
    """Whether KVM really boots a normal guest here.

    ``kvm_pvm`` (a PVM host module) is known not to: skip the probe.  Otherwise
    boot the kernel with ``-enable-kvm`` and no root, and wait for its banner.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    if Path("/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is PVM (kvm_pvm loaded): it does not boot normal guests"
    argv = [
        "qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host",
        "-nographic",
        "-no-reboot",
        "-m",
        "256M",
        "-vga",
        "none",
        "-nic",
        "none",
        "-kernel",
        str(kernel.bzimage),
        "-append",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 root=none",
    ]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        text = proc.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        raw = e.stdout
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else ""
    if "Linux version" in text:
        return True, "KVM probe booted the kernel"
    return False, "KVM probe did not boot the kernel within the timeout"


def choose_accel(kernel: Kernel) -> str:
    """``LUO_VM_ACCEL`` = tcg | kvm | auto (default: KVM only if proven to work)."""
    global _accel_cache
    want = os.environ.get("LUO_VM_ACCEL", "auto").lower()
    if want in ("tcg", "kvm"):
        return want
    if _accel_cache is None:
        ok, why = kvm_usable(kernel)
        _accel_cache = "kvm" if ok else "tcg"
        print(f"[vm] accelerator: {_accel_cache} ({why})", flush=True)
    return _accel_cache


# --------------------------------------------------------------------------- qemu


#: The kernel arguments of every scenario's kernels, the kexec'd ones too.
COMMON_KERNEL_ARGS = (
    "console=ttyS0,115200",
    "earlyprintk=serial,ttyS0,115200",
    "panic=-1",
    "liveupdate=on",
    "printk.devkmsg=on",
    # ACPI for its tables (the HPET and PM timer the TSC is calibrated
    # against), not for PCI interrupt routing: with ACPI's link devices a
    # kexec'd kernel took 7.0 s instead of 2.7 s to reach init, and the
    # floor's post stage 15.2 s instead of 7.7 s to start (9p is slower).
    "acpi=noirq",
    f"root={ROOT_TAG}",
    "rootfstype=9p",
    "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose",
    "ro",
)


def base_kernel_args(scenario: Scenario) -> list[str]:
    root = scenario.root
    if root is not None:
        shim = ["luovm.exec=" + ",".join(root.exec_init)] if root.exec_init else []
        return [
            *COMMON_KERNEL_ARGS,
            f"init={root.init}",
            f"luovm.out={OUT_TAG}",
            f"luovm.src={SRC_TAG}",
            *shim,
            *scenario.kernel_args,
        ]
    return [
        *COMMON_KERNEL_ARGS,
        f"init={venv_python()}",
        f"luovm.out={OUT_TAG}",
        *scenario.kernel_args,
    ]


def kernel_cmdline(scenario: Scenario, stage: str) -> str:
    """The full command line of a kernel that runs ``stage`` ("" = power off)."""
    words = [*base_kernel_args(scenario), f"luovm.stage={stage or '-'}"]
    if scenario.root is None:
        # init = the venv's python; "-S": the init needs no site-packages and
        # every file Python reads at startup is a 9p round trip under TCG.
        words += ["--", "-S", str(GUEST_INIT)]
    line = " ".join(words)
    if len(line) >= 2048:
        raise ValueError(f"kernel command line too long ({len(line)} bytes)")
    return line


def nic_args(forwards: Sequence[tuple[int, int]]) -> list[str]:
    """QEMU's NIC arguments: none, or user networking with *forwards*.

    Each forward listens on the host's loopback only; ``restrict=on`` keeps
    the guest from opening connections of its own (to the host or beyond):
    it only answers the forwarded ones.
    """
    if not forwards:
        return ["-nic", "none"]
    rules = ",".join(
        f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in forwards
    )
    return [
        "-netdev",
        f"user,id=net0,restrict=on,{rules}",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def qemu_argv(
    scenario: Scenario, kernel: Kernel, out_dir: Path, accel: str
) -> list[str]:
    root = scenario.root
    root_path = str(root.path) if root is not None else "/"
    argv = [
        "qemu-system-x86_64",
        "-nographic",
        "-no-reboot",
        "-vga",
        "none",
        *nic_args(scenario.forwards),
        "-m",
        scenario.memory,
        "-smp",
        str(scenario.cpus),
        "-kernel",
        str(kernel.bzimage),
        "-append",
        kernel_cmdline(scenario, scenario.stages[0].name),
        "-fsdev",
        f"local,id=fsroot,path={root_path},security_model=none,readonly=on,"
        "multidevs=remap",
        "-device",
        f"virtio-9p-pci,fsdev=fsroot,mount_tag={ROOT_TAG}",
        "-fsdev",
        f"local,id=fsout,path={out_dir},security_model=none",
        "-device",
        f"virtio-9p-pci,fsdev=fsout,mount_tag={OUT_TAG}",
    ]
    if root is not None:
        argv += [
            "-fsdev",
            f"local,id=fssrc,path={REPO_ROOT},security_model=none,readonly=on,"
            "multidevs=remap",
            "-device",
            f"virtio-9p-pci,fsdev=fssrc,mount_tag={SRC_TAG}",
        ]
    if scenario.disk_mib:
        argv += ["-drive", f"file={out_dir / DISK_IMAGE},format=raw,if=virtio"]
    if accel == "kvm":
        argv += ["-enable-kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg", "-cpu", "max"]
    return argv


def _write_spec(scenario: Scenario, kernel: Kernel, out_dir: Path) -> None:
    names = [s.name for s in scenario.stages]
    stages = []
    for i, s in enumerate(scenario.stages):
        nxt = names[i + 1] if i + 1 < len(names) else None
        stages.append(
            {"name": s.name, "argv": list(s.argv), "env": dict(s.env), "next": nxt}
        )
    root = scenario.root
    if root is None:
        venv, cwd, image = (
            str(Path(venv_python()).parent.parent),
            str(REPO_ROOT),
            str(kernel.bzimage),
        )
    else:
        # The host's files are out of the guest's sight: the kernel to kexec
        # travels in the out share.
        shutil.copy2(kernel.bzimage, out_dir / "bzImage")
        venv, cwd, image = root.venv, root.src, f"{GUEST_OUT}/bzImage"
    spec = {
        "scenario": scenario.name,
        "cwd": cwd,
        "venv": venv,
        "path": f"{venv}/bin:{SYSTEM_PATH}",
        "kernel": image,
        "stages": stages,
        "cmdlines": {n: kernel_cmdline(scenario, n) for n in [*names, ""]},
    }
    (out_dir / "stages.json").write_text(json.dumps(spec, indent=2) + "\n")


def make_disk(path: Path, mib: int) -> None:
    """An empty ext4 file system of *mib* MiB in a sparse file at *path*."""
    with path.open("wb") as f:
        f.truncate(mib << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "luo-vm", str(path)],
        check=True,
        capture_output=True,
    )


def new_out_dir(scenario: Scenario, base: Path | None = None) -> Path:
    base = base or Path(os.environ.get("LUO_VM_OUT_BASE", str(DEFAULT_OUT_BASE)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = base / f"{scenario.name}-{stamp}"
    n = 1
    while d.exists():
        n += 1
        d = base / f"{scenario.name}-{stamp}-{n}"
    d.mkdir(parents=True)
    return d


def _read_lines(
    proc: subprocess.Popen[bytes], start: float, deadline: float
) -> Iterator[SerialLine | None]:
    """Yield console lines as they complete (None once per idle tick)."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    bufs: dict[str, bytearray] = {"serial": bytearray(), "qemu-stderr": bytearray()}
    first: dict[str, tuple[float, float] | None] = {"serial": None, "qemu-stderr": None}
    sel.register(proc.stdout, selectors.EVENT_READ, "serial")
    sel.register(proc.stderr, selectors.EVENT_READ, "qemu-stderr")
    try:
        yield from _pump(sel, bufs, first, start, deadline)
    finally:
        sel.close()


def _pump(
    sel: selectors.BaseSelector,
    bufs: dict[str, bytearray],
    first: dict[str, tuple[float, float] | None],
    start: float,
    deadline: float,
) -> Iterator[SerialLine | None]:
    open_streams = 2
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        events = sel.select(timeout=min(remaining, 1.0))
        if not events:
            yield None
            continue
        for key, _ in events:
            src = str(key.data)
            chunk = os.read(key.fd, 65536)
            now = (time.monotonic() - start, time.time())
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                if bufs[src]:
                    stamp = first[src] or now
                    yield SerialLine(stamp[0], stamp[1], _clean(bufs[src]), src)
                    bufs[src].clear()
                continue
            buf = bufs[src]
            for piece in chunk.splitlines(keepends=True):
                if not buf:
                    first[src] = now
                buf += piece
                if buf.endswith(b"\n"):
                    stamp = first[src] or now
                    yield SerialLine(stamp[0], stamp[1], _clean(buf), src)
                    buf.clear()
                    first[src] = None


def _clean(raw: bytes | bytearray) -> str:
    return raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")


def run_scenario(
    scenario: Scenario,
    kernel: Kernel,
    *,
    out_dir: Path | None = None,
    echo: bool = True,
    accel: str | None = None,
) -> Result:
    """Boot ``kernel`` and run the scenario's stages; never raises on guest failure."""
    out_dir = out_dir or new_out_dir(scenario)
    out_dir.mkdir(parents=True, exist_ok=True)
    accel = accel or choose_accel(kernel)
    _write_spec(scenario, kernel, out_dir)
    if scenario.disk_mib:
        make_disk(out_dir / DISK_IMAGE, scenario.disk_mib)
    argv = qemu_argv(scenario, kernel, out_dir, accel)
    (out_dir / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")
    print(f"[vm] scenario {scenario.name!r}: out dir {out_dir}", flush=True)
    print(f"[vm] {shlex.join(argv)}", flush=True)

    serial: list[SerialLine] = []
    start = time.monotonic()
    start_wall = time.time()
    deadline = start + scenario.timeout
    timed_out = False
    log_path = out_dir / "serial.log"
    with log_path.open("w") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start_wall))
        log.write(
            f"# qemu started at {stamp} (wall {start_wall:.6f}); "
            "columns: host wall clock, seconds since QEMU start, line\n"
        )
        with subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                for item in _read_lines(proc, start, deadline):
                    if item is None:
                        continue
                    serial.append(item)
                    prefix = "" if item.source == "serial" else "qemu: "
                    log.write(f"{item.wall:.6f} {item.t:9.3f} {prefix}{item.text}\n")
                    log.flush()
                    if echo:
                        print(f"[{item.t:8.3f}] {prefix}{item.text}", flush=True)
                if proc.poll() is None:
                    try:
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                if proc.poll() is None:
                    timed_out = True
                    print(f"[vm] TIMEOUT after {scenario.timeout:.0f} s: killing QEMU")
            finally:
                if proc.poll() is None:
                    proc.kill()
    elapsed = time.monotonic() - start

    statuses: dict[str, StageStatus] = {}
    for s in scenario.stages:
        try:
            data = json.loads((out_dir / f"status-{s.name}.json").read_text())
        except (OSError, ValueError):
            continue
        statuses[s.name] = StageStatus(
            s.name,
            int(data["rc"]) if data.get("rc") is not None else None,
            data.get("boot"),
            data.get("start_wall"),
            data.get("end_wall"),
        )
    result = Result(
        scenario=scenario,
        kernel=kernel,
        out_dir=out_dir,
        accel=accel,
        serial=serial,
        statuses=statuses,
        qemu_returncode=proc.returncode,
        timed_out=timed_out,
        elapsed=elapsed,
    )
    result.started = _started_stages(out_dir)
    return result


def _started_stages(out_dir: Path) -> list[str]:
    started: list[str] = []
    try:
        text = (out_dir / "marks.jsonl").read_text()
    except OSError:
        return started
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("name") == "stage.start":
            started.append(str(rec.get("stage")))
    return started
