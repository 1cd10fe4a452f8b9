"""Build (or find in the cache) the LUO test kernel for the VM harness.

The kernel is Debian sid's ``linux-source-7.2`` built from ``make tinyconfig`` plus
the fragment ``deploy/vm/luo.config``.  The source package is fetched with a
*private* apt configuration in download-only mode: nothing from sid is ever
installed into the system.  Results are cached under
``${XDG_CACHE_HOME:-~/.cache}/luo-orchestrator/``::

    apt/                          private apt state (sources.list, lists, archives)
    src/<deb-version>/linux-source-7.2/   unpacked kernel source (read-only use)
    build/<deb-version>-<frag12>/ out-of-tree object directory (O=...)
    kernel/<deb-version>-<frag12>/bzImage, config, build.json   the result

``<frag12>`` is the first 12 hex digits of the fragment's sha256, so editing the
fragment triggers a rebuild, while an unchanged fragment reuses the cached kernel
without touching the network (unless ``refresh=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAGMENT = REPO_ROOT / "deploy" / "vm" / "luo.config"
SOURCE_PACKAGE = "linux-source-7.2"
SUITE = "sid"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: Build dependencies (command -> Debian bookworm package providing it).
BUILD_TOOLS: dict[str, str] = {
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "perl": "perl",
    "lz4": "lz4",
    "xz": "xz-utils",
    "cpio": "cpio",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
}
BUILD_HEADERS: dict[str, str] = {
    "/usr/include/gelf.h": "libelf-dev",
    "/usr/include/openssl/ssl.h": "libssl-dev",
}


class KernelBuildError(RuntimeError):
    """The kernel could not be fetched, configured or built."""


@dataclass(frozen=True)
class Kernel:
    """A bootable LUO test kernel."""

    bzimage: Path
    config: Path
    source_version: str
    key: str
    #: True when this call built it, False when it came from the cache.
    built: bool = False
    #: Seconds spent in ``make bzImage`` (from build.json when cached).
    build_seconds: float | None = None


@dataclass(frozen=True)
class SourceTree:
    version: str
    path: Path


def _say(msg: str) -> None:
    print(f"[kernel] {msg}", flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "luo-orchestrator"


def fragment_digest(fragment: Path = FRAGMENT) -> str:
    return hashlib.sha256(fragment.read_bytes()).hexdigest()[:12]


def required_options(fragment: Path = FRAGMENT) -> list[str]:
    """The ``CONFIG_X=y`` lines of the fragment (in file order)."""
    out: list[str] = []
    for raw in fragment.read_text().splitlines():
        line = raw.strip()
        if re.fullmatch(r"CONFIG_[A-Za-z0-9_]+=y", line):
            out.append(line)
    return out


def disabled_options(fragment: Path = FRAGMENT) -> list[str]:
    """The ``CONFIG_X`` names of the fragment's ``# CONFIG_X is not set`` lines."""
    out: list[str] = []
    for raw in fragment.read_text().splitlines():
        m = re.fullmatch(r"#\s*(CONFIG_[A-Za-z0-9_]+) is not set", raw.strip())
        if m:
            out.append(m.group(1))
    return out


def missing_options(config: Path, fragment: Path = FRAGMENT) -> list[str]:
    """Fragment lines that ``.config`` does not honour.

    Every ``CONFIG_X=y`` line must be in ``.config``; every ``# CONFIG_X is not
    set`` line must not have become ``=y``/``=m`` (reported as ``CONFIG_X=n``).
    """
    lines = config.read_text().splitlines()
    have = set(lines)
    missing = [opt for opt in required_options(fragment) if opt not in have]
    enabled = {ln.split("=", 1)[0] for ln in lines if re.match(r"CONFIG_\w+=[ym]$", ln)}
    missing += [f"{name}=n" for name in disabled_options(fragment) if name in enabled]
    return missing


# --------------------------------------------------------------------------- cache


def _read_build_json(d: Path) -> dict[str, object]:
    try:
        data = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kernel_from_dir(d: Path, *, built: bool = False) -> Kernel:
    meta = _read_build_json(d)
    secs = meta.get("build_seconds")
    version = meta.get("source_version")
    return Kernel(
        bzimage=d / "bzImage",
        config=d / "config",
        source_version=str(version) if version else d.name.rsplit("-", 1)[0],
        key=d.name,
        built=built,
        build_seconds=float(secs) if isinstance(secs, int | float) else None,
    )


