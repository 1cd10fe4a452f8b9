"""Host-only checks of the VM harness plumbing (no kernel, no QEMU boot)."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from tests.vm import floor, harness, kernel

if TYPE_CHECKING:
    from pathlib import Path


def _scenario() -> harness.Scenario:
    return harness.Scenario.pre_post(
        "unit",
        pre=harness.python_argv("-m", "tests.vm.floor", "pre"),
        post=harness.python_argv("-m", "tests.vm.floor", "post"),
    )


def test_fragment_has_the_luo_options() -> None:
    opts = kernel.required_options()
    for needed in (
        "CONFIG_KEXEC_FILE=y",
        "CONFIG_RELOCATABLE=y",
        "CONFIG_KEXEC_HANDOVER=y",
        "CONFIG_LIVEUPDATE=y",
        "CONFIG_LIVEUPDATE_MEMFD=y",
        "CONFIG_9P_FS=y",
    ):
        assert needed in opts


def test_missing_options_lists_what_olddefconfig_dropped(tmp_path: Path) -> None:
    frag = tmp_path / "frag.config"
    frag.write_text("# c\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n")
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n")
    assert kernel.missing_options(cfg, frag) == ["CONFIG_B=y", "CONFIG_C=n"]


def test_cmdlines_chain_stages_and_fit() -> None:
    sc = _scenario()
    pre = harness.kernel_cmdline(sc, "pre")
    post = harness.kernel_cmdline(sc, "post")
    assert "luovm.stage=pre" in pre
    assert "luovm.stage=post" in post
    assert "liveupdate=on" in post
    assert post.split(" -- ")[1] == f"-S {harness.GUEST_INIT}"
    assert len(post) < 2048


def test_qemu_argv_shares_root_read_only(tmp_path: Path) -> None:
    k = kernel.Kernel(tmp_path / "bzImage", tmp_path / "config", "x", "x")
    argv = harness.qemu_argv(_scenario(), k, tmp_path, "tcg")
    joined = " ".join(argv)
    assert "path=/,security_model=none,readonly=on" in joined
    assert f"path={tmp_path},security_model=none" in joined
    assert "-no-reboot" in argv


def test_floor_pattern_is_unique_per_page() -> None:
    a, b = floor.expected_chunk(0), floor.expected_chunk(1)
    assert len(a) == floor.CHUNK
    assert a != b
    assert struct.unpack_from("<Q", b, floor.PAGE)[0] == floor.PAGES_PER_CHUNK + 1
    bad = bytearray(a)
    bad[5000] ^= 0xFF
    assert floor._mismatches(bad, a) == (1, 1)


def test_serial_reader_stamps_lines() -> None:
    code = "import time;print('a\\r');time.sleep(0.3);print('b',end='')"
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        start = time.monotonic()
        lines = [
            ln for ln in harness._read_lines(proc, start, start + 30) if ln is not None
        ]
    assert [ln.text for ln in lines] == ["a", "b"]
    assert lines[1].t - lines[0].t >= 0.25


def test_no_forwards_means_no_nic() -> None:
    assert harness.nic_args(()) == ["-nic", "none"]


def test_forwards_listen_on_loopback_only_and_the_guest_is_restricted() -> None:
    argv = harness.nic_args(((2222, 22), (9999, 9731)))
    assert argv == [
        "-netdev",
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,"
        "hostfwd=tcp:127.0.0.1:9999-:9731",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def test_lanes_keep_groups_together_and_balance() -> None:
    from tests.vm.e2e import EXCLUSIVE, OPT_IN, SCENARIOS, _lanes

    default = [s for s in SCENARIOS if s not in OPT_IN | EXCLUSIVE]
    lanes = _lanes(default, 2)
    assert sorted(s for lane in lanes for s in lane) == sorted(default)
    where = {s: i for i, lane in enumerate(lanes) for s in lane}
    # engine reads floor's figures; the sid root's scenarios share its bytecode
    assert where["floor"] == where["engine"]
    assert where["sid"] == where["qemu-sid"] == where["systemd"]
    assert len(lanes) == 2
    for lane in lanes:  # each lane keeps the suite's order
        assert lane == sorted(lane, key=list(SCENARIOS).index)
    assert _lanes(default, 1) == [default]
    assert _lanes(["cancel"], 4) == [["cancel"]]


def test_blackout_turns_pair_each_round_on_one_parity() -> None:
    from tests.vm.e2e_blackout import blackout_scenario, boot_of, turns

    for rounds in (1, 2, 3, 4, 6):
        order = turns(rounds)
        assert order[:2] == [("orch", 0), ("floor", 0)]  # the warm-up, not counted
        switched = [  # counted boots that run the other side than the one before
            order[i][0] for i in range(2, len(order)) if order[i][0] != order[i - 1][0]
        ]
        if rounds % 4 == 0:  # as many for each side
            assert switched.count("floor") == switched.count("orch") == rounds // 4
        orch = [k for side, k in order if side == "orch"]
        assert orch == sorted(orch)  # the serial check counts the orchestrator's
        for k in range(1, rounds + 1 - rounds % 2):
            assert (boot_of(rounds, "floor", k) - boot_of(rounds, "orch", k)) % 2 == 0
    # every kexec'd boot has a stage, the orchestrator's starting with resume
    stages = blackout_scenario(4, 4, 32, 60.0).stages
    assert len(stages) == len(turns(4)) + 1
    for side, k in turns(4):
        argv = " ".join(stages[boot_of(4, side, k) - 1].argv)
        assert f"{side}-post:{k}" in argv
        assert ("liveupdate resume" in argv) == (side == "orch")
