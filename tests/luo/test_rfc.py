"""The RFC (seed) ABI client against the simulated RFC kernel.

No kernel carrying the RFC series can be built here (it never merged), so
these run on the simulator only; the request numbers are pinned in
test_abi.py against the seed patch.
"""

from __future__ import annotations

import errno as E
import os
import signal
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest

from orchestrator.luo import (
    RfcDevice,
    RfcState,
    StateError,
    TokenExistsError,
    TokenNotFoundError,
)
from orchestrator.luo.sim import SimKernel

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def rfc(tmp_path: Path) -> SimKernel:
    return SimKernel(tmp_path / "rfc", abi="rfc")


def test_state_machine(rfc: SimKernel) -> None:
    with RfcDevice.open(rfc) as dev:
        assert dev.state() is RfcState.NORMAL
        dev.prepare()
        assert dev.state() is RfcState.PREPARED
        with pytest.raises(StateError):
            dev.prepare()
        dev.cancel()
        assert dev.state() is RfcState.NORMAL
        with pytest.raises(StateError):
            dev.cancel()
        with pytest.raises(StateError):
            dev.finish()


def test_preserve_unpreserve(rfc: SimKernel) -> None:
    fd = os.memfd_create("rfc")
    try:
        with RfcDevice.open(rfc) as dev:
            assert dev.preserve_fd(fd, 42) == 42
            with pytest.raises(TokenExistsError):
                dev.preserve_fd(fd, 42)
            dev.prepare()
            with pytest.raises(StateError):
                dev.unpreserve_fd(42)
            dev.cancel()
            dev.unpreserve_fd(42)
            with pytest.raises(TokenNotFoundError) as info:
                dev.unpreserve_fd(42)
            assert info.value.errno == E.ENOENT
    finally:
        os.close(fd)


def test_no_exclusive_open(rfc: SimKernel) -> None:
    with RfcDevice.open(rfc), RfcDevice.open(rfc) as second:
        assert second.state() is RfcState.NORMAL


def test_kexec_round_trip(rfc: SimKernel, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"kernel")
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from orchestrator.luo import RfcDevice
        from orchestrator.luo.sim import SimKernel
        k = SimKernel(Path({str(rfc.root)!r}))
        fd = os.memfd_create("vm")
        os.write(fd, b"rfc-data" * 1000)
        dev = RfcDevice.open(k)
        dev.preserve_fd(fd, 7)
        dev.prepare()
        k.kexec_load(Path({str(image)!r}), None, "liveupdate=on")
        k.reboot_kexec()
    """)
    child = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with RfcDevice.open(rfc) as dev:
        assert dev.state() is RfcState.UPDATED
        with dev.restore_fd(7) as fd:
            assert os.pread(fd.fileno(), 8000, 0) == b"rfc-data" * 1000
        with pytest.raises(TokenNotFoundError):
            dev.restore_fd(7)
        dev.finish()
        assert dev.state() is RfcState.NORMAL
