"""Scenario ``fleet``: the Ansible role rolls a live update over three real-LUO VMs.

Three VMs boot the LUO test kernel at once, each with a NIC on QEMU's user
network whose sshd (port 22) and metrics endpoint (9731) are forwarded to
ports of the host's loopback. In each, a workload hands the agent a memfd of
256 MiB (:mod:`tests.vm.fleet_guest`). On the host, a real Prometheus scrapes
the three endpoints, and ``ansible-playbook`` runs the collection's role
``rolling_update`` over SSH, as the simulated fleet's tests do
(:mod:`tests.fleet._fleet`: the same inventory, the same play), in waves
``[1, 2]`` with the role's Prometheus gate after each wave. Each host's agent
kexecs it into the *target* kernel: the same build with another release
(``-fleet``, :func:`tests.vm.kernel.release_variant`), since the role leaves
a host that already runs its target alone.

Passes when the play succeeds, its summary lists every host as updated in its
wave with a blackout, both gates passed, and each VM says of itself, after
the rollout: a new boot, the target release, liveupdate number + 1, state
NORMAL / outcome completed, and the memfd the agent hands back has the
SHA-256 and size its workload recorded before the kexec.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import yaml

from tests.fleet._fleet import (
    ansible_playbook_command,
    running_prometheus,
    write_inventory,
)
from tests.vm.harness import (
    GUEST_OUT,
    REPO_ROOT,
    Scenario,
    Stage,
    kernel_cmdline,
    new_out_dir,
    python_argv,
    run_scenario,
)
from tests.vm.kernel import KernelBuildError, kernel_release, release_variant
from tests.vm.report import section

if TYPE_CHECKING:
    import argparse

    from tests.vm.harness import Result
    from tests.vm.kernel import Kernel

VMS = 3
WAVES = (1, 2)
FLEET_MIB = 256
#: The workload's memfd, the kernel and the guest's Python processes.
MEMORY = "1G"
LOCALVERSION = "-fleet"
METRICS_PORT = 9731
#: Seconds a host may take from the kexec to answering SSH again, and from
#: there to the end of its resume: TCG, two cores shared by three VMs.
REBOOT_TIMEOUT = 600
RESUME_TIMEOUT = 600
#: The gate's blackout budget: a TCG blackout, not a production one.
BLACKOUT_BUDGET = 300
#: Seconds until every VM's workload is registered with its agent.
READY_TIMEOUT = 600.0
#: QEMU's limit for a VM (the whole rollout runs inside it).
VM_TIMEOUT = 2400.0
ROLLOUT = REPO_ROOT / "tests" / "fleet" / "playbooks" / "rollout.yml"
AGENT_PLAYBOOK = REPO_ROOT / "playbooks" / "agent-update.yaml"


@dataclass(frozen=True)
class FleetVm:
    """One VM of the fleet: its name, out dir and forwarded loopback ports."""

    name: str
    out: Path
    ssh_port: int
    metrics_port: int

    @property
    def instance(self) -> str:
        """Prometheus's instance label of its metrics endpoint."""
        return f"127.0.0.1:{self.metrics_port}"


def fleet_scenario(vm: FleetVm, mib: int = FLEET_MIB) -> Scenario:
    def stage(name: str, *args: str) -> Stage:
        return Stage(name, python_argv("-m", "tests.vm.fleet_guest", name, *args))

    return Scenario(
        vm.name,
        stages=(stage("pre", "--mib", str(mib)), stage("post")),
        memory=MEMORY,
        timeout=VM_TIMEOUT,
        forwards=((vm.ssh_port, 22), (vm.metrics_port, METRICS_PORT)),
    )


def host_playbook(image: Path, cmdline: str) -> dict[str, Any]:
    """The host's luo-orchestrator playbook: ``playbooks/agent-update.yaml``
    with its state on the out share (it must outlive the kexec), the target
    kernel, and budgets for TCG."""
    book: dict[str, Any] = yaml.safe_load(AGENT_PLAYBOOK.read_text())
    book["state_dir"] = f"{GUEST_OUT}/state"
    book["next_kernel"] = {"image": str(image), "initrd": None, "cmdline": cmdline}
    book["blackout_budget"] = f"{BLACKOUT_BUDGET}s"
    book["defaults"] = {"timeout": "300s"}
    for step in book["phases"]["prepare"]["steps"]:
        step["timeout"] = "300s"
    return book


