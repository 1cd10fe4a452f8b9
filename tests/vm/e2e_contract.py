"""Scenario ``contract``: the kernel-contract suite (tests/contract) on a real kernel.

Three boots (see :mod:`tests.vm.contract_guest`): boot 0 runs the first stage of
every cross-kexec scenario and kexecs; boot 1 runs pytest (one-boot tests and
the 2-stage scenarios' last stages) and the 3-stage scenarios' middle stage,
and kexecs; boot 2 runs pytest again. The host then checks that every test id
the simulator runs (``pytest --collect-only tests/contract`` here) passed on
the real kernel in boot 1 or boot 2; ids skipped on the real kernel in every
boot are listed with their reason (allowed, but shown).
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.vm.harness import REPO_ROOT, Scenario, Stage, python_argv, run_scenario
from tests.vm.report import liveupdate_numbers, section

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from tests.vm.kernel import Kernel

BOOTS = (1, 2)


def contract_scenario(timeout: float = 600.0) -> Scenario:
    return Scenario(
        "contract",
        stages=tuple(
            Stage(f"boot{b}", python_argv("-m", "tests.vm.contract_guest", str(b)))
            for b in (0, 1, 2)
        ),
        timeout=timeout,
    )


@dataclass
class Outcome:
    passed: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    total: int = 0


def read_junit(path: Path) -> Outcome | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = Outcome()
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        tid = f"{cls.replace('.', '/')}.py::{case.get('name', '')}"
        out.total += 1
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            msg = bad.get("message") or ""
            text = (bad.text or "").strip().splitlines()
            out.failed[tid] = msg if msg else (text[-1] if text else "?")
        elif skip is not None:
            out.skipped[tid] = skip.get("message") or ""
        else:
            out.passed.add(tid)
    return out


def simulator_ids() -> list[str]:
    """The contract test ids as collected on the host (the simulator)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/contract",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return [ln.strip() for ln in done.stdout.splitlines() if "::" in ln]


def run_contract(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    scenario = contract_scenario(args.timeout)
    result = run_scenario(scenario, kernel, echo=not args.quiet, accel=args.accel)
    failures = list(result.failures())

    section("contract: liveupdate number lines")
    numbers = liveupdate_numbers(result)
    if len(numbers) < 2:
        failures.append(f"expected 2 'liveupdate number' lines, got {numbers}")

    section("contract: results on the real kernel")
    outcomes: dict[int, Outcome] = {}
    for boot in BOOTS:
        oc = read_junit(result.out_dir / f"contract-boot{boot}.xml")
        if oc is None:
            failures.append(f"no junit XML from boot {boot}")
            continue
        outcomes[boot] = oc
        print(
            f"boot {boot}: {oc.total} tests: {len(oc.passed)} passed, "
            f"{len(oc.failed)} failed/errors, {len(oc.skipped)} skipped"
        )
        for tid, msg in sorted(oc.failed.items()):
            print(f"  FAILED {tid}: {msg}")
            failures.append(f"boot {boot}: {tid} failed: {msg[:200]}")

    sim = simulator_ids()
    passed = set().union(*(oc.passed for oc in outcomes.values()))
    skipped_everywhere = {
        tid: "; ".join(
            f"boot {b}: {oc.skipped[tid]}"
            for b, oc in outcomes.items()
            if tid in oc.skipped
        )
        for tid in sim
        if tid not in passed
        and outcomes
        and all(tid in oc.skipped for oc in outcomes.values())
    }
    missing = [t for t in sim if t not in passed and t not in skipped_everywhere]
    print(
        f"\nsimulator ids: {len(sim)}; passed on the real kernel (boot 1 or 2): "
        f"{len([t for t in sim if t in passed])}"
    )
    if skipped_everywhere:
        print("skipped on the real kernel (reason):")
        for tid, why in sorted(skipped_everywhere.items()):
            print(f"  {tid}: {why}")
    for tid in missing:
        print(f"  NOT PASSED on the real kernel: {tid}")
    if missing:
        failures.append(
            f"{len(missing)} simulator test id(s) did not pass on the real kernel"
        )
    if not sim:
        failures.append("could not collect the simulator's test ids")
    extra = sorted(passed - set(sim))
    if extra:
        print(f"passed on the real kernel only (not collected on the host): {extra}")

    section("contract: summary")
    print(f"out dir     {result.out_dir}")
    print(f"qemu        exit {result.qemu_returncode}, {result.elapsed:.1f} s wall")
    print(f"boots       {result.boots()}")
    for name, st in result.statuses.items():
        print(f"stage {name:6} rc={st.rc} (boot {st.boot})")
    return failures