def find_cached_kernel(fragment: Path = FRAGMENT) -> Kernel | None:
    """The newest cached kernel built from this exact fragment, if any."""
    digest = fragment_digest(fragment)
    kdir = cache_root() / "kernel"
    if not kdir.is_dir():
        return None
    hits = [
        d
        for d in kdir.iterdir()
        if d.name.endswith("-" + digest) and (d / "bzImage").is_file()
    ]
    if not hits:
        return None
    best = max(hits, key=lambda d: (d / "bzImage").stat().st_mtime)
    return _kernel_from_dir(best)


# --------------------------------------------------------------------------- tools


def check_build_tools(*, install: bool = True) -> None:
    """Make sure the (bookworm) build dependencies are there.

    Missing ones are installed with apt-get when running as root and
    ``LUO_VM_NO_APT`` is unset; otherwise this raises with the package list.
    """
    pkgs = {pkg for cmd, pkg in BUILD_TOOLS.items() if shutil.which(cmd) is None}
    pkgs |= {pkg for hdr, pkg in BUILD_HEADERS.items() if not Path(hdr).exists()}
    if not pkgs:
        return
    names = sorted(pkgs)
    if not install or os.geteuid() != 0 or os.environ.get("LUO_VM_NO_APT"):
        raise KernelBuildError(
            "missing build dependencies; install them with: apt-get install "
            + " ".join(names)
        )
    _say(f"installing build dependencies: {' '.join(names)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", *names], env=env)


def _run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> str:
    proc = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise KernelBuildError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{tail}"
        )
    if not quiet and proc.stdout.strip():
        for line in proc.stdout.strip().splitlines()[-3:]:
            _say(f"  {line}")
    return proc.stdout


# --------------------------------------------------------------------------- apt


def system_mirror() -> str:
    """The Debian mirror this machine's apt uses (``deb.debian.org`` if none)."""
    files = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(
            r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M
        ):
            uri = m.group(1).rstrip("/")
            if uri.endswith("/debian") and "security" not in uri:
                return uri
    return DEFAULT_MIRROR


def _apt_options(apt_dir: Path) -> list[str]:
    return [
        "-o",
        f"Dir::Etc::SourceList={apt_dir / 'etc' / 'sources.list'}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o",
        f"Dir::Cache={apt_dir}",
        "-o",
        f"Dir::Cache::archives={apt_dir / 'archives'}",
        "-o",
        f"Dir::Cache::pkgcache={apt_dir / 'pkgcache.bin'}",
        "-o",
        f"Dir::Cache::srcpkgcache={apt_dir / 'srcpkgcache.bin'}",
        "-o",
        "APT::Sandbox::User=root",
        "-o",
        "Debug::NoLocking=1",
    ]


def fetch_source(*, log: Callable[[str], None] = _say) -> SourceTree:
    """Download ``linux-source-7.2`` from sid (download only) and unpack it."""
    root = cache_root()
    apt_dir = root / "apt"
    for sub in ("etc", "lists/partial", "archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    mirror = system_mirror()
    signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
    (apt_dir / "etc" / "sources.list").write_text(
        f"deb {signed}{mirror} {SUITE} main\n"
    )
    opts = _apt_options(apt_dir)
    log(f"apt-get update (private config, {mirror} {SUITE})")
    _run(["apt-get", *opts, "update", "-q"], quiet=True)
    policy = _run(["apt-cache", *opts, "policy", SOURCE_PACKAGE], quiet=True)
    m = re.search(r"Candidate:\s*(\S+)", policy)
    if not m or m.group(1) == "(none)":
        raise KernelBuildError(f"{SOURCE_PACKAGE} not found in {SUITE}:\n{policy}")
    version = m.group(1)
    src_dir = root / "src" / version
    tree = src_dir / SOURCE_PACKAGE
    if (tree / "Makefile").is_file() and (src_dir / ".unpacked").exists():
        log(f"source {SOURCE_PACKAGE} {version} already unpacked at {tree}")
        return SourceTree(version, tree)
    archives = apt_dir / "archives"
    deb = archives / f"{SOURCE_PACKAGE}_{version.split(':')[-1]}_all.deb"
    if not deb.is_file():
        log(f"apt-get download {SOURCE_PACKAGE}={version}")
        _run(
            ["apt-get", *opts, "download", f"{SOURCE_PACKAGE}={version}"],
            cwd=archives,
            quiet=True,
        )
    if not deb.is_file():
        raise KernelBuildError(f"download did not produce {deb}")
    log(f"unpacking {deb.name}")
    if src_dir.exists():
        shutil.rmtree(src_dir)
    (src_dir / "deb").mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(src_dir / "deb")])
    tarballs = list((src_dir / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise KernelBuildError(f"expected one source tarball in {deb}, {tarballs}")
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(src_dir)])
    shutil.rmtree(src_dir / "deb")
    if not (tree / "Makefile").is_file():
        raise KernelBuildError(f"unexpected source layout under {src_dir}")
    (src_dir / ".unpacked").touch()
    return SourceTree(version, tree)


