"""Host-only checks of the fleet scenario's plumbing (no kernel, no QEMU boot)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.vm import e2e_fleet, fleet_guest, harness, kernel

RELEASES = ("7.2.13", "7.2.13-fleet")
SIZE = 256 << 20


def _pre(**over: Any) -> dict[str, Any]:
    return {
        "ready": True,
        "release": "7.2.13",
        "boot_id": "a",
        "liveupdate_number": 0,
        "sha256": "f00",
        "size": SIZE,
        **over,
    }


def _post(**over: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "release": "7.2.13-fleet",
        "boot_id": "b",
        "liveupdate_number": 1,
        "sha256": "f00",
        "size": SIZE,
        "status": {"state": "NORMAL", "outcome": "completed"},
        **over,
    }


def _summary(**over: Any) -> dict[str, Any]:
    hosts = [
        {"host": "vm0", "wave": 1, "status": "updated", "blackout_s": 40.5},
        {"host": "vm1", "wave": "2", "status": "updated", "blackout_s": 61.0},
        {"host": "vm2", "wave": 2, "status": "updated", "blackout_s": 58.2},
    ]
    return {
        "updated": ["vm0", "vm1", "vm2"],
        "failed": [],
        "not_started": [],
        "hosts": hosts,
        "gates": [{"wave": 1, "passed": True}, {"wave": 2, "passed": True}],
        **over,
    }


def test_the_scenario_gives_qemu_the_vm_s_forwards(tmp_path: Path) -> None:
    vm = e2e_fleet.FleetVm("vm0", tmp_path, 2222, 9999)
    sc = e2e_fleet.fleet_scenario(vm)
    k = kernel.Kernel(tmp_path / "bzImage", tmp_path / "config", "7", "k")
    argv = harness.qemu_argv(sc, k, tmp_path, "tcg")
    assert "-nic" not in argv
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in argv[argv.index("-netdev") + 1]
    assert [s.name for s in sc.stages] == ["pre", "post"]
    assert sc.memory == e2e_fleet.MEMORY


@pytest.mark.parametrize(
    ("pre", "post", "expect"),
    [
        pytest.param(_pre(), _post(), [], id="good"),
        pytest.param(
            _pre(liveupdate_number=None), _post(), [], id="first-boot-logs-no-number"
        ),
        pytest.param(
            _pre(liveupdate_number=None),
            _post(liveupdate_number=None),
            ["+ 1"],
            id="no-number-after",
        ),
        pytest.param(
            _pre(ready=False, error="boom"), None, ["never ready"], id="not-ready"
        ),
        pytest.param(_pre(), None, ["no report"], id="no-post"),
        pytest.param(_pre(), _post(liveupdate_number=2), ["+ 1"], id="number"),
        pytest.param(_pre(), _post(boot_id="a"), ["same boot"], id="same-boot"),
        pytest.param(_pre(), _post(sha256="bad"), ["came back"], id="bytes"),
        pytest.param(_pre(), _post(release="7.2.13"), ["runs 7.2.13"], id="release"),
        pytest.param(
            _pre(),
            _post(status={"state": "NORMAL", "outcome": "cancelled"}),
            ["not NORMAL / completed"],
            id="cancelled",
        ),
        pytest.param(
            _pre(size=1, sha256="x"),
            _post(size=1, sha256="x"),
            ["not 268435456"],
            id="small",
        ),
    ],
)
def test_check_host(
    pre: dict[str, Any], post: dict[str, Any] | None, expect: list[str]
) -> None:
    errs = e2e_fleet.check_host("vm0", pre, post, releases=RELEASES, size=SIZE)
    assert len(errs) == len(expect), errs
    for err, want in zip(errs, expect, strict=True):
        assert want in err


def test_check_summary_accepts_a_complete_rollout() -> None:
    assert e2e_fleet.check_summary(_summary(), ["vm0", "vm1", "vm2"]) == []


@pytest.mark.parametrize(
    ("over", "expect"),
    [
        pytest.param({"updated": ["vm0"]}, "updated", id="not-all-updated"),
        pytest.param({"failed": ["vm1"]}, "failed", id="failed"),
        pytest.param(
            {"gates": [{"wave": 1, "passed": False}]}, "gates", id="gate-failed"
        ),
        pytest.param(
            {
                "hosts": [
                    {"host": "vm0", "wave": 1, "blackout_s": 1.0},
                    {"host": "vm1", "wave": 1, "blackout_s": 1.0},
                    {"host": "vm2", "wave": 2, "blackout_s": 1.0},
                ]
            },
            "waves",
            id="wrong-waves",
        ),
        pytest.param(
            {
                "hosts": [
                    {"host": "vm0", "wave": 1, "blackout_s": None},
                    {"host": "vm1", "wave": 2, "blackout_s": 1.0},
                    {"host": "vm2", "wave": 2, "blackout_s": 1.0},
                ]
            },
            "vm0: no blackout",
            id="no-blackout",
        ),
    ],
)
def test_check_summary_names_what_is_wrong(over: dict[str, Any], expect: str) -> None:
    errs = e2e_fleet.check_summary(_summary(**over), ["vm0", "vm1", "vm2"])
    assert any(expect in e for e in errs), errs


def test_no_summary_is_a_failure() -> None:
    assert e2e_fleet.check_summary({}, ["vm0"]) == ["the role wrote no summary"]


def test_host_playbook_keeps_its_state_on_the_out_share() -> None:
    book = e2e_fleet.host_playbook(Path("/k/bzImage"), "console=ttyS0 x")
    assert book["state_dir"] == f"{harness.GUEST_OUT}/state"
    assert book["next_kernel"] == {
        "image": "/k/bzImage",
        "initrd": None,
        "cmdline": "console=ttyS0 x",
    }
    assert [s["plugin"] for s in book["phases"]["prepare"]["steps"]] == ["kexec"]


def test_rollout_vars_are_all_known_to_the_role() -> None:
    """The role refuses a rolling_update_* variable it does not know."""
    variables = e2e_fleet.rollout_vars("7.2.13-fleet", "http://p", Path("/s"))
    spec = (
        harness.REPO_ROOT
        / "deploy/ansible/ansible_collections/luo/liveupdate/roles/rolling_update"
        / "meta/argument_specs.yml"
    ).read_text()
    for name in variables:
        if name.startswith("rolling_update_"):
            assert f"{name}:" in spec, name
    assert variables["rolling_update_waves"] == [1, 2]


def test_release_variant_wants_a_plain_suffix(tmp_path: Path) -> None:
    k = kernel.Kernel(tmp_path / "bzImage", tmp_path / "config", "7", "k")
    with pytest.raises(ValueError, match="localversion"):
        kernel.release_variant(k, "fleet")


def _bzimage(path: Path, version: bytes) -> Path:
    """The setup header's fields that :func:`kernel.image_release` reads."""
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x600 - 0x200)
    head[0x600 : 0x600 + len(version) + 1] = version + b"\0"
    path.write_bytes(bytes(head))
    return path


def test_image_release_reads_the_setup_header(tmp_path: Path) -> None:
    image = _bzimage(tmp_path / "bzImage", b"7.2.13-fleet (root@ci) #1 Wed Dec 2")
    k = kernel.Kernel(image, tmp_path / "config", "7", "k")
    assert kernel.kernel_release(k) == "7.2.13-fleet"


def test_image_release_refuses_what_is_no_bzimage(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\0" * 0x1000)
    with pytest.raises(kernel.KernelBuildError, match="not a bzImage"):
        kernel.image_release(tmp_path / "x")


def test_the_workload_s_pages_all_differ_and_its_digest_is_what_it_wrote() -> None:
    fd = os.memfd_create("fleet-unit", os.MFD_CLOEXEC)
    try:
        sha = fleet_guest.fill(fd, 2)
        assert fleet_guest.digest(fd) == (sha, 2 << 20)
        data = os.pread(fd, 2 << 20, 0)
    finally:
        os.close(fd)
    pages = {data[i : i + 4096] for i in range(0, len(data), 4096)}
    assert len(pages) == 512
