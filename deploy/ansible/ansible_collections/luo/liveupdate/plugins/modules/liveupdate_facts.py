#!/usr/bin/python
# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: liveupdate_facts
short_description: What a host can do for a live update, and how its last one went
version_added: "0.1.0"
description:
  - Runs C(liveupdate probe --json) and C(liveupdate status --json) on the host
    and asks the agent's control API whether it runs and updates, and returns
    them as the C(liveupdate) fact.
  - Changes nothing on the host.
options:
  liveupdate_command:
    description: The C(liveupdate) command on the host.
    type: str
    default: liveupdate
  kernel:
    description:
      - The kernel to probe, C(real) or C(sim:DIR) (a simulated kernel).
      - Default C($LIVEUPDATE_KERNEL) on the host, else C(real).
    type: str
  state_dir:
    description: The journal's directory on the host.
    type: str
    default: /var/lib/liveupdate
  control_socket:
    description: The agent's control socket.
    type: str
    default: /run/liveupdate/control.sock
  target_kernel:
    description:
      - The release (C(uname -r)) the rollout installs; C(target_running) tells
        whether it already runs.
    type: str
  kinds:
    description: Also try each kind of file on a scratch session (slower).
    type: bool
    default: false
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
    support: full
author:
  - luo-orchestrator developers (@luo-orchestrator)
"""

EXAMPLES = r"""
- name: Read the live update facts
  luo.liveupdate.liveupdate_facts:
    target_kernel: 7.2.13-luo

- name: Show whether a live update is possible
  ansible.builtin.debug:
    msg: "{{ ansible_facts.liveupdate.possible }} {{ ansible_facts.liveupdate.reason }}"
"""

RETURN = r"""
ansible_facts:
  description: The facts.
  returned: always
  type: complex
  contains:
    liveupdate:
      description: What C(liveupdate probe) and C(liveupdate status) say.
      returned: always
      type: dict
      sample:
        possible: true
        reason: null
        abi: merged
        preservable_kinds: [memfd]
        running_kernel: 7.2.12-luo
        boot_id: 33d2c95f-b000-bccf-e9f0-cf619250372c
        liveupdate_number: 1
        kexec_loaded: false
        agent_running: true
        agent_error: null
        agent_updating: false
        last_update: {run_id: 853668b1f4b9, state: NORMAL, outcome: completed, error: null,
                      blackout_s: 0.87, phases: {}, plugin_blackouts: {}, vm_blackouts: {}, interrupted: false,
                      next_command: null}
        target_kernel: 7.2.13-luo
        target_running: false
"""

import json

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luo.liveupdate.plugins.module_utils.liveupdate import (
    COMMON_OPTIONS,
    agent_status,
    facts_from,
    probe_argv,
    status_argv,
)


def main():
    spec = dict(COMMON_OPTIONS)
    spec.update(target_kernel={"type": "str"}, kinds={"type": "bool", "default": False})
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    params = module.params
    if module.get_bin_path(params["liveupdate_command"]) is None:
        module.fail_json(
            msg=f"the liveupdate command {params['liveupdate_command']!r} is not "
            "on this host (not a path, nor on its PATH): install luo-orchestrator, "
            "or name the command with liveupdate_command"
        )
    rc, out, err = module.run_command(probe_argv(params, kinds=params["kinds"]))
    if rc not in (0, 3, 4):
        module.fail_json(
            msg=f"liveupdate probe failed (exit {rc}): {err.strip() or out.strip()}",
            rc=rc,
        )
    try:
        probe = json.loads(out)
    except ValueError:
        module.fail_json(
            msg="liveupdate probe printed no JSON: %s" % (err.strip() or out.strip())
        )
    rc, out, err = module.run_command(status_argv(params))
    if rc != 0:
        module.fail_json(
            msg=f"liveupdate status failed (exit {rc}): {err.strip() or out.strip()}",
            rc=rc,
        )
    status = json.loads(out)
    agent, agent_error = agent_status(params["control_socket"])
    facts = facts_from(probe, status, agent, agent_error, params["target_kernel"])
    module.exit_json(changed=False, ansible_facts={"liveupdate": facts})


if __name__ == "__main__":
    main()
