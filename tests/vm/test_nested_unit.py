"""Host-only checks of the nested-VM scenarios' verdict (no QEMU boot)."""

from __future__ import annotations

import pytest

from tests.vm import e2e_qemu


@pytest.mark.parametrize(
    ("text", "version"),
    [
        pytest.param("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)", (11, 1)),
        pytest.param("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)", (7, 2)),
        pytest.param("qemu: not found", None, id="none"),
    ],
)
def test_qemu_version(text: str, version: tuple[int, int] | None) -> None:
    assert e2e_qemu.qemu_version(text) == version


def _journal(cpr: bool) -> list[dict[str, object]]:
    vm = {"name": "vm0", "cpr": cpr, "qemu": [11, 1, 3]}
    return [{"event": "step_end", "data": {"vms": [vm]}}, {"event": "run_end"}]


def test_mode_must_follow_the_version_found() -> None:
    new = {"qemu_version": "QEMU emulator version 11.1.3"}
    old = {"qemu_version": "QEMU emulator version 7.2.22"}
    assert e2e_qemu._mode_failures(new, {"journal": _journal(True)}) == []
    assert e2e_qemu._mode_failures(old, {"journal": _journal(False)}) == []
    assert e2e_qemu._mode_failures(new, {"journal": _journal(False)})
    assert e2e_qemu._mode_failures(old, {"journal": _journal(True)})
    assert e2e_qemu._mode_failures(new, {"journal": []})  # nothing recorded
    assert e2e_qemu._mode_failures(None, {"journal": _journal(True)})
