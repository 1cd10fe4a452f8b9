"""The ``liveupdate`` command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrator
from orchestrator.luo import _probe


def run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(Path("/dev/liveupdate").exists(), reason="this host has LUO")
def test_probe_on_this_host_says_why_not() -> None:
    done = run("probe", "--kernel", "real")
    assert done.returncode == _probe.EXIT_NOT_POSSIBLE == 3
    assert "live update is NOT possible here: no /dev/liveupdate" in done.stdout
    as_json = json.loads(run("probe", "--kernel", "real", "--json").stdout)
    assert as_json["possible"] is False
    assert as_json["exit_code"] == 3
    assert "liveupdate=on" in as_json["reason"]


def test_probe_on_simulated_kernel_lists_kinds(tmp_path: Path) -> None:
    assert run("sim", "init", str(tmp_path / "k")).returncode == 0
    done = run("probe", "--json", env={"LIVEUPDATE_KERNEL": f"sim:{tmp_path}/k"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    kinds = {k["kind"]: k["preservable"] for k in report["kinds"]}
    assert report["abi"] == "merged"
    assert kinds["memfd"] is True
    assert kinds["pipe"] is False
    assert kinds["unix socket"] is False


def test_probe_tells_boot_and_release_across_kexec(tmp_path: Path) -> None:
    """What fleet automation compares before and after an update: the boot
    id, the running release (a simulated kernel's is its image's name) and
    the liveupdate number."""
    from orchestrator.luo import LiveUpdateDevice
    from orchestrator.luo.sim import SimKernel

    kernel = SimKernel(tmp_path / "k")
    before = json.loads(run("probe", "--json", "--kernel", kernel.spec).stdout)
    assert before["boot_id"] == kernel.boot_id()
    assert before["running_kernel"] == "sim"
    assert before["liveupdate_number"] is None
    image = tmp_path / "vmlinuz-7.2.13-luo"
    image.write_bytes(b"image")
    kernel.kexec_load(image, None, "liveupdate=on")
    child = os.fork()
    if child == 0:  # the kexec ends its caller, as the real one does
        with LiveUpdateDevice.open(kernel) as dev:
            dev.create_session("s")
            kernel.reboot_kexec()
    os.waitpid(child, 0)
    after = json.loads(run("probe", "--json", "--kernel", kernel.spec).stdout)
    assert after["boot_id"] not in (None, before["boot_id"])
    assert after["running_kernel"] == "7.2.13-luo"
    assert after["liveupdate_number"] == 1
    text = run("probe", "--kernel", kernel.spec).stdout.splitlines()
    assert ["running", "kernel", "7.2.13-luo"] in [line.split() for line in text]


def test_probe_busy_device(tmp_path: Path) -> None:
    from orchestrator.luo import LiveUpdateDevice
    from orchestrator.luo.sim import SimKernel

    kernel = SimKernel(tmp_path / "k")
    with LiveUpdateDevice.open(kernel):
        done = run("probe", "--kernel", kernel.spec)
    assert done.returncode == _probe.EXIT_BUSY
    assert "another process holds /dev/liveupdate" in done.stdout


def test_probe_rfc(tmp_path: Path) -> None:
    done = run("sim", "init", str(tmp_path / "r"), "--abi", "rfc")
    assert done.returncode == 0
    report = json.loads(run("probe", "--json", "--kernel", f"sim:{tmp_path}/r").stdout)
    assert (report["abi"], report["rfc_state"]) == ("rfc", "NORMAL")


def test_bad_kernel_spec_is_a_clear_error() -> None:
    done = run("probe", "--kernel", "bogus")
    assert done.returncode == 2
    assert "unknown kernel 'bogus'" in done.stderr


def test_help_teaches() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "simulated kernel" in done.stdout
    assert "probe" in done.stdout


def test_demo_main_job(tmp_path: Path) -> None:
    """The README's main job: a whole update of real workloads on the simulated kernel."""
    done = run("demo", "--state-dir", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "luo: Retrieved live update data, liveupdate number: 1" in done.stdout
    assert "outcome completed" in done.stdout
    assert "blackout window" in done.stdout
    assert done.stdout.count("every byte came back") == 2
    for entry in (tmp_path / "demo" / "workloads").glob("*.json"):
        os.kill(json.loads(entry.read_text())["pid"], 9)


def test_public_names_match_all() -> None:
    """Every name in __all__ resolves (the lazy ones too); nothing public is left out."""
    import inspect

    import orchestrator.luo as luo

    for module in (orchestrator, luo):
        assert len(set(module.__all__)) == len(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, name
        public = {
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and not inspect.ismodule(v)
        } - {"annotations", "TYPE_CHECKING"}
        assert public <= set(module.__all__)
