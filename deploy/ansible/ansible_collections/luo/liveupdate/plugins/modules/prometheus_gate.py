#!/usr/bin/python
# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: prometheus_gate
short_description: Pass only when Prometheus says a set of hosts is healthy
version_added: "0.1.0"
description:
  - Evaluates PromQL checks and firing alerts every O(interval) seconds, on the
    controller (an action plugin; this file holds its documentation), until
    O(successes) consecutive rounds pass, and fails when a check's value breaks
    its condition, an alert of interest fires, Prometheus answers with an error
    or cannot be reached, or O(timeout) passes first.
  - Every value seen is returned.
  - Errors from Prometheus (a bad query, for one) are returned verbatim.
requirements:
  - httpx (on the controller)
options:
  url:
    description: Prometheus's base URL, e.g. C(http://prometheus:9090).
    type: str
    required: true
  checks:
    description: PromQL checks; every sample of a check's result must meet its condition.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: A name for the check, in the results.
        type: str
        required: true
      query:
        description: An instant PromQL query.
        type: str
        required: true
      condition:
        description: C(OP NUMBER), OP one of C(<), C(<=), C(>), C(>=), C(==), C(!=).
        type: str
        required: true
      no_data:
        description:
          - What an empty result means. C(hold) keeps evaluating until the
            deadline, then fails; C(pass) counts as a success; C(fail) fails at once.
        type: str
        choices: [hold, pass, fail]
        default: hold
  alerts:
    description:
      - Firing alerts that fail the gate. An alert counts when its name
        matches O(alerts.name) and each label in O(alerts.labels) matches its regex.
    type: dict
    suboptions:
      name:
        description: Regex (full match) on C(alertname).
        type: str
        default: .*
      labels:
        description: Label name to regex (full match).
        type: dict
        default: {}
  interval:
    description: Seconds between two rounds.
    type: float
    default: 10
  successes:
    description: Consecutive passing rounds needed.
    type: int
    default: 3
  timeout:
    description: Seconds before the gate fails if it has not passed.
    type: float
    default: 300
  request_timeout:
    description: Seconds for each HTTP request.
    type: float
    default: 10
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
    details: Reads only; it runs in check mode too.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
author:
  - luo-orchestrator developers (@luo-orchestrator)
"""

EXAMPLES = r"""
- name: Gate on the wave's blackout and alerts
  luo.liveupdate.prometheus_gate:
    url: http://prometheus:9090
    checks:
      - name: blackout
        query: max(liveupdate_last_blackout_seconds{instance=~"web-0[12]:9731"})
        condition: "< 2"
      - name: no cancelled update
        query: sum(liveupdate_last_run_outcome{outcome="cancelled", instance=~"web-0[12]:9731"})
        condition: "== 0"
        no_data: pass
    alerts:
      name: LiveUpdate.*
      labels: {instance: "web-0[12]:9731"}
    interval: 5
    successes: 3
    timeout: 120
"""

RETURN = r"""
passed:
  description: Whether the gate passed.
  returned: always
  type: bool
rounds:
  description: Every round, with every value seen.
  returned: always
  type: list
  elements: dict
  sample:
    - at: 1796171898.8
      ok: true
      checks:
        - {name: blackout, ok: true, no_data: false, values: [{labels: {}, value: 0.87}]}
      alerts: []
reason:
  description: Why the gate failed.
  returned: when failed
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.luo.liveupdate.plugins.module_utils.liveupdate import (
    GATE_SPEC,
)


def main():
    module = AnsibleModule(argument_spec=GATE_SPEC, supports_check_mode=True)
    module.fail_json(
        msg="luo.liveupdate.prometheus_gate runs as an action plugin on the controller"
    )


if __name__ == "__main__":
    main()
