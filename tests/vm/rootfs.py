"""The modern guest root: Debian sid (systemd, QEMU, Python 3.14), built and cached.

The default guest root is the host's own ``/`` (Debian 12: Python 3.11, QEMU
7.2, no init system). This module builds a second one with ``debootstrap
--variant=minbase`` of Debian's unstable suite, into
``${XDG_CACHE_HOME:-~/.cache}/luo-orchestrator/rootfs/<key>/root``, where
``<key>`` hashes everything that decides its content (suite, package list, the
project's ``pyproject.toml``). The tree is built under ``<key>.tmp`` and
renamed into place only once complete, as the kernel cache does.

Inside it, ``/opt/luo-orchestrator/venv`` is a venv of the guest's own Python
with the project's dependencies (from PyPI) and the project itself installed
editable from ``/opt/luo-orchestrator/src``: that directory is empty in the
tree; the harness mounts the checkout there over 9p, so the guest runs the
checkout's code without a rebuild (only a change of ``pyproject.toml`` -- its
dependencies or entry points -- makes a new root).

Nothing from sid is installed on the host: debootstrap writes into the cache
directory only, and the venv is made by ``chroot`` with the guest's Python.

``python -m tests.vm.rootfs`` builds or locates it and prints its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.vm.harness import GuestRoot
from tests.vm.kernel import DEBIAN_KEYRING, cache_root, system_mirror

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "sid"
#: What the guest needs beyond minbase: systemd as PID 1, QEMU for nested VMs,
#: Python for the project, kexec-tools for ``systemctl kexec``, and the
#: debootstrap-free basics a service host has.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "qemu-system-x86",
    "python3",
    "python3-venv",
    "kexec-tools",
    "openssh-server",
    "procps",
    "iproute2",
)
#: Where the project lives in the guest: venv, and the checkout's mount point.
GUEST_PREFIX = "/opt/luo-orchestrator"
GUEST_VENV = f"{GUEST_PREFIX}/venv"
GUEST_SRC = f"{GUEST_PREFIX}/src"
GUEST_PYTHON = f"{GUEST_VENV}/bin/python"
#: The kernel's ``init=``: mounts the checkout, then execs the real PID 1.
GUEST_SHIM = f"{GUEST_PREFIX}/init"
#: The shim, POSIX sh (dash). The root is read-only: it mounts /proc (to read
#: the command line) and the checkout's 9p share (``luovm.src=TAG``) over the
#: empty GUEST_SRC, then execs ``luovm.exec=`` (comma-separated argv, e.g.
#: ``/lib/systemd/systemd``) or, by default, the harness's Python init.
#: With ``luovm.overlay=DEV`` (an ext4 disk, e.g. ``vda``) the root becomes an
#: overlay first: the read-only tree below, ``upper/`` of DEV above (what the
#: guest writes: /etc, /var, ... -- on a disk, so it survives a kexec, which a
#: tmpfs does not), mounted on ``/mnt/root`` with DEV on ``/mnt``; the checkout
#: is mounted inside it, and it becomes ``/`` (``mount --move``, ``chroot``) for
#: ``luovm.exec=``.
SHIM_TEXT = f"""#!/bin/sh
# The kernel opened no console for init (its rootfs has no /dev/console):
# devtmpfs on the real root has one, so what the shim says is seen.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc -o nosuid,nodev,noexec proc /proc
src=luo-src
exe=
overlay=
for w in $(cat /proc/cmdline); do
  case "$w" in
    --) break ;;
    luovm.src=*) src=${{w#luovm.src=}} ;;
    luovm.exec=*) exe=${{w#luovm.exec=}} ;;
    luovm.overlay=*) overlay=${{w#luovm.overlay=}} ;;
  esac
done
new=
if [ -n "$overlay" ]; then
  new=/mnt/root
  n=0
  until mount -t ext4 "/dev/$overlay" /mnt || [ $n -ge 20 ]; do
    n=$((n + 1))
    echo "luo-vm-shim: cannot mount /dev/$overlay yet (try $n): $(ls -l /dev/$overlay 2>&1)"
    sleep 0.5
  done
  mountpoint -q /mnt &&
    mkdir -p /mnt/upper /mnt/work $new &&
    mount -t overlay overlay -o lowerdir=/,upperdir=/mnt/upper,workdir=/mnt/work $new ||
    echo "luo-vm-shim: cannot make the overlay root on /dev/$overlay" >/dev/console
fi
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144 "$src" $new{GUEST_SRC} ||
  echo "luo-vm-shim: cannot mount $src on $new{GUEST_SRC}" >/dev/console
if [ -n "$new" ]; then
  # switch_root's steps (util-linux's switch_root is not in minbase)
  for m in /dev /proc; do mount --move $m $new$m; done
  cd $new
  mount --move . /
  IFS=,
  set -- $exe
  unset IFS
  exec chroot . "$@"
fi
if [ -n "$exe" ]; then
  IFS=,
  set -- $exe
  unset IFS
  exec "$@"
fi
exec {GUEST_PYTHON} -S {GUEST_SRC}/tests/vm/guest_init.py
"""
#: The harness's stage runner when systemd is PID 1 (kernel argument
#: ``systemd.wants=luo-vm-stage.service``, not enabled in the tree): the
#: harness's init in service mode, started once the project's units are up.
STAGE_UNIT = "/etc/systemd/system/luo-vm-stage.service"
STAGE_UNIT_TEXT = f"""[Unit]
Description=VM harness: this boot's stage (tests/vm)
After=liveupdate-resume.service liveupdate-agent.service

[Service]
Type=exec
ExecStart={GUEST_PYTHON} -S {GUEST_SRC}/tests/vm/guest_init.py --service
StandardOutput=journal+console
StandardError=journal+console
"""
#: Test tools the guest stages use besides the project's own dependencies.
EXTRA_PYTHON = ("pytest>=8.3", "pytest-timeout>=2.3")
#: The project's build backend and what it asks for an editable install.
BUILD_REQUIREMENTS = ("hatchling>=1.24", "editables~=0.3")
#: Written into the tree once debootstrap has succeeded: a build that failed
#: later (installing the project) starts again from there.
DEBOOTSTRAPPED = ".luo-debootstrapped"


class RootfsBuildError(RuntimeError):
    """The guest root could not be built."""


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A built guest root tree and what it holds."""

    path: Path
    key: str
    #: True when this call built it, False when it came from the cache.
    built: bool
    build_seconds: float | None
    #: Versions found in the tree (``python``, ``systemd``, ``qemu``...).
    versions: dict[str, str]

    def guest_root(self, exec_init: tuple[str, ...] = ()) -> GuestRoot:
        """This tree as a harness root; *exec_init*: PID 1 (default: harness init)."""
        return GuestRoot(
            self.path, GUEST_PYTHON, GUEST_SRC, GUEST_SHIM, tuple(exec_init)
        )


def _say(msg: str) -> None:
    print(f"[rootfs] {msg}", flush=True)


def python_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The project's runtime dependencies plus the test tools, as pip specs."""
    data = tomllib.loads(pyproject.read_text())
    deps = [str(d) for d in data["project"]["dependencies"]]
    return [*deps, *EXTRA_PYTHON]


def cache_key(
    packages: Sequence[str] = PACKAGES,
    pyproject: Path = REPO_ROOT / "pyproject.toml",
) -> str:
    """A digest of what decides the tree: suite, packages, ``pyproject.toml``."""
    h = hashlib.sha256()
    h.update(f"{SUITE}\n".encode())
    h.update("\n".join(sorted(packages)).encode() + b"\n")
    h.update(pyproject.read_bytes())
    return f"{SUITE}-{h.hexdigest()[:12]}"


def _run(
    argv: Sequence[str], *, log: Callable[[str], None] = _say, quiet: bool = True
) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RootfsBuildError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{tail}"
        )
    if not quiet:
        for line in proc.stdout.strip().splitlines()[-3:]:
            log(f"  {line}")
    return proc.stdout


def _chroot(root: Path, *argv: str) -> str:
    env_argv = [
        "chroot",
        str(root),
        "/usr/bin/env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        *argv,
    ]
    return _run(env_argv)


def install_shim(root: Path) -> None:
    """Write the boot shim and the stage unit into the tree unless they are there.

    Not part of the cache key: both belong to the harness, and a changed one
    is written into the cached tree in place (same content, same result).
    """
    for guest_path, text, mode in (
        (GUEST_SHIM, SHIM_TEXT, 0o755),
        (STAGE_UNIT, STAGE_UNIT_TEXT, 0o644),
    ):
        path = root / guest_path.lstrip("/")
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.rename(path)


def precompile(rootfs: Rootfs, log: Callable[[str], None] = _say) -> None:
    """Write the checkout's bytecode for the *guest's* Python, on the host.

    The guest sees the checkout read-only and does not write bytecode: without
    this, its Python compiles every module it imports at every start (the host
    only writes its own version's ``.pyc``; see ``tests.vm.e2e.precompile``).
    Runs the tree's Python in a ``chroot`` with the checkout bind-mounted
    where the guest mounts it; needs root, and is skipped without.
    """
    if os.geteuid() != 0:
        log("not root: the guest's Python will compile the checkout at each start")
        return
    src = rootfs.path / GUEST_SRC.lstrip("/")
    _bind(str(REPO_ROOT), src)
    try:
        _chroot(
            rootfs.path,
            GUEST_PYTHON,
            "-m",
            "compileall",
            "-q",
            *(f"{GUEST_SRC}/{sub}" for sub in ("orchestrator", "plugins", "tests")),
        )
    finally:
        _umount(src)


def find_cached_rootfs(key: str | None = None) -> Rootfs | None:
    """The cached tree for *key* (default: the current :func:`cache_key`)."""
    key = key or cache_key()
    d = cache_root() / "rootfs" / key
    if not (d / "root" / GUEST_PYTHON.lstrip("/")).exists():
        return None
    return _rootfs_from_dir(d, built=False)


def _rootfs_from_dir(d: Path, *, built: bool) -> Rootfs:
    try:
        meta = json.loads((d / "rootfs.json").read_text())
    except (OSError, ValueError):
        meta = {}
    secs = meta.get("build_seconds")
    versions = meta.get("versions")
    return Rootfs(
        path=d / "root",
        key=d.name,
        built=built,
        build_seconds=float(secs) if isinstance(secs, int | float) else None,
        versions=dict(versions) if isinstance(versions, dict) else {},
    )


def _versions(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for name in ("systemd", "qemu-system-x86", "kexec-tools", "libc6", "python3"):
        m = re.search(
            rf"^Package: {re.escape(name)}\n(?:[^\n]+\n)*?Version: (\S+)", status, re.M
        )
        if m:
            out[name] = m.group(1)
    out["python"] = _chroot(root, GUEST_PYTHON, "-c", "import sys; print(sys.version)")
    out["python"] = out["python"].split()[0]
    return out


def _bind(src: str, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    _run(["mount", "--bind", src, str(dst)])


def _umount(dst: Path) -> None:
    subprocess.run(["umount", "-l", str(dst)], capture_output=True, check=False)


def _guest_python_tag(root: Path) -> str:
    """``3.14`` for a tree whose ``python3`` is 3.14 (read from its stdlib dirs)."""
    found = sorted(
        (int(m.group(1)), int(m.group(2)))
        for d in (root / "usr" / "lib").iterdir()
        if (m := re.fullmatch(r"python(\d+)\.(\d+)", d.name))
        and (d / "os.py").is_file()
    )
    if not found:
        raise RootfsBuildError(f"no Python standard library under {root}/usr/lib")
    major, minor = found[-1]
    return f"{major}.{minor}"


def download_wheels(dest: Path, python: str, log: Callable[[str], None]) -> None:
    """The guest's wheels, fetched by the *host's* pip (its index, CA, proxy).

    The guest needs no network nor certificates: binary wheels for the guest's
    CPython (``--python-version``/``--abi``/``--platform``), pure ones for the
    rest, and hatchling for the project's editable install.
    """
    tag = python.replace(".", "")
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "-d",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{tag}",
        *(
            a
            for plat in (
                "manylinux_2_28_x86_64",
                "manylinux_2_17_x86_64",
                "manylinux2014_x86_64",
                "any",
            )
            for a in ("--platform", plat)
        ),
        *python_requirements(),
        *BUILD_REQUIREMENTS,
    ]
    log(f"pip download for CPython {python}: {' '.join(python_requirements())}")
    _run(argv)


def _install_project(root: Path, log: Callable[[str], None]) -> None:
    """venv with the guest Python, dependencies from wheels, project editable."""
    wheels = root / "tmp" / "luo-wheels"
    download_wheels(wheels, _guest_python_tag(root), log)
    src = root / GUEST_SRC.lstrip("/")
    mounts = [root / "proc", root / "dev", src]
    _bind("/proc", root / "proc")
    _bind("/dev", root / "dev")
    _bind(str(REPO_ROOT), src)
    try:
        log(f"venv {GUEST_VENV} (guest Python)")
        _chroot(root, "python3", "-m", "venv", GUEST_VENV)
        pip = [
            f"{GUEST_VENV}/bin/pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-index",
            "--find-links",
            "/tmp/luo-wheels",
        ]
        _chroot(root, *pip, *python_requirements())
        log(f"pip install --no-deps -e {GUEST_SRC}")
        _chroot(root, *pip, "--no-deps", "-e", GUEST_SRC)
    finally:
        for m in reversed(mounts):
            _umount(m)
        shutil.rmtree(wheels, ignore_errors=True)


def build_rootfs(
    *, key: str | None = None, log: Callable[[str], None] = _say
) -> Rootfs:
    """debootstrap sid into ``<key>.tmp``, install the project, rename to ``<key>``."""
    if os.geteuid() != 0:
        raise RootfsBuildError("building the guest root needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        raise RootfsBuildError(
            "debootstrap is missing; install it with: apt-get install debootstrap"
        )
    key = key or cache_key()
    dest = cache_root() / "rootfs" / key
    tmp = dest.with_name(dest.name + ".tmp")
    root = tmp / "root"
    done = root / DEBOOTSTRAPPED
    if tmp.exists() and not done.exists():
        shutil.rmtree(tmp)
    root.mkdir(parents=True, exist_ok=True)
    mirror = system_mirror()
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        "--components=main",
    ]
    if DEBIAN_KEYRING.exists():
        argv.append(f"--keyring={DEBIAN_KEYRING}")
    argv += [SUITE, str(tmp / "root"), mirror]
    start = time.monotonic()
    if done.exists():
        log(f"reusing the debootstrapped tree of an earlier build: {root}")
    else:
        log(f"{' '.join(argv)}")
        _run(argv)
        done.touch()
    t_boot = time.monotonic() - start
    log(f"debootstrap done in {t_boot:.0f} s")
    # The archive served here is a frozen snapshot past its Valid-Until date.
    (root / "etc/apt/apt.conf.d/99luo-no-expiry").write_text(
        'Acquire::Check-Valid-Until "false";\n'
    )
    _install_project(root, log)
    install_shim(root)
    seconds = time.monotonic() - start
    versions = _versions(root)
    (tmp / "rootfs.json").write_text(
        json.dumps(
            {
                "suite": SUITE,
                "mirror": mirror,
                "packages": list(PACKAGES),
                "python_requirements": python_requirements(),
                "debootstrap_seconds": round(t_boot, 1),
                "build_seconds": round(seconds, 1),
                "versions": versions,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log(f"cached: {dest / 'root'} ({seconds:.0f} s; {versions})")
    return _rootfs_from_dir(dest, built=True)


def ensure_rootfs(*, log: Callable[[str], None] = _say) -> Rootfs:
    """The cached guest root for the current package list, built if missing.

    ``LUO_VM_ROOTFS=/path/to/root`` uses that tree as it is.
    """
    override = os.environ.get("LUO_VM_ROOTFS")
    if override:
        path = Path(override).resolve()
        if not (path / GUEST_PYTHON.lstrip("/")).exists():
            raise RootfsBuildError(f"LUO_VM_ROOTFS={override} has no {GUEST_PYTHON}")
        install_shim(path)
        return Rootfs(path, "custom", built=False, build_seconds=None, versions={})
    cached = find_cached_rootfs()
    if cached is not None:
        log(f"cached root {cached.key}: {cached.path}")
        install_shim(cached.path)
        return cached
    return build_rootfs(log=log)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build or locate the sid guest root")
    p.parse_args(argv)
    try:
        r = ensure_rootfs()
    except RootfsBuildError as e:
        print(f"[rootfs] ERROR: {e}", flush=True)
        return 1
    print(r.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
