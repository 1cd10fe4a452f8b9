"""Kernel contract across kexecs (scenarios in scenarios.py).

On the simulated kernel each test runs the scenario's early stages in a child
process that the simulated kexec ends (SIGKILL, as a kexec ends every
process), then its last stage here, in the "new kernel". On a real kernel the
VM harness runs the early stages with ``python -m tests.contract.stage`` and
this file's last stages with ``--luo-kernel=real --luo-carry=FILE --luo-boot=N``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.luo.sim import SimKernel

from .scenarios import SCENARIOS, Scenario

if TYPE_CHECKING:
    from orchestrator.luo import Kernel

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kexec
@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.name) for s in SCENARIOS])
def test_across_kexec(
    scenario: Scenario, kernel: Kernel, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    carry_file = request.config.getoption("--luo-carry")
    last = len(scenario.stages) - 1
    keep: list[object] = []
    if carry_file is not None:
        boot = request.config.getoption("--luo-boot")
        if boot != last:
            pytest.skip(f"its last stage runs in boot {last}, this is boot {boot}")
        carry = json.loads(Path(carry_file).read_text())
        scenario.stages[last](kernel, carry.get(scenario.name, {}), keep)
        return
    if not isinstance(kernel, SimKernel):
        pytest.skip(
            "on a real kernel this runs in the VM harness's stages (--luo-carry)"
        )
    image = tmp_path / "next-kernel"
    image.write_bytes(b"simulated kernel image\n")
    carry_path = tmp_path / "carry.json"
    boot_ids = [kernel.boot_id()]
    for boot in range(last):
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.contract.stage",
                "--kernel",
                kernel.spec,
                "--carry",
                str(carry_path),
                "--boot",
                str(boot),
                "--only",
                scenario.name,
                "--kexec",
                str(image),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert child.returncode == -signal.SIGKILL, (
            f"stage {boot} was not ended by the kexec: {child.returncode}\n{child.stderr}"
        )
        boot_ids.append(kernel.boot_id())
    assert len(set(boot_ids)) == last + 1, "every kexec starts a new boot"
    carry = json.loads(carry_path.read_text())
    scenario.stages[last](kernel, carry.get(scenario.name, {}), keep)
