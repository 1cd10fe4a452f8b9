#!/usr/bin/python
# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: live_update
short_description: Live-update one host's kernel through its luo-orchestrator agent
version_added: "0.1.0"
description:
  - Preflight on the host (C(liveupdate probe), the agent answering, the
    playbook valid and its next kernel present), then starts the update in the
    host's agent through its control API (C(liveupdate run --agent)), waits for
    the connection to drop at the kexec and for the host to come back with a
    new boot id and its liveupdate number one higher, then for the resume to
    end (state C(NORMAL), outcome C(completed)).
  - This is an action plugin, as M(ansible.builtin.reboot) is one; a module
    cannot outlive the kexec it causes. This file holds its documentation.
  - C(changed) only when a kexec happened. A host already running
    O(target_kernel) is C(ok) and unchanged, so running a stopped rollout again
    resumes it.
  - An update cancelled before the kexec fails the host with the reason; the
    host is back in C(NORMAL) and was not rebooted.
  - A host whose agent already runs an update (another rollout holds it) fails
    with RV(locked) true and a message saying so; the running update goes on.
    It is seen at preflight, or, when two rollouts race past preflight, by the
    agent's refusal (C(liveupdate run) exits 7, the agent answered 409
    C(update_running)).
options:
  playbook:
    description: The luo-orchestrator playbook on the host.
    type: path
    required: true
  target_kernel:
    description:
      - The release (C(uname -r)) the playbook's next kernel boots. A host
        already running it is left alone.
    type: str
  liveupdate_command:
    description: The C(liveupdate) command on the host.
    type: str
    default: liveupdate
  kernel:
    description: C(real) or C(sim:DIR); default the host's C($LIVEUPDATE_KERNEL) or C(real).
    type: str
  state_dir:
    description: The journal's directory on the host.
    type: str
    default: /var/lib/liveupdate
  control_socket:
    description: The agent's control socket.
    type: str
    default: /run/liveupdate/control.sock
  reboot_timeout:
    description: Seconds for the host to come back after the kexec; past it the host fails.
    type: int
    default: 600
  resume_timeout:
    description: Seconds, once back, for the resume to end.
    type: int
    default: 300
  poll_interval:
    description: Seconds between two looks at a host coming back.
    type: float
    default: 1.0
  not_after:
    description:
      - The end of the maintenance window, ISO 8601 (C(2026-12-02T04:00:00+00:00);
        without a time zone, UTC). A host is not started after it; the task
        is skipped with RV(not_started) true and the host is untouched.
    type: str
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: partial
    details: Runs the preflight and C(liveupdate plan) only; reports C(changed) when an update would run.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
notes:
  - The host needs the C(liveupdate) command and its agent (C(liveupdate agent)).
seealso:
  - module: luo.liveupdate.liveupdate_facts
  - module: luo.liveupdate.prometheus_gate
author:
  - luo-orchestrator developers (@luo-orchestrator)
"""

EXAMPLES = r"""
- name: Live-update to 7.2.13-luo
  luo.liveupdate.live_update:
    playbook: /etc/liveupdate/playbook.yaml
    target_kernel: 7.2.13-luo
    reboot_timeout: 300
    not_after: "2026-12-02T04:00:00+00:00"
  register: update

- name: Show the blackout
  ansible.builtin.debug:
    msg: "{{ update.blackout_s }} s"
"""

RETURN = r"""
outcome:
  description: C(completed), C(cancelled), C(failed), C(already current), C(not started) or C(planned) (check mode).
  returned: always
  type: str
  sample: completed
blackout_s:
  description: Seconds the workloads were paused (freeze to running again).
  returned: when changed
  type: float
  sample: 0.87
phases:
  description: Seconds per phase.
  returned: when an update ran
  type: dict
  sample: {quiesce: 0.001, preserve: 0.002, prepare: 0.001, freeze: 0.001, kexec: 0.7, restore: 0.05, finish: 0.01}
plugin_blackouts:
  description: The longest pause of each plugin's workloads (e.g. the VMs of the qemu plugin).
  returned: when changed
  type: dict
  sample: {qemu: 0.41}
vm_blackouts:
  description: Each VM's pause, QMP stop to cont, in seconds, by VM name (the qemu plugin's VMs).
  returned: when changed
  type: dict
  sample: {vm0: 0.41, vm1: 0.38}
boot_id_before:
  description: The boot id before the update.
  returned: always
  type: str
boot_id_after:
  description: The boot id after it.
  returned: when changed
  type: str
liveupdate_number:
  description: The host's liveupdate number after the task.
  returned: always
  type: int
running_kernel:
  description: The release running after the task.
  returned: always
  type: str
elapsed:
  description: Seconds from the start of the update to the end of the resume.
  returned: when changed
  type: float
cancelled:
  description: The update was cancelled before the kexec; the host is back in NORMAL, not rebooted.
  returned: when failed
  type: bool
locked:
  description: Another update runs on the host (its agent holds the host lock).
  returned: when failed
  type: bool
not_started:
  description: The maintenance window had closed (O(not_after)).
  returned: always
  type: bool
plan:
  description: C(liveupdate plan)'s output.
  returned: in check mode
  type: str
preflight:
  description: The host's C(liveupdate) facts before the update (see M(luo.liveupdate.liveupdate_facts)).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luo.liveupdate.plugins.module_utils.liveupdate import (
    LIVE_UPDATE_SPEC,
)


def main():
    module = AnsibleModule(argument_spec=LIVE_UPDATE_SPEC, supports_check_mode=True)
    module.fail_json(
        msg="luo.liveupdate.live_update runs as an action plugin; it cannot run as a module"
    )


if __name__ == "__main__":
    main()