def sshd_config() -> str:
    """sshd's configuration in the guest: keys from the out share, root by key."""
    return (
        "ListenAddress 0.0.0.0\n"
        "Port 22\n"
        f"HostKey {GUEST_OUT}/ssh_host_ed25519_key\n"
        f"AuthorizedKeysFile {GUEST_OUT}/authorized_keys\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "UseDNS no\n"
        "StrictModes no\n"
        "PidFile /run/sshd.pid\n"
        "Subsystem sftp internal-sftp\n"
    )


def rollout_vars(target: str, prometheus_url: str, summary: Path) -> dict[str, Any]:
    """The role's variables for the VMs: waves [1, 2], a gate after each."""
    return {
        "rolling_update_target_kernel": target,
        "rolling_update_playbook": f"{GUEST_OUT}/playbook.yaml",
        "rolling_update_waves": list(WAVES),
        "rolling_update_summary_file": str(summary),
        "rolling_update_reboot_timeout": REBOOT_TIMEOUT,
        "rolling_update_resume_timeout": RESUME_TIMEOUT,
        "rolling_update_prometheus_url": prometheus_url,
        "rolling_update_blackout_budget": BLACKOUT_BUDGET,
        "rolling_update_gate_interval": 2,
        "rolling_update_gate_successes": 2,
        "rolling_update_gate_timeout": 180,
        "liveupdate_state_dir": f"{GUEST_OUT}/state",
    }


def check_host(
    name: str,
    pre: dict[str, Any] | None,
    post: dict[str, Any] | None,
    *,
    releases: tuple[str, str],
    size: int,
) -> list[str]:
    """What is wrong with one VM, from what it said before and after the
    kexec (``fleet-pre.json``, ``fleet-post.json``); *releases*: the base
    kernel's and the target's."""
    if pre is None or not pre.get("ready"):
        why = pre.get("error") if pre else "no fleet-pre.json"
        return [f"{name}: never ready before the rollout ({why})"]
    if post is None or not post.get("ok"):
        why = post.get("error") if post else "no fleet-post.json"
        return [f"{name}: no report from the target kernel ({why})"]
    errs: list[str] = []
    if pre.get("release") != releases[0]:
        errs.append(f"{name}: booted {pre.get('release')}, not {releases[0]}")
    if post.get("release") != releases[1]:
        errs.append(f"{name}: runs {post.get('release')} after, not {releases[1]}")
    if post.get("boot_id") == pre.get("boot_id"):
        errs.append(f"{name}: the same boot before and after")
    # A kernel that logs no "liveupdate number: N" has had no live update:
    # 0, as the collection's facts count it.
    before, after = pre.get("liveupdate_number") or 0, post.get("liveupdate_number")
    if not isinstance(before, int) or after != before + 1:
        errs.append(f"{name}: liveupdate number {before} -> {after}, not + 1")
    if (pre.get("sha256"), pre.get("size")) != (post.get("sha256"), post.get("size")):
        errs.append(
            f"{name}: the workload's memfd came back as {post.get('size')} bytes, "
            f"sha256 {post.get('sha256')}; before: {pre.get('size')} bytes, "
            f"sha256 {pre.get('sha256')}"
        )
    if pre.get("size") != size:
        errs.append(f"{name}: the workload held {pre.get('size')} bytes, not {size}")
    status = post.get("status") or {}
    if (status.get("state"), status.get("outcome")) != ("NORMAL", "completed"):
        errs.append(
            f"{name}: status {status.get('state')} / {status.get('outcome')} "
            "after the rollout, not NORMAL / completed"
        )
    return errs


