"""Shared fixtures: the kernel under test, real or simulated.

``--luo-kernel=sim`` (default) gives every test a fresh simulated kernel with
the merged ABI; ``--luo-kernel=real`` runs the same tests against this host's
/dev/liveupdate (inside the VM harness, as root).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.luo import RealKernel
from orchestrator.luo.sim import SimKernel

if TYPE_CHECKING:
    from collections.abc import Iterator

    from orchestrator.luo import Kernel


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("luo")
    group.addoption(
        "--luo-kernel",
        default="sim",
        choices=("sim", "real"),
        help="kernel for the contract tests: a fresh simulated one per test, or "
        "this host's /dev/liveupdate",
    )
    group.addoption(
        "--luo-carry",
        default=None,
        help="(real kernel) the carry file written by 'python -m tests.contract.stage' "
        "before the kexec; cross-kexec tests then run their stage for this boot",
    )
    group.addoption(
        "--luo-boot", type=int, default=1, help="boot number after the kexecs"
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def kernel(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kernel]:
    """The kernel under test."""
    if request.config.getoption("--luo-kernel") == "real":
        if not Path("/dev/liveupdate").exists() or os.geteuid() != 0:
            pytest.skip("needs root and a real /dev/liveupdate (run in the VM harness)")
        yield RealKernel()
    else:
        yield SimKernel(tmp_path / "kernel")


@pytest.fixture
def sim_kernel(tmp_path: Path) -> SimKernel:
    """A fresh simulated kernel (for tests that only make sense on the simulator)."""
    return SimKernel(tmp_path / "kernel")
