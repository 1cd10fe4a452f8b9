"""The QMP client and the VM launcher against a real QEMU."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio.to_thread
import pytest

from orchestrator import OrchestratorError
from orchestrator.vmm import (
    QmpCommandError,
    QmpConnectionError,
    QmpError,
    QmpTimeoutError,
    VmError,
    VmSpec,
    find_ram_fd,
    launch_vm,
    open_qmp,
    read_words,
)

from .guest_vm import COUNTER, wait_counting

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import VmHost


async def test_query_status_and_guest_memory(vm_host: VmHost) -> None:
    async with open_qmp(vm_host.vm.qmp, command_timeout=60) as qmp:
        assert qmp.version >= (7, 0, 0)
        reply = await qmp.execute("query-status")
        assert reply["status"] == "running"
        (first,) = await read_words(qmp, COUNTER)
        await qmp.execute("stop")
        (stopped,) = await read_words(qmp, COUNTER)
        assert stopped >= first
        assert await read_words(qmp, COUNTER) == [stopped], "stopped: no progress"
        await qmp.execute("cont")
    await anyio.to_thread.run_sync(wait_counting, vm_host.vm.qmp, stopped)


async def test_error_reply_is_qmp_error(vm_host: VmHost) -> None:
    async with open_qmp(vm_host.vm.qmp, command_timeout=60) as qmp:
        with pytest.raises(QmpCommandError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)
        with pytest.raises(QmpCommandError, match=r"GenericError|Invalid"):
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "no-such-cap", "state": True}]},
            )
        # The session is still usable after an error reply.
        assert (await qmp.execute("query-status"))["running"] is True
    assert issubclass(QmpCommandError, OrchestratorError)


async def test_second_client_gets_no_greeting(vm_host: VmHost) -> None:
    """A QMP socket serves one client: the second one times out, typed."""
    async with open_qmp(vm_host.vm.qmp, command_timeout=60):
        with pytest.raises(QmpTimeoutError, match="another QMP client"):
            async with open_qmp(vm_host.vm.qmp, command_timeout=1):
                pass


async def test_nothing_listening(tmp_path: Path) -> None:
    with pytest.raises(QmpConnectionError) as info:
        async with open_qmp(tmp_path / "none.qmp"):
            pass
    assert isinstance(info.value, QmpError)


def test_guest_ram_memfd_found(vm_host: VmHost) -> None:
    number = find_ram_fd(vm_host.vm)
    target = os.readlink(f"/proc/{vm_host.vm.pid}/fd/{number}")
    assert target.startswith("/memfd:"), target
    assert os.stat(f"/proc/{vm_host.vm.pid}/fd/{number}").st_size == 64 << 20


def test_bad_qemu_argument_fails_fast(tmp_path: Path, guest_image: Path) -> None:
    spec = VmSpec("bad", str(guest_image), extra=("-no-such-option",))
    with pytest.raises(VmError, match=r"exited during start-up.*no-such-option"):
        launch_vm(tmp_path / "qemu", spec)


def test_a_qemu_that_fails_after_its_socket_listens_fails_the_launch(
    vm_host: VmHost, tmp_path: Path
) -> None:
    """QMP's socket listens before QEMU opens its disks: a second QEMU on the
    disk vm0 holds locked must fail the launch, not return a dead VM."""
    spec = VmSpec("twin", vm_host.vm.spec.image)
    with pytest.raises(VmError, match=r"exited during start-up.*write.? lock"):
        launch_vm(tmp_path / "twin", spec)