def check_summary(summary: dict[str, Any], names: list[str]) -> list[str]:
    """What is wrong with the role's summary of a rollout over *names* in
    waves [1, 2]: every host updated in its wave, with a blackout; both
    gates passed."""
    if not summary:
        return ["the role wrote no summary"]
    errs: list[str] = []
    if sorted(summary.get("updated", [])) != sorted(names):
        errs.append(f"updated: {summary.get('updated')}, not {sorted(names)}")
    errs += [f"{k}: {summary[k]}" for k in ("failed", "not_started") if summary.get(k)]
    rows = {r.get("host"): r for r in summary.get("hosts", [])}
    waves = {n: str(rows.get(n, {}).get("wave")) for n in names}
    want = {n: "1" if i == 0 else "2" for i, n in enumerate(names)}
    if waves != want:
        errs.append(f"waves {waves}, not {want}")
    for n in names:
        blackout = rows.get(n, {}).get("blackout_s")
        try:
            ok = float(blackout) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            errs.append(f"{n}: no blackout in the summary ({blackout!r})")
    gates = [g.get("passed") for g in summary.get("gates", [])]
    if gates != [True] * len(WAVES):
        errs.append(f"gates passed: {gates}, not one per wave, all passed")
    return errs


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _free_ports(count: int) -> list[int]:
    """*count* distinct free loopback ports (held together while chosen)."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
    )


def prepare_vm(vm: FleetVm, key: Path, target: Kernel, scenario: Scenario) -> None:
    """The VM's out share: sshd's key and configuration, the controller's
    public key, the host's playbook (next kernel: *target*), its state dir."""
    vm.out.mkdir(parents=True)
    _keygen(vm.out / "ssh_host_ed25519_key")
    shutil.copy(f"{key}.pub", vm.out / "authorized_keys")
    (vm.out / "sshd_config").write_text(sshd_config())
    (vm.out / "state").mkdir()
    book = host_playbook(target.bzimage, kernel_cmdline(scenario, "post"))
    (vm.out / "playbook.yaml").write_text(yaml.safe_dump(book, sort_keys=False))


async def _wait_ready(vms: list[FleetVm], done: dict[str, Result]) -> list[str]:
    """Wait for every VM's ``fleet-pre.json``; the VMs that failed to get there."""
    end = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < end:
        reports = {vm.name: _read(vm.out / "fleet-pre.json") for vm in vms}
        missing = [n for n, r in reports.items() if r is None and n not in done]
        if not missing:
            return [
                f"{n}: not ready ({r.get('error') if r else 'QEMU exited'})"
                for n, r in reports.items()
                if r is None or not r.get("ready")
            ]
        await anyio.sleep(1)
    return [f"VMs not ready after {READY_TIMEOUT:g} s"]


def _run_playbook(
    root: Path, control: Path, vms: list[FleetVm], variables: dict[str, Any]
) -> int:
    hosts = {
        vm.name: {
            "ansible_host": "127.0.0.1",
            "ansible_port": vm.ssh_port,
            "liveupdate_metrics_instance": vm.instance,
        }
        for vm in vms
    }
    key = root / "id_ed25519"
    # Under TCG, with two cores for three VMs, a guest may take seconds to
    # accept a connection or answer a keep-alive.
    inventory = write_inventory(
        root / "inventory.json",
        hosts,
        key,
        control,
        connect_timeout=30,
        alive_interval=10,
    )
    (root / "vars.json").write_text(json.dumps(variables, indent=1))
    argv, env = ansible_playbook_command(
        root, ROLLOUT, inventory, "-e", f"@{root / 'vars.json'}"
    )
    env["ANSIBLE_TIMEOUT"] = "30"
    with (root / "ansible.log").open("w") as log:
        proc = subprocess.run(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            timeout=VM_TIMEOUT,
            check=False,
        )
    return proc.returncode


async def _rollout(
    root: Path,
    vms: list[FleetVm],
    done: dict[str, Result],
    target: str,
    prometheus: str,
) -> tuple[list[str], int | None]:
    """Wait for the VMs, run the play; tell every VM to finish, whatever happened."""
    try:
        errs = await _wait_ready(vms, done)
        if errs:
            return errs, None
        print(f"[fleet] every VM ready; ansible-playbook (log: {root}/ansible.log)")
        control = Path(tempfile.mkdtemp(prefix="luo-fleet-"))
        try:
            variables = rollout_vars(target, prometheus, root / "summary.json")
            rc = await anyio.to_thread.run_sync(
                _run_playbook, root, control, vms, variables
            )
        finally:
            shutil.rmtree(control, ignore_errors=True)
        return ([] if rc == 0 else [f"ansible-playbook exited {rc}"]), rc
    finally:
        for vm in vms:
            (vm.out / "finish").write_text("rollout over\n")


