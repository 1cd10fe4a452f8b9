# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)
"""The prometheus_gate action: PromQL checks and firing alerts, on the controller."""

from __future__ import annotations

import operator
import re
import time

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase
from ansible_collections.luo.liveupdate.plugins.module_utils.liveupdate import (
    GATE_SPEC as ARGUMENT_SPEC,
)

try:
    import httpx
except ImportError:  # reported when the gate runs
    httpx = None

OPERATORS = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
CONDITION = re.compile(
    r"^\s*(<=|>=|==|!=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$"
)


class GateError(Exception):
    """Prometheus failed us: unreachable, or an error answer (said verbatim)."""


def _condition(text):
    m = CONDITION.match(text)
    if m is None:
        raise AnsibleError(
            "condition {!r}: expected OP NUMBER, OP one of {}".format(
                text, " ".join(OPERATORS)
            )
        )
    return OPERATORS[m.group(1)], float(m.group(2))


def _api(client, path, params=None):
    try:
        reply = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise GateError(
            f"Prometheus at {client.base_url} cannot be reached: {exc}"
        ) from exc
    try:
        body = reply.json()
    except ValueError as exc:
        raise GateError(
            f"Prometheus answered {reply.status_code} with no JSON: {reply.text[:500]}"
        ) from exc
    if body.get("status") != "success":
        raise GateError(
            "Prometheus: {}: {}".format(
                body.get("errorType", reply.status_code),
                body.get("error", reply.text[:500]),
            )
        )
    return body["data"]


def _value(sample):
    return float(sample["value"][1])


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True
        result = super().run(tmp, task_vars)
        params = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)[1]
        if httpx is None:
            raise AnsibleError(
                "prometheus_gate needs httpx on the controller (pip install httpx)"
            )
        checks = [(c, _condition(c["condition"])) for c in params["checks"]]
        alerts = params["alerts"]
        if not checks and alerts is None:
            raise AnsibleError("prometheus_gate: give at least one check or alerts")
        if alerts is not None:
            alerts = {
                "name": re.compile(alerts["name"]),
                "labels": {k: re.compile(str(v)) for k, v in alerts["labels"].items()},
            }
        rounds = []
        result.update(changed=False, passed=False, rounds=rounds)
        end = time.monotonic() + params["timeout"]
        streak = 0
        with httpx.Client(
            base_url=params["url"].rstrip("/"), timeout=params["request_timeout"]
        ) as client:
            while True:
                try:
                    verdict, holding = self._round(client, checks, alerts, rounds)
                except GateError as exc:
                    result.update(failed=True, reason=str(exc), msg=str(exc))
                    return result
                if verdict is not None:
                    result.update(
                        failed=True, reason=verdict, msg="gate failed: " + verdict
                    )
                    return result
                streak = 0 if holding else streak + 1
                if streak >= params["successes"]:
                    result.update(
                        passed=True, msg=f"gate passed: {streak} consecutive rounds"
                    )
                    return result
                if time.monotonic() + params["interval"] > end:
                    why = holding or "no verdict"
                    result.update(
                        failed=True,
                        reason="deadline: {} after {:g} s".format(
                            why, params["timeout"]
                        ),
                        msg="gate failed at its deadline ({:g} s): {}".format(
                            params["timeout"], why
                        ),
                    )
                    return result
                time.sleep(params["interval"])

    @staticmethod
    def _round(client, checks, alerts, rounds):
        """One round: (a failure that ends the gate or None, why it holds or None)."""
        record = {"at": time.time(), "ok": True, "checks": [], "alerts": []}
        rounds.append(record)
        failure = None
        holding = None
        for check, (op, bound) in checks:
            data = _api(client, "/api/v1/query", {"query": check["query"]})
            result = data["result"]
            if data.get("resultType") == "scalar":
                result = [{"metric": {}, "value": result}]
            values = [
                {"labels": s.get("metric", {}), "value": _value(s)} for s in result
            ]
            entry = {
                "name": check["name"],
                "query": check["query"],
                "values": values,
                "no_data": not values,
                "ok": True,
            }
            record["checks"].append(entry)
            if not values:
                if check["no_data"] == "fail":
                    entry["ok"] = False
                    failure = failure or "{}: no data (no_data: fail)".format(
                        check["name"]
                    )
                elif check["no_data"] == "hold":
                    entry["ok"] = False
                    holding = holding or "{}: no data".format(check["name"])
                continue
            bad = [v for v in values if not op(v["value"], bound)]
            if bad:
                entry["ok"] = False
                failure = failure or "{}: {} {} is false for {}".format(
                    check["name"],
                    bad[0]["value"],
                    check["condition"].strip(),
                    bad[0]["labels"] or "the result",
                )
        if alerts is not None:
            for alert in _api(client, "/api/v1/alerts")["alerts"]:
                labels = alert.get("labels", {})
                if alert.get("state") != "firing" or not alerts["name"].fullmatch(
                    labels.get("alertname", "")
                ):
                    continue
                if all(
                    r.fullmatch(str(labels.get(k, "")))
                    for k, r in alerts["labels"].items()
                ):
                    record["alerts"].append(labels)
            if record["alerts"]:
                failure = failure or "alert {} is firing".format(
                    record["alerts"][0].get("alertname")
                )
        record["ok"] = failure is None and holding is None
        return failure, holding
