# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)
"""What the modules of luo.liveupdate share: the ``liveupdate`` command line
and the agent's control API, read on the managed host with the standard
library only."""

from __future__ import annotations

import json
import os
import socket

DEFAULT_COMMAND = "liveupdate"
DEFAULT_STATE_DIR = "/var/lib/liveupdate"
DEFAULT_CONTROL = "/run/liveupdate/control.sock"

COMMON_OPTIONS = {
    "liveupdate_command": {"type": "str", "default": DEFAULT_COMMAND},
    "kernel": {"type": "str"},
    "state_dir": {"type": "str", "default": DEFAULT_STATE_DIR},
    "control_socket": {"type": "str", "default": DEFAULT_CONTROL},
}


def probe_argv(params, kinds=False):
    argv = [params["liveupdate_command"], "probe", "--json"]
    if params.get("kernel"):
        argv += ["--kernel", params["kernel"]]
    if not kinds:
        argv.append("--no-kinds")
    return argv


def status_argv(params):
    return [
        params["liveupdate_command"],
        "status",
        "--json",
        "--state-dir",
        params["state_dir"],
    ]


def agent_status(path, timeout=10.0):
    """``GET /v1/status`` on the agent's control socket: (answer or None, error)."""
    if not os.path.exists(path):
        return None, f"no control socket at {path} (is the agent running?)"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(
            b"GET /v1/status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        return None, f"the agent does not answer on {path}: {exc}"
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200 " not in status_line + " ":
        return None, "the agent answered {}: {}".format(
            status_line,
            body[:500].decode("utf-8", "replace"),
        )
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    try:
        return json.loads(body), None
    except ValueError as exc:
        return None, f"the agent sent a malformed answer: {exc}"


def _unchunk(body):
    out = []
    while body:
        size_line, _sep, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(body[:size])
        body = body[size + 2 :]
    return b"".join(out)


def facts_from(probe, status, agent, agent_error, target_kernel=None):
    """The ``liveupdate`` facts from probe's and status's JSON and the agent's answer."""
    kinds = [k["kind"] for k in probe.get("kinds") or [] if k.get("preservable")]
    running = probe.get("running_kernel")
    return {
        "possible": bool(probe.get("possible")),
        "reason": probe.get("reason") or None,
        "abi": probe.get("abi"),
        "preservable_kinds": kinds,
        "running_kernel": running,
        "boot_id": probe.get("boot_id"),
        "liveupdate_number": int(probe.get("liveupdate_number") or 0),
        "kexec_loaded": bool(probe.get("kexec_loaded")),
        "agent_running": agent is not None,
        "agent_error": agent_error,
        "agent_updating": bool(agent and agent.get("agent", {}).get("updating")),
        "last_update": {
            "run_id": status.get("run_id"),
            "state": status.get("state"),
            "outcome": status.get("outcome"),
            "error": status.get("error"),
            "blackout_s": status.get("blackout_s"),
            "phases": status.get("phases") or {},
            "plugin_blackouts": status.get("plugin_blackouts") or {},
            "vm_blackouts": status.get("vm_blackouts") or {},
            "interrupted": bool(status.get("interrupted")),
            "next_command": status.get("next_command"),
        },
        "target_kernel": target_kernel,
        "target_running": None if not target_kernel else running == target_kernel,
    }


LIVE_UPDATE_SPEC = {
    "playbook": {"type": "path", "required": True},
    "target_kernel": {"type": "str"},
    "liveupdate_command": {"type": "str", "default": DEFAULT_COMMAND},
    "kernel": {"type": "str"},
    "state_dir": {"type": "str", "default": DEFAULT_STATE_DIR},
    "control_socket": {"type": "str", "default": DEFAULT_CONTROL},
    "reboot_timeout": {"type": "int", "default": 600},
    "resume_timeout": {"type": "int", "default": 300},
    "poll_interval": {"type": "float", "default": 1.0},
    "not_after": {"type": "str"},
}
"""The options of the live_update action (its module file documents them)."""

GATE_SPEC = {
    "url": {"type": "str", "required": True},
    "checks": {
        "type": "list",
        "elements": "dict",
        "default": [],
        "options": {
            "name": {"type": "str", "required": True},
            "query": {"type": "str", "required": True},
            "condition": {"type": "str", "required": True},
            "no_data": {
                "type": "str",
                "choices": ["hold", "pass", "fail"],
                "default": "hold",
            },
        },
    },
    "alerts": {
        "type": "dict",
        "options": {
            "name": {"type": "str", "default": ".*"},
            "labels": {"type": "dict", "default": {}},
        },
    },
    "interval": {"type": "float", "default": 10.0},
    "successes": {"type": "int", "default": 3},
    "timeout": {"type": "float", "default": 300.0},
    "request_timeout": {"type": "float", "default": 10.0},
}
"""The options of the prometheus_gate action (its module file documents them)."""