async def _fleet(
    kernel: Kernel, target: Kernel, root: Path, args: argparse.Namespace
) -> tuple[list[str], dict[str, Result], list[FleetVm]]:
    ports = _free_ports(2 * VMS)
    vms = [
        FleetVm(f"vm{i}", root / f"vm{i}", ports[2 * i], ports[2 * i + 1])
        for i in range(VMS)
    ]
    _keygen(root / "id_ed25519")
    scenarios = {vm.name: fleet_scenario(vm, args.fleet_mib) for vm in vms}
    for vm in vms:
        prepare_vm(vm, root / "id_ed25519", target, scenarios[vm.name])
    binary = shutil.which("prometheus")
    if binary is None:
        return ["prometheus is not installed (apt-get install -y prometheus)"], {}, vms
    done: dict[str, Result] = {}

    async def boot(vm: FleetVm) -> None:
        done[vm.name] = await anyio.to_thread.run_sync(
            lambda: run_scenario(
                scenarios[vm.name], kernel, out_dir=vm.out, echo=False, accel=args.accel
            )
        )
        print(f"[fleet] {vm.name}: QEMU exited after {done[vm.name].elapsed:.1f} s")

    (root / "prometheus").mkdir()
    with running_prometheus(
        # A scrape may take as long as its interval: a metrics endpoint in a
        # TCG guest sharing two cores with two others took more than 2 s to
        # answer, and the gate read that as the host down (up == 0).
        binary,
        root / "prometheus",
        [vm.instance for vm in vms],
        interval="5s",
    ) as server:
        async with anyio.create_task_group() as tg:
            for vm in vms:
                tg.start_soon(boot, vm)
            errs, _ = await _rollout(
                root, vms, done, kernel_release(target), server.url
            )
    return errs, done, vms


def report(
    errs: list[str],
    done: dict[str, Result],
    vms: list[FleetVm],
    root: Path,
    releases: tuple[str, str],
    mib: int,
) -> list[str]:
    failures = list(errs)
    summary = _read(root / "summary.json") or {}
    names = [vm.name for vm in vms]
    rows = {r.get("host"): r for r in summary.get("hosts", [])}
    section(f"fleet: {VMS} VMs, waves {list(WAVES)}, {mib} MiB each")
    print(f"  {'host':5} {'wave':>4} {'status':8} {'blackout':>9} {'number':>8}  qemu")
    for vm in vms:
        result = done.get(vm.name)
        if result is None:
            failures.append(f"{vm.name}: QEMU never ran")
            continue
        failures += [f"{vm.name}: {f}" for f in result.failures()]
        pre = _read(vm.out / "fleet-pre.json")
        post = _read(vm.out / "fleet-post.json")
        failures += check_host(vm.name, pre, post, releases=releases, size=mib << 20)
        row = rows.get(vm.name, {})
        # No "liveupdate number: N" line yet is 0, as check_host counts it.
        before = (pre or {}).get("liveupdate_number") or 0
        numbers = f"{before}->{(post or {}).get('liveupdate_number')}"
        blackout = row.get("blackout_s")
        shown = f"{float(blackout):8.1f}s" if blackout is not None else "        -"
        print(
            f"  {vm.name:5} {row.get('wave')!s:>4} {row.get('status')!s:8} "
            f"{shown} {numbers:>8}  {result.elapsed:.1f} s"
        )
    failures += check_summary(summary, names)
    for gate in summary.get("gates", []):
        print(f"  gate after wave {gate.get('wave')}: passed={gate.get('passed')}")
    print(
        f"  blackout p50 {summary.get('blackout_p50_s')} s, "
        f"max {summary.get('blackout_max_s')} s; out dir {root}"
    )
    return failures


def run_fleet(kernel: Kernel, args: argparse.Namespace) -> list[str]:
    section("fleet: target kernel")
    try:
        target = release_variant(kernel, LOCALVERSION)
        releases = (kernel_release(kernel), kernel_release(target))
    except (KernelBuildError, OSError) as exc:
        return [f"the target kernel could not be made: {exc}"]
    print(f"  boots {releases[0]} ({kernel.bzimage})")
    print(f"  target {releases[1]} ({target.bzimage})")
    root = new_out_dir(Scenario("fleet", stages=()))
    start = time.monotonic()
    errs, done, vms = anyio.run(_fleet, kernel, target, root, args)
    print(f"  fleet scenario: {time.monotonic() - start:.1f} s wall")
    return report(errs, done, vms, root, releases, args.fleet_mib)
