# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)
"""The ``waves`` filter: a wave schedule as lists of hosts."""

from __future__ import annotations

import math

from ansible.errors import AnsibleFilterError

DOCUMENTATION = r"""
name: waves
short_description: Split hosts into rollout waves
version_added: "0.1.0"
description:
  - Splits a list of hosts into waves by a schedule, as a play's C(serial) does
    batches; each entry is a count of hosts or a percentage of all of them
    (rounded up, at least one), and the last entry repeats until every host is
    in a wave.
options:
  _input:
    description: The hosts, in rollout order.
    type: list
    elements: str
    required: true
  schedule:
    description: Wave sizes, e.g. C([1, "10%", "50%", "100%"]).
    type: list
    required: true
"""

EXAMPLES = r"""
- name: Four waves
  ansible.builtin.debug:
    msg: "{{ ansible_play_hosts_all | luo.liveupdate.waves([1, '10%', '50%', '100%']) }}"
"""

RETURN = r"""
_value:
  description: The waves, each a list of hosts.
  type: list
  elements: list
"""


def _size(entry, total):
    if isinstance(entry, bool):
        raise AnsibleFilterError(f"waves: {entry!r} is not a count or a percentage")
    if isinstance(entry, int):
        size = entry
    elif isinstance(entry, str) and entry.strip().endswith("%"):
        try:
            percent = float(entry.strip()[:-1])
        except ValueError as exc:
            raise AnsibleFilterError(f"waves: {entry!r} is not a percentage") from exc
        if not 0 < percent <= 100:
            raise AnsibleFilterError(f"waves: {entry!r} is not in (0%, 100%]")
        size = math.ceil(total * percent / 100)
    elif isinstance(entry, str) and entry.strip().isdigit():
        size = int(entry)
    else:
        raise AnsibleFilterError(f"waves: {entry!r} is not a count or a percentage")
    if size < 1:
        raise AnsibleFilterError(f"waves: {entry!r} makes an empty wave")
    return size


def waves(hosts, schedule):
    hosts = list(hosts)
    if not schedule:
        raise AnsibleFilterError("waves: the schedule is empty")
    out = []
    done = 0
    i = 0
    while done < len(hosts):
        size = _size(schedule[min(i, len(schedule) - 1)], len(hosts))
        out.append(hosts[done : done + size])
        done += size
        i += 1
    return out


class FilterModule:
    def filters(self):
        return {"waves": waves}
