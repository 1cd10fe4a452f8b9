"""Guest side of the ``contract`` VM scenario: the kernel-contract suite on /dev/liveupdate.

``python -m tests.vm.contract_guest BOOT`` (BOOT = 0, 1, 2: the kexecs so far)

* boot 0: ``python -m tests.contract.stage --kernel real --carry CARRY --boot 0
  --kexec $LUO_VM_KERNEL --cmdline $LUO_VM_NEXT_CMDLINE`` (exec'd: that process
  keeps the sessions open and kexecs);
* boot 1: pytest ``tests/contract --luo-kernel=real --luo-carry CARRY
  --luo-boot 1`` (every one-boot test, and the last stage of every 2-stage
  scenario), junit XML to ``$LUO_VM_OUT/contract-boot1.xml``; then the stage
  runner for boot 1 (the 3-stage scenarios), which kexecs;
* boot 2: pytest again with ``--luo-boot 2``.

The host's ``/`` is read-only here: no cache provider, ``--basetemp`` on the
tmpfs ``/tmp``, no bytecode (PYTHONDONTWRITEBYTECODE is set by the init).
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.vm.guest import mark, out_dir


def carry_path() -> str:
    return str(out_dir() / "carry.json")


def stage_argv(boot: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.contract.stage",
        "--kernel",
        "real",
        "--carry",
        carry_path(),
        "--boot",
        str(boot),
        "--kexec",
        os.environ["LUO_VM_KERNEL"],
        "--cmdline",
        os.environ["LUO_VM_NEXT_CMDLINE"],
    ]


def pytest_argv(boot: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "tests/contract",
        "--luo-kernel=real",
        "--luo-carry",
        carry_path(),
        "--luo-boot",
        str(boot),
        "-p",
        "no:cacheprovider",
        "--basetemp",
        f"/tmp/pytest-boot{boot}",
        "-q",
        "--color=no",
        "--junitxml",
        str(out_dir() / f"contract-boot{boot}.xml"),
    ]


def run_pytest(boot: int) -> int:
    mark(f"contract.pytest{boot}.start")
    rc = subprocess.run(pytest_argv(boot), check=False).returncode
    mark(f"contract.pytest{boot}.end", rc=rc)
    print(f"contract: pytest in boot {boot} exited with {rc}", flush=True)
    return rc


def main(argv: list[str]) -> int:
    boot = int(argv[0]) if argv else 0
    if boot >= 1:
        rc = run_pytest(boot)
        if boot >= 2:
            return rc
    mark(f"contract.stage{boot}.start")
    args = stage_argv(boot)
    os.execv(args[0], args)  # this process holds the sessions and kexecs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
