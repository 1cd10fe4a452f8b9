# Copyright: luo-orchestrator developers
# Apache License 2.0 (see LICENSE in luo-orchestrator)
"""The live_update action: one host's live update, across its kexec."""

from __future__ import annotations

import shlex
import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible_collections.luo.liveupdate.plugins.filter.window_closed import (
    window_closed,
)
from ansible_collections.luo.liveupdate.plugins.module_utils.liveupdate import (
    LIVE_UPDATE_SPEC as ARGUMENT_SPEC,
)

display = Display()

FACTS = "luo.liveupdate.liveupdate_facts"
EXIT_CANCELLED = 5
# liveupdate run: the agent answered 409 "code": "update_running" (the host lock)
EXIT_UPDATING = 7
LOCKED = (
    "another update is running on this host (its agent holds the host lock "
    "until that update ends); this one was not started and the running one "
    "goes on"
)

FACT_OPTIONS = (
    "liveupdate_command",
    "kernel",
    "state_dir",
    "control_socket",
    "target_kernel",
)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _facts(self, task_vars, params):
        args = {k: params[k] for k in FACT_OPTIONS if params.get(k) is not None}
        result = self._execute_module(
            module_name=FACTS, module_args=args, task_vars=task_vars, wrap_async=False
        )
        if result.get("unreachable"):
            raise AnsibleConnectionFailure(result.get("msg", "unreachable"))
        if result.get("failed"):
            raise AnsibleError(result.get("msg", "liveupdate_facts failed"))
        return result["ansible_facts"]["liveupdate"]

    def _shell(self, argv):
        return self._low_level_execute_command(" ".join(shlex.quote(a) for a in argv))

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True
        result = super().run(tmp, task_vars)
        params = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)[1]
        result.update(changed=False, not_started=False, cancelled=False, locked=False)

        before = self._facts(task_vars, params)
        result.update(
            preflight=before,
            boot_id_before=before["boot_id"],
            liveupdate_number=before["liveupdate_number"],
            running_kernel=before["running_kernel"],
        )
        if before["target_running"] and before["last_update"]["state"] in (
            None,
            "NORMAL",
        ):
            result.update(
                outcome="already current",
                msg="{} already runs".format(params["target_kernel"]),
            )
            return result
        if params["not_after"] and window_closed(params["not_after"]):
            result.update(
                skipped=True,
                not_started=True,
                outcome="not started",
                msg="the maintenance window closed at {}: not started, the host is untouched".format(
                    params["not_after"]
                ),
            )
            return result
        problem = self._preflight(before, params)
        if problem:
            result.update(
                failed=True, outcome="not started", msg="preflight: " + problem
            )
            if before["agent_updating"]:
                result["locked"] = True
            return result
        plan = self._shell([params["liveupdate_command"], "plan", params["playbook"]])
        if plan["rc"] != 0:
            result.update(
                failed=True,
                outcome="not started",
                msg="preflight: liveupdate plan {} refused it: {}".format(
                    params["playbook"], (plan["stderr"] or plan["stdout"]).strip()
                ),
            )
            return result
        image = self._next_image(plan["stdout"])
        if image is not None and self._shell(["test", "-r", image])["rc"] != 0:
            result.update(
                failed=True,
                outcome="not started",
                msg=f"preflight: the next kernel {image} is not on the host",
            )
            return result
        if self._task.check_mode:
            result.update(
                changed=True,
                outcome="planned",
                plan=plan["stdout"],
                msg="check mode: the update would run",
            )
            return result
        return self._update(result, before, params, task_vars)

    @staticmethod
    def _preflight(facts, params):
        if not facts["possible"]:
            return facts["reason"] or "live update is not possible here"
        if facts["last_update"]["interrupted"]:
            return "an earlier update never ended; finish or cancel it with: {}".format(
                facts["last_update"]["next_command"]
            )
        if not facts["agent_running"]:
            return facts["agent_error"] or "the agent does not answer"
        if facts["agent_updating"]:
            return LOCKED
        return None

    @staticmethod
    def _next_image(plan_out):
        for line in plan_out.splitlines():
            if line.startswith("next kernel "):
                return line.split()[2]
        return None

    def _update(self, result, before, params, task_vars):
        start = time.monotonic()
        argv = [
            params["liveupdate_command"],
            "run",
            params["playbook"],
            "--agent",
            params["control_socket"],
        ]
        try:
            run = self._shell(argv)
        except AnsibleConnectionFailure as exc:
            display.vvv(
                f"live_update: the connection dropped ({exc}): the kexec is under way"
            )
            run = {"rc": 255, "stdout": "", "stderr": str(exc)}
        if run["rc"] not in (0, 255):
            return self._refused(result, run, params, task_vars)
        after = self._wait_for_boot(before, params, task_vars)
        final = self._wait_for_resume(after, params, task_vars)
        last = final["last_update"]
        result.update(
            changed=True,
            outcome=last["outcome"],
            blackout_s=last["blackout_s"],
            phases=last["phases"],
            plugin_blackouts=last["plugin_blackouts"],
            vm_blackouts=last.get("vm_blackouts") or {},
            boot_id_after=final["boot_id"],
            liveupdate_number=final["liveupdate_number"],
            running_kernel=final["running_kernel"],
            elapsed=round(time.monotonic() - start, 3),
        )
        if last["outcome"] != "completed":
            result.update(
                failed=True,
                msg="the resume after the kexec ended {}: {}".format(
                    last["outcome"], last["error"]
                ),
            )
        else:
            result["msg"] = "live-updated to {}, blackout {:.3f} s".format(
                final["running_kernel"],
                last["blackout_s"] or 0.0,
            )
        return result

    def _refused(self, result, run, params, task_vars):
        """The update ended before any kexec: cancelled, or never started."""
        if run["rc"] == EXIT_UPDATING:
            # Told by the exit code alone: the journal now shows the other
            # update, which is not this task's to report.
            result.update(failed=True, locked=True, outcome="not started", msg=LOCKED)
            return result
        facts = self._facts(task_vars, params)
        last = facts["last_update"]
        said = (run["stderr"] or run["stdout"]).strip()
        result.update(
            failed=True,
            liveupdate_number=facts["liveupdate_number"],
            running_kernel=facts["running_kernel"],
        )
        if run["rc"] == EXIT_CANCELLED or last["outcome"] == "cancelled":
            rebooted = facts["boot_id"] != result["boot_id_before"]
            result.update(
                cancelled=True,
                outcome="cancelled",
                phases=last["phases"],
                msg="update cancelled: {}; the host is back in {} and was {}".format(
                    last["error"] or said,
                    last["state"],
                    "REBOOTED" if rebooted else "not rebooted",
                ),
            )
        else:
            result.update(
                outcome="failed",
                msg=f"liveupdate run failed (exit {run['rc']}): {said}",
            )
        return result

    def _wait_for_boot(self, before, params, task_vars):
        end = time.monotonic() + params["reboot_timeout"]
        last_error = "no answer yet"
        while time.monotonic() < end:
            time.sleep(params["poll_interval"])
            try:
                self._connection.reset()
                facts = self._facts(task_vars, params)
            except (AnsibleConnectionFailure, AnsibleError) as exc:
                last_error = str(exc)
                continue
            if facts["boot_id"] == before["boot_id"]:
                last_error = "still on boot {}".format(before["boot_id"])
                continue
            if facts["liveupdate_number"] != before["liveupdate_number"] + 1:
                raise AnsibleError(
                    "the host came back from boot {} to {} with liveupdate number {}, not {}: "
                    "it rebooted without a live update".format(
                        before["boot_id"],
                        facts["boot_id"],
                        facts["liveupdate_number"],
                        before["liveupdate_number"] + 1,
                    )
                )
            return facts
        raise AnsibleError(
            f"the host did not come back within reboot_timeout "
            f"({params['reboot_timeout']} s): {last_error}"
        )

    def _wait_for_resume(self, facts, params, task_vars):
        """The host's facts once its resume has ended (these are the task's
        result: no further round trip to the host)."""
        end = time.monotonic() + params["resume_timeout"]
        while True:
            last = facts["last_update"]
            if (
                last["state"] == "NORMAL"
                and last["outcome"] is not None
                and not facts["agent_updating"]
            ):
                return facts
            if time.monotonic() >= end:
                raise AnsibleError(
                    f"the resume did not end within resume_timeout "
                    f"({params['resume_timeout']} s): state {last['state']}"
                )
            time.sleep(params["poll_interval"])
            try:
                facts = self._facts(task_vars, params)
            except (AnsibleConnectionFailure, AnsibleError):
                continue
