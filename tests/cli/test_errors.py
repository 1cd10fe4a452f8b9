"""Hostile input: every expected failure is one line on stderr and a documented
exit code, never a traceback (issue #10)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._util import liveupdate, one_line, sim_init, write_playbook


def test_version() -> None:
    done = liveupdate("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("liveupdate 0.")


def test_help_documents_every_exit_code() -> None:
    import orchestrator.cli

    text = " ".join(liveupdate("--help").stdout.split())
    for code in ("0 ok", "1 failed", "2 bad usage", "3 not possible here"):
        assert code in text
    assert "4 device busy" in text
    assert "5 update cancelled" in text
    assert "141 output closed early" in text
    doc = orchestrator.cli.__doc__ or ""
    for code in ("- 0:", "- 1:", "- 2:", "- 3:", "- 4:", "- 5:", "130", "141"):
        assert code in doc


def test_metrics_serve_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = liveupdate(
            "metrics",
            "serve",
            "--state-dir",
            str(tmp_path),
            "--listen",
            f"127.0.0.1:{port}",
            timeout=60,
        )
    assert done.returncode == 1
    assert "Address already in use" in one_line(done)


def test_output_closed_early_is_quiet(tmp_path: Path) -> None:
    """``liveupdate status --json | head -0``: no BrokenPipeError traceback."""
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "status",
            "--state-dir",
            str(tmp_path),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        child.stdout.close()  # the reader is gone before the first write
        err = child.stderr.read().decode()
        assert child.wait(timeout=60) == 141
    assert err == ""


def cancelling_playbook(tmp_path: Path, state: Path) -> Path:
    return write_playbook(
        tmp_path / "fail.yaml",
        {"quiesce": {"steps": [{"plugin": "faults", "with": {"fail": "no"}}]}},
        kernel=sim_init(tmp_path / "k"),
        state_dir=str(state),
    )


def test_journal_that_is_not_a_file(tmp_path: Path) -> None:
    """A journal that is a device (here /dev/full: endless zeros to read,
    ENOSPC to write) is refused up front, not read forever. A really full
    disk is in tests/engine/test_reliability.py."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal.jsonl").symlink_to("/dev/full")
    done = liveupdate("run", str(cancelling_playbook(tmp_path, state)), "--no-agent")
    assert done.returncode == 1
    assert "journal.jsonl: not a regular file" in one_line(done)


def test_state_dir_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    done = liveupdate("run", str(cancelling_playbook(tmp_path, state)), "--no-agent")
    assert done.returncode == 1
    assert f"{state}: Not a directory [ENOTDIR]" in one_line(done)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only dirs")
def test_read_only_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "ro"
    state.mkdir(mode=0o500)
    done = liveupdate("run", str(cancelling_playbook(tmp_path, state)), "--no-agent")
    assert done.returncode == 1
    assert "Permission denied [EACCES]" in one_line(done)


def hanging(tmp_path: Path, *, step: str, phase: str | None = None) -> Path:
    quiesce: dict[str, object] = {
        "steps": [{"plugin": "faults", "timeout": step, "with": {"hang": 30}}]
    }
    if phase is not None:
        quiesce["timeout"] = phase
    return write_playbook(
        tmp_path / "hang.yaml",
        {"quiesce": quiesce},
        kernel=sim_init(tmp_path / "k"),
        state_dir=str(tmp_path / "state"),
    )


@pytest.mark.parametrize(
    ("step", "phase", "expected"),
    [
        pytest.param(
            "200ms",
            None,
            "phase quiesce, step faults: timed out after 0.2 s",
            id="step-timeout-no-phase-budget",
        ),
        pytest.param(
            "200ms",
            "20s",
            "phase quiesce, step faults: timed out after 0.2 s",
            id="step-timeout-within-phase-budget",
        ),
        pytest.param(
            "20s",
            "300ms",
            "phase quiesce, step *: exceeded its budget of 0.3 s",
            id="phase-budget",
        ),
    ],
)
def test_timeouts_say_whose(
    tmp_path: Path, step: str, phase: str | None, expected: str
) -> None:
    done = liveupdate("run", str(hanging(tmp_path, step=step, phase=phase)))
    assert done.returncode == 5, done.stdout + done.stderr
    assert f"error: {expected}" in done.stdout
    assert "TypeError" not in done.stdout + done.stderr
    if phase is None or step == "200ms":
        assert "budget" not in done.stdout


def test_signal_mid_step_names_no_library_internals(tmp_path: Path) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            str(hanging(tmp_path, step="60s")),
            "--no-agent",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:  # wait until the hanging step runs
            if line.startswith("> quiesce"):
                break
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    assert child.returncode == 5
    assert "quiesce FAILED: cancelled" in out
    assert "cancelled by SIGTERM" in out
    assert "cancel scope" not in out


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["sim", "fault", "{dir}", "freeze", "EIO"], id="sim-fault"),
        pytest.param(["probe", "--kernel", "sim:{dir}"], id="probe-kernel"),
        pytest.param(["probe"], id="probe-env"),
        pytest.param(["run", "{playbook}", "--kernel", "sim:{dir}"], id="run"),
    ],
)
def test_a_missing_simulated_kernel_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "typo"
    playbook = write_playbook(
        tmp_path / "p.yaml", {"quiesce": {"steps": [{"plugin": "faults"}]}}
    )
    args = [a.format(dir=missing, playbook=playbook) for a in command]
    done = liveupdate(*args, env={"LIVEUPDATE_KERNEL": f"sim:{missing}"})
    assert done.returncode == 2
    assert f"create one with 'liveupdate sim init {missing}'" in one_line(done)
    assert not missing.exists()


