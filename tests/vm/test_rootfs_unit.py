"""Host-only checks of the sid guest root's plumbing (no debootstrap, no QEMU)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.vm import harness, kernel, rootfs

if TYPE_CHECKING:
    from pathlib import Path

PYPROJECT = """\
[project]
name = "x"
dependencies = ["anyio>=4.7", "PyYAML>=6.0"]
"""


def _root(tmp_path: Path) -> harness.GuestRoot:
    return rootfs.Rootfs(tmp_path / "tree", "k", False, None, {}).guest_root()


def _scenario(root: harness.GuestRoot) -> harness.Scenario:
    sc = harness.Scenario.pre_post(
        "unit",
        pre=(rootfs.GUEST_PYTHON, "-m", "tests.vm.floor", "pre"),
        post=(rootfs.GUEST_PYTHON, "-m", "tests.vm.floor", "post"),
    )
    return harness.Scenario(sc.name, sc.stages, root=root)


def test_requirements_are_the_projects_plus_the_test_tools(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    reqs = rootfs.python_requirements(pyproject)
    assert reqs[:2] == ["anyio>=4.7", "PyYAML>=6.0"]
    assert any(r.startswith("pytest>=") for r in reqs)


def test_cache_key_follows_packages_and_pyproject(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT)
    key = rootfs.cache_key(("systemd", "python3"), pyproject)
    assert key.startswith("sid-")
    assert rootfs.cache_key(("python3", "systemd"), pyproject) == key  # order-free
    assert rootfs.cache_key(("systemd",), pyproject) != key
    pyproject.write_text(PYPROJECT.replace("anyio>=4.7", "anyio>=4.8"))
    assert rootfs.cache_key(("systemd", "python3"), pyproject) != key


def test_guest_python_is_the_newest_stdlib_in_the_tree(tmp_path: Path) -> None:
    for name, has_os in (
        ("python3.13", True),
        ("python3.14", True),
        ("python3.15", False),
    ):
        d = tmp_path / "usr" / "lib" / name
        d.mkdir(parents=True)
        if has_os:
            (d / "os.py").write_text("")
    assert rootfs._guest_python_tag(tmp_path) == "3.14"


def test_no_python_in_the_tree_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    with pytest.raises(rootfs.RootfsBuildError, match="no Python"):
        rootfs._guest_python_tag(tmp_path)


def test_cached_tree_is_found_only_once_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = tmp_path / "luo-orchestrator" / "rootfs" / "sid-abc"
    python = d / "root" / rootfs.GUEST_PYTHON.lstrip("/")
    python.parent.mkdir(parents=True)
    assert rootfs.find_cached_rootfs("sid-abc") is None  # no venv Python yet
    python.write_text("")
    (d / "rootfs.json").write_text(
        json.dumps({"build_seconds": 170.5, "versions": {"python": "3.14.10"}})
    )
    found = rootfs.find_cached_rootfs("sid-abc")
    assert found is not None
    assert found.path == d / "root"
    assert found.build_seconds == 170.5
    assert found.versions == {"python": "3.14.10"}


def test_shim_is_written_once_and_executable(tmp_path: Path) -> None:
    shim = tmp_path / rootfs.GUEST_SHIM.lstrip("/")
    shim.parent.mkdir(parents=True)
    rootfs.install_shim(tmp_path)
    assert shim.read_text() == rootfs.SHIM_TEXT
    assert shim.stat().st_mode & 0o111
    assert f"{rootfs.GUEST_SRC}/tests/vm/guest_init.py" in rootfs.SHIM_TEXT
    before = shim.stat().st_mtime_ns
    rootfs.install_shim(tmp_path)
    assert shim.stat().st_mtime_ns == before


def test_cmdline_boots_the_shim_with_the_checkout_share(tmp_path: Path) -> None:
    line = harness.kernel_cmdline(_scenario(_root(tmp_path)), "post")
    assert f"init={rootfs.GUEST_SHIM}" in line
    assert f"luovm.src={harness.SRC_TAG}" in line
    assert "luovm.stage=post" in line
    assert " -- " not in line  # the shim, not Python, is PID 1's program
    assert "luovm.exec=" not in line
    systemd = rootfs.Rootfs(tmp_path, "k", False, None, {}).guest_root(
        ("/lib/systemd/systemd", "--log-level=info")
    )
    line = harness.kernel_cmdline(_scenario(systemd), "pre")
    assert "luovm.exec=/lib/systemd/systemd,--log-level=info" in line


def test_qemu_shares_the_tree_and_the_checkout(tmp_path: Path) -> None:
    root = _root(tmp_path)
    k = kernel.Kernel(tmp_path / "bzImage", tmp_path / "config", "x", "x")
    joined = " ".join(harness.qemu_argv(_scenario(root), k, tmp_path, "tcg"))
    assert f"path={root.path},security_model=none,readonly=on" in joined
    assert f"path={harness.REPO_ROOT},security_model=none,readonly=on" in joined
    assert f"mount_tag={harness.SRC_TAG}" in joined
    assert "path=/,security_model" not in joined


def test_spec_points_the_guest_at_its_own_paths(tmp_path: Path) -> None:
    image = tmp_path / "bzImage"
    image.write_bytes(b"kernel")
    out = tmp_path / "out"
    out.mkdir()
    k = kernel.Kernel(image, tmp_path / "config", "x", "x")
    harness._write_spec(_scenario(_root(tmp_path)), k, out)
    spec = json.loads((out / "stages.json").read_text())
    assert spec["cwd"] == rootfs.GUEST_SRC
    assert spec["venv"] == rootfs.GUEST_VENV
    assert spec["path"].startswith(f"{rootfs.GUEST_VENV}/bin:")
    assert spec["kernel"] == f"{harness.GUEST_OUT}/bzImage"
    assert (out / "bzImage").read_bytes() == b"kernel"


def test_the_one_test_kernel_boots_systemd_and_keeps_a_clock_reference() -> None:
    options = kernel.required_options()
    assert "CONFIG_CGROUPS=y" in options  # systemd's PID 1 needs cgroup2
    # Without ACPI there is no HPET or PM timer to calibrate the TSC against,
    # and a busy TCG host leaves the guest on the jiffies clock.
    assert {"CONFIG_ACPI=y", "CONFIG_HPET_TIMER=y"} <= set(options)


def test_the_stage_unit_is_written_with_the_shim(tmp_path: Path) -> None:
    (tmp_path / rootfs.GUEST_SHIM.lstrip("/")).parent.mkdir(parents=True)
    rootfs.install_shim(tmp_path)
    unit = tmp_path / rootfs.STAGE_UNIT.lstrip("/")
    assert unit.read_text() == rootfs.STAGE_UNIT_TEXT
    assert "guest_init.py --service" in rootfs.STAGE_UNIT_TEXT


def test_the_systemd_scenario_boots_systemd_on_an_overlay_with_a_disk(
    tmp_path: Path,
) -> None:
    from tests.vm.e2e_systemd import systemd_scenario

    sc = systemd_scenario(_root(tmp_path))
    line = harness.kernel_cmdline(sc, "pre")
    assert "luovm.exec=/lib/systemd/systemd" in line
    assert "luovm.overlay=vda" in line
    assert "systemd.wants=luo-vm-stage.service" in line
    assert "luovm.overlay=*" in rootfs.SHIM_TEXT
    k = kernel.Kernel(tmp_path / "bzImage", tmp_path / "config", "x", "x")
    argv = harness.qemu_argv(sc, k, tmp_path, "tcg")
    assert f"file={tmp_path / harness.DISK_IMAGE},format=raw,if=virtio" in argv
    plain = harness.qemu_argv(_scenario(_root(tmp_path)), k, tmp_path, "tcg")
    assert not any(harness.DISK_IMAGE in a for a in plain)


def test_the_guest_runs_the_deploy_doc_steps_but_the_install_from_pypi() -> None:
    from tests.vm.systemd_guest import deploy_steps, runnable

    blocks = deploy_steps()
    assert len(blocks) == 4
    first = runnable(blocks[0])
    assert "ln -sf /opt/luo-orchestrator/venv/bin/liveupdate" in first
    assert "pip install" not in first
    assert "python3 -m venv" not in first
    # Every other block runs as written.
    assert [runnable(b) for b in blocks[1:]] == blocks[1:]
    assert "systemctl enable --now liveupdate-agent.service" in blocks[3]