def find_unpacked_source() -> SourceTree | None:
    """The newest already-unpacked source tree (no network)."""
    src = cache_root() / "src"
    if not src.is_dir():
        return None
    trees = [
        SourceTree(d.name, d / SOURCE_PACKAGE)
        for d in src.iterdir()
        if (d / ".unpacked").exists() and (d / SOURCE_PACKAGE / "Makefile").is_file()
    ]
    if not trees:
        return None
    return max(trees, key=lambda t: (t.path / "Makefile").stat().st_mtime)


# --------------------------------------------------------------------------- build


def build_kernel(
    source: SourceTree,
    *,
    fragment: Path = FRAGMENT,
    jobs: int | None = None,
    log: Callable[[str], None] = _say,
    poll_seconds: float = 30.0,
) -> Kernel:
    """Configure (tinyconfig + fragment) and build ``bzImage`` out of tree."""
    check_build_tools()
    key = f"{source.version}-{fragment_digest(fragment)}"
    root = cache_root()
    build = root / "build" / key
    dest = root / "kernel" / key
    build.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    make = ["make", "-C", str(source.path), f"O={build}", "ARCH=x86_64"]

    log(f"configure: make tinyconfig + {fragment.name} (O={build})")
    _run([*make, "tinyconfig"], quiet=True)
    config = build / ".config"
    config.write_text(config.read_text() + "\n" + fragment.read_text())
    _run([*make, "olddefconfig"], quiet=True)
    missing = missing_options(config, fragment)
    if missing:
        raise KernelBuildError(
            "options of the fragment missing from .config after olddefconfig "
            "(unmet dependencies?):\n  " + "\n  ".join(missing)
        )
    n_opts = len(required_options(fragment)) + len(disabled_options(fragment))
    log(f"configure: all {n_opts} fragment lines honoured by .config")

    log_file = build / "build.log"
    log(f"build: nice make -j{jobs} bzImage (log: {log_file})")
    start = time.monotonic()
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            ["nice", "-n", "10", *make, f"-j{jobs}", "bzImage"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while True:
            try:
                rc = proc.wait(timeout=poll_seconds)
                break
            except subprocess.TimeoutExpired:
                n = _count_compiled(log_file)
                log(
                    f"build: still building, {n} files compiled, "
                    f"{time.monotonic() - start:.0f} s"
                )
    seconds = time.monotonic() - start
    if rc != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise KernelBuildError(f"make bzImage failed ({rc}):\n{tail}")
    image = build / "arch" / "x86" / "boot" / "bzImage"
    log(
        f"build: done in {seconds:.0f} s, {_count_compiled(log_file)} files "
        f"compiled, bzImage {image.stat().st_size / 1e6:.1f} MB"
    )
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy2(image, tmp / "bzImage")
    shutil.copy2(config, tmp / "config")
    shutil.copy2(fragment, tmp / "luo.config")
    (tmp / "build.json").write_text(
        json.dumps(
            {
                "source_version": source.version,
                "fragment_sha256": hashlib.sha256(fragment.read_bytes()).hexdigest(),
                "build_seconds": round(seconds, 1),
                "jobs": jobs,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log(f"cached: {dest / 'bzImage'}")
    return _kernel_from_dir(dest, built=True)


def _count_compiled(log_file: Path) -> int:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(r"^\s+CC\s", text, re.M))


def ensure_kernel(
    *,
    fragment: Path = FRAGMENT,
    refresh: bool = False,
    jobs: int | None = None,
    log: Callable[[str], None] = _say,
) -> Kernel:
    """Return a LUO test kernel, building it only when needed.

    ``LUO_VM_KERNEL=/path/to/bzImage`` bypasses everything (the image must have
    been built with a compatible config).  Without ``refresh``, a cached kernel
    for this fragment is used without network access; with ``refresh``, sid is
    asked for the current ``linux-source-7.2`` version and a kernel for it is
    built if not cached yet.
    """
    override = os.environ.get("LUO_VM_KERNEL")
    if override:
        image = Path(override).resolve()
        if not image.is_file():
            raise KernelBuildError(f"LUO_VM_KERNEL={override} does not exist")
        log(f"using LUO_VM_KERNEL={image}")
        return Kernel(image, image.with_name("config"), "custom", "custom")
    if not refresh:
        cached = find_cached_kernel(fragment)
        if cached is not None:
            log(f"cached kernel {cached.key}: {cached.bzimage}")
            return cached
    source = fetch_source(log=log) if refresh else None
    if source is None:
        source = find_unpacked_source() or fetch_source(log=log)
    dest = cache_root() / "kernel" / f"{source.version}-{fragment_digest(fragment)}"
    if (dest / "bzImage").is_file():
        log(f"cached kernel {dest.name}: {dest / 'bzImage'}")
        return _kernel_from_dir(dest)
    return build_kernel(source, fragment=fragment, jobs=jobs, log=log)


def release_variant(
    kernel: Kernel,
    localversion: str,
    *,
    jobs: int | None = None,
    log: Callable[[str], None] = _say,
) -> Kernel:
    """*kernel* again, whose release (``uname -r``) ends in *localversion*.

    A host that kexecs into the very image it runs already runs the release
    it is asked to install; fleet automation, which compares the two, needs
    a target that differs. Only the version string differs: *kernel*'s own
    object tree is made again with ``LOCALVERSION=``, which recompiles the
    few files that print the release and links (a copy of the tree would be
    built from scratch: kbuild keeps absolute paths). Cached in *kernel*'s
    directory, under ``release<localversion>/``.
    """
    if not re.fullmatch(r"-[a-z0-9]+", localversion):
        raise ValueError(f"localversion {localversion!r}: want '-' and [a-z0-9]")
    dest = kernel.bzimage.parent / f"release{localversion}"
    if (dest / "bzImage").is_file():
        return _kernel_from_dir(dest)
    source = find_unpacked_source()
    build = cache_root() / "build" / kernel.key
    if source is None or not (build / ".config").is_file():
        raise KernelBuildError(
            f"no source tree or object tree for {kernel.key}: cannot make its "
            f"{localversion} variant (build the kernel here first)"
        )
    make = [
        "make",
        "-C",
        str(source.path),
        f"O={build}",
        "ARCH=x86_64",
        f"LOCALVERSION={localversion}",
    ]
    jobs = jobs or os.cpu_count() or 1
    log(f"variant {localversion}: nice make -j{jobs} bzImage")
    start = time.monotonic()
    log_file = build / f"build{localversion}.log"
    with log_file.open("w") as out:
        rc = subprocess.run(
            ["nice", "-n", "10", *make, f"-j{jobs}", "bzImage"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if rc != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise KernelBuildError(f"make bzImage ({localversion}) failed ({rc}):\n{tail}")
    image = build / "arch" / "x86" / "boot" / "bzImage"
    release = image_release(image)
    if not release.endswith(localversion):
        raise KernelBuildError(f"variant built as release {release!r}")
    seconds = time.monotonic() - start
    log(f"variant {localversion}: release {release}, built in {seconds:.0f} s")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy2(image, tmp / "bzImage")
    shutil.copy2(build / ".config", tmp / "config")
    (tmp / "build.json").write_text(
        json.dumps(
            {
                "source_version": kernel.source_version,
                "release": release,
                "build_seconds": round(seconds, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    tmp.rename(dest)
    return _kernel_from_dir(dest, built=True)


def image_release(image: Path) -> str:
    """The release (``uname -r``) a bzImage boots as, read from its setup
    header: ``kernel_version`` (offset 0x20e) points, 0x200 bytes on, to the
    version string (``7.2.13 (user@host) #1 ...``)."""
    with image.open("rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise KernelBuildError(f"{image}: not a bzImage")
    start = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    end = head.find(b"\0", start)
    words = head[start:end].split() if end > start else []
    if not words:
        raise KernelBuildError(f"{image}: no version string in its setup header")
    return words[0].decode()


def kernel_release(kernel: Kernel) -> str:
    """The release (``uname -r``) *kernel* boots as."""
    return image_release(kernel.bzimage)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build or locate the LUO test kernel")
    p.add_argument("--refresh", action="store_true", help="check sid for updates")
    p.add_argument("-j", "--jobs", type=int, default=None)
    args = p.parse_args(argv)
    try:
        k = ensure_kernel(refresh=args.refresh, jobs=args.jobs)
    except KernelBuildError as e:
        print(f"[kernel] ERROR: {e}", flush=True)
        return 1
    print(k.bzimage)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
