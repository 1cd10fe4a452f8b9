"""Scenario ``sid``: the orchestrator on Debian unstable's userland, Python 3.14.

The guest's root is the cached sid tree of :mod:`tests.vm.rootfs` instead of
the host's ``/``; the harness's Python init runs from the guest's own venv
(the guest's Python, not the host's 3.11). Stage ``pre`` records the versions
the guest runs (:mod:`tests.vm.sid_guest`) and runs the engine scenario's
``pre`` (demo workloads -> ``liveupdate run`` -> kexec); stage ``post`` runs
its ``post`` (``liveupdate resume``, status, every workload's SUM).

Passes when both stages pass the harness's checks, the guest ran the tree's
Python (not the host's), ``engine-post.json`` says ok (resume exit 0, state
NORMAL, outcome completed, every SUM equal to the SHA-256 taken before the
kexec) and the new kernel logged its ``liveupdate number``.
"""

from __future__ import annotations

import dataclasses
import platform
from typing import TYPE_CHECKING

from tests.vm.harness import Scenario, Stage, run_scenario
from tests.vm.report import liveupdate_numbers, section
from tests.vm.rootfs import GUEST_PYTHON, RootfsBuildError, ensure_rootfs, precompile

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import GuestRoot
    from tests.vm.kernel import Kernel

#: Workloads and their size: enough to go through every phase, small for TCG.
SID_WORKLOADS = 2
SID_MIB = 32


def sid_scenario(
    root: GuestRoot, count: int = SID_WORKLOADS, mib: int = SID_MIB
) -> Scenario:
    def stage(name: str, *args: str) -> Stage:
        return Stage(name, (GUEST_PYTHON, "-m", "tests.vm.sid_guest", name, *args))

    sc = Scenario(
        "sid",
        stages=(
            stage("pre", "--count", str(count), "--mib", str(mib)),
            stage("post"),
        ),
        timeout=900.0,
    )
    return dataclasses.replace(sc, root=root)


def run_sid(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    section("sid: guest root")
    try:
        rootfs = ensure_rootfs()
    except RootfsBuildError as exc:
        return [f"the sid root could not be built: {exc}"]
    print(f"root        {rootfs.path} ({'built now' if rootfs.built else 'cached'})")
    if rootfs.build_seconds is not None:
        print(f"build time  {rootfs.build_seconds:.0f} s")
    for name, version in sorted(rootfs.versions.items()):
        print(f"  {name:16} {version}")
    precompile(rootfs)
    result = run_scenario(
        sid_scenario(rootfs.guest_root()), kernel, echo=not args.quiet, accel=args.accel
    )
    failures = list(result.failures())

    section("sid: what the guest ran")
    pre = result.read_json("sid-pre.json")
    if pre is None:
        failures.append("no sid-pre.json: stage pre did not report")
    else:
        for key, value in sorted(pre.items()):
            print(f"  {key:10} {value}")
        guest_py = str(pre.get("python", ""))
        want = rootfs.versions.get("python")
        if guest_py == platform.python_version():
            failures.append(f"the guest ran the host's Python {guest_py}")
        if want is not None and guest_py != want:
            failures.append(f"the guest ran Python {guest_py}, the tree has {want}")

    section("sid: the update")
    post = result.read_json("engine-post.json")
    if post is None:
        failures.append("no engine-post.json: stage post did not report")
    else:
        print(f"  resume rc {post.get('resume_rc')}, status {post.get('status')}")
        print(f"  before {post.get('before')}")
        print(f"  after  {post.get('after')}")
        if not post.get("ok"):
            failures.append(
                "the update did not complete with every workload's bytes back"
            )
    numbers = liveupdate_numbers(result)
    if not numbers:
        failures.append("no 'liveupdate number: N' line in the new kernel's log")
    print(f"  liveupdate number(s) {numbers}; QEMU {result.elapsed:.1f} s wall")
    return failures
