# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)
"""The ``window_closed`` filter: whether a maintenance window has ended."""

from __future__ import annotations

import datetime

from ansible.errors import AnsibleFilterError

DOCUMENTATION = r"""
name: window_closed
short_description: Whether a maintenance window has closed
version_added: "0.1.0"
description:
  - True once the controller's clock is past the window's end, an ISO 8601
    time; a time without an offset is UTC. The same test as
    M(luo.liveupdate.live_update)'s O(luo.liveupdate.live_update#module:not_after).
options:
  _input:
    description: The end of the window, ISO 8601.
    type: str
    required: true
"""

EXAMPLES = r"""
- name: Stop before a wave once the window has closed
  ansible.builtin.set_fact:
    stop: "{{ '2026-12-02T05:00:00+00:00' | luo.liveupdate.window_closed }}"
"""

RETURN = r"""
_value:
  description: Whether the window has closed.
  type: bool
"""


def window_end(not_after):
    """The window's end as an aware datetime (UTC when no offset is given)."""
    try:
        end = datetime.datetime.fromisoformat(str(not_after))
    except ValueError as exc:
        raise AnsibleFilterError(
            f"not_after: {not_after} is not an ISO 8601 time ({exc})"
        ) from exc
    if end.tzinfo is None:
        end = end.replace(tzinfo=datetime.UTC)
    return end


def window_closed(not_after):
    return datetime.datetime.now(datetime.UTC) > window_end(not_after)


class FilterModule:
    def filters(self):
        return {"window_closed": window_closed}