def test_only_sim_init_creates_a_simulated_kernel(tmp_path: Path) -> None:
    spec = sim_init(tmp_path / "k")
    done = liveupdate("sim", "fault", str(tmp_path / "k"), "freeze", "EIO")
    assert done.returncode == 0, done.stderr
    assert liveupdate("probe", "--kernel", spec, "--no-kinds").returncode == 0


def test_unknown_kernel_is_bad_usage() -> None:
    done = liveupdate("probe", "--kernel", "bogus")
    assert done.returncode == 2
    assert "unknown kernel 'bogus'" in one_line(done)


@pytest.mark.skipif(Path("/dev/liveupdate").exists(), reason="this host has LUO")
def test_run_without_luo_says_why_and_journals_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    playbook = write_playbook(
        tmp_path / "p.yaml",
        {"quiesce": {"steps": [{"plugin": "faults"}]}},
        state_dir=str(state),
    )
    done = liveupdate("run", str(playbook), "--kernel", "real", "--no-agent")
    assert done.returncode == 3
    line = one_line(done)
    assert "no /dev/liveupdate" in line
    assert "FileNotFoundError" not in line
    assert not state.exists(), "nothing journaled"


def test_run_on_a_busy_device(tmp_path: Path) -> None:
    from orchestrator.luo import LiveUpdateDevice
    from orchestrator.luo.sim import SimKernel

    kernel = SimKernel.existing(Path(sim_init(tmp_path / "k")[4:]))
    playbook = cancelling_playbook(tmp_path, tmp_path / "state")
    with LiveUpdateDevice.open(kernel):
        done = liveupdate("run", str(playbook), "--kernel", kernel.spec, "--no-agent")
    assert done.returncode == 4
    assert "another process holds /dev/liveupdate" in one_line(done)
    assert not (tmp_path / "state").exists()


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """A state dir whose journal holds one (cancelled) update."""
    state = tmp_path / "state"
    done = liveupdate("run", str(cancelling_playbook(tmp_path, state)), "--no-agent")
    assert done.returncode == 5, done.stdout + done.stderr
    return state


def test_metrics_textfile_needs_a_journal(tmp_path: Path, journal: Path) -> None:
    out = tmp_path / "x.prom"
    for state, why in (
        (tmp_path / "typo", "no such directory"),
        (tmp_path, "no journal"),
    ):
        done = liveupdate(
            "metrics", "textfile", "--state-dir", str(state), "--output", str(out)
        )
        assert done.returncode == 2
        assert why in one_line(done)
        assert not out.exists()
    done = liveupdate(
        "metrics", "textfile", "--state-dir", str(journal), "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "liveupdate_" in out.read_text()


def test_report_writes_the_format_its_name_says(tmp_path: Path, journal: Path) -> None:
    state = ["--state-dir", str(journal)]
    svg, html, png = tmp_path / "t.svg", tmp_path / "t.html", tmp_path / "t.png"
    assert liveupdate("report", *state, "--output", str(svg)).returncode == 0
    assert svg.read_text().startswith("<svg")
    assert liveupdate("report", *state, "--output", str(html)).returncode == 0
    assert html.read_text().startswith("<!DOCTYPE html>")
    done = liveupdate("report", *state, "--output", str(png))
    try:
        import cairosvg  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError):
        assert done.returncode == 2
        assert "needs cairosvg" in one_line(done)
    else:
        assert done.returncode == 0, done.stderr
        assert png.read_bytes().startswith(b"\x89PNG")


def test_report_refuses_an_unknown_suffix(tmp_path: Path, journal: Path) -> None:
    out = tmp_path / "t.jpg"
    done = liveupdate("report", "--state-dir", str(journal), "--output", str(out))
    assert done.returncode == 2
    assert "FILE.svg, FILE.html or FILE.png" in one_line(done)
    assert not out.exists()
    assert done.stdout == ""


def test_report_of_a_missing_state_dir(tmp_path: Path) -> None:
    done = liveupdate("report", "--state-dir", str(tmp_path / "typo"))
    assert done.returncode == 2
    assert "no such directory" in one_line(done)


def test_the_command_raises_its_soft_fd_limit_to_the_hard_one() -> None:
    """256 VMs x 4 memfds are more files than the usual soft limit of 1,024:
    the engine and the keeper (which inherits the limit) must be able to hold
    them all."""
    probe = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from orchestrator.cli import _more_fds\n"
        "_more_fds()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    soft, hard = map(int, done.stdout.split())
    assert soft == hard
