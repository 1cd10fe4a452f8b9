"""What a playbook may hold: each section's keys, defaults and bounds.

Declared once, here: the loader (:mod:`orchestrator.engine._playbook`) checks
against these bounds and the reference (``docs/playbook.md``, written by
:mod:`orchestrator.engine._playbook_doc`) shows them.

.. versionadded:: 0.2
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ATTEMPTS",
    "BACKOFF",
    "BUDGET",
    "DEFAULT_BLACKOUT_BUDGET",
    "DEFAULT_STEP_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_BACKOFF",
    "MAX_BACKOFF_KEY",
    "MAX_BLACKOUT_BUDGET",
    "MAX_TIMEOUT",
    "MIN_TIMEOUT",
    "PHASE_TIMEOUT",
    "SECTIONS",
    "STEP_TIMEOUT",
    "Key",
]

MIN_TIMEOUT: Final = 0.001
"""The shortest timeout or budget, in seconds: below it nothing could finish."""
MAX_TIMEOUT: Final = 24 * 3600.0
"""The longest step or phase timeout: a day."""
MAX_BLACKOUT_BUDGET: Final = 3600.0
"""The longest blackout budget: an hour of frozen workloads is no live update."""
MAX_BACKOFF: Final = 3600.0
"""The longest wait between two tries of a step."""
MAX_ATTEMPTS: Final = 100
"""The most tries of one step."""
DEFAULT_STEP_TIMEOUT: Final = 60.0
DEFAULT_BLACKOUT_BUDGET: Final = 10.0


@final
@dataclass(frozen=True, slots=True)
class Key:
    """One key of a playbook section: what the loader accepts and the reference shows.

    :param name: the key.
    :param kind: its type, as the reference names it.
    :param doc: one line for the reference.
    :param default: the default, as the reference shows it (``""``: none).
    :param required: whether the key must be given.
    :param low: the smallest number or duration accepted, if bounded.
    :param high: the largest number or duration accepted, if bounded.
    """

    name: str
    kind: str
    doc: str
    default: str = ""
    required: bool = False
    low: float | None = None
    high: float | None = None


BUDGET: Final = Key(
    "blackout_budget",
    "duration",
    "how long workloads may stay frozen (freeze, kexec and restore together)",
    "10s",
    low=MIN_TIMEOUT,
    high=MAX_BLACKOUT_BUDGET,
)
DEFAULT_TIMEOUT: Final = Key(
    "timeout",
    "duration",
    "how long one try of a step may take, for steps that set none",
    "60s",
    low=MIN_TIMEOUT,
    high=MAX_TIMEOUT,
)
PHASE_TIMEOUT: Final = Key(
    "timeout",
    "duration",
    "the budget of the whole phase, retries included",
    "none (each step's own timeout)",
    low=MIN_TIMEOUT,
    high=MAX_TIMEOUT,
)
STEP_TIMEOUT: Final = Key(
    "timeout",
    "duration",
    "how long one try of this step may take",
    "defaults.timeout",
    low=MIN_TIMEOUT,
    high=MAX_TIMEOUT,
)
ATTEMPTS: Final = Key(
    "attempts",
    "integer",
    "tries in all; 1 means no retry",
    "1",
    low=1,
    high=MAX_ATTEMPTS,
)
BACKOFF: Final = Key(
    "backoff",
    "duration",
    "the first wait between tries; each next wait doubles",
    "100ms",
    low=0,
    high=MAX_BACKOFF,
)
MAX_BACKOFF_KEY: Final = Key(
    "max_backoff",
    "duration",
    "the longest wait between tries",
    "5s",
    low=0,
    high=MAX_BACKOFF,
)

SECTIONS: Final[Mapping[str, tuple[Key, ...]]] = types.MappingProxyType(
    {
        "playbook": (
            Key("name", "string", "the playbook's name", required=True),
            Key("description", "string", "free text", '""'),
            Key(
                "kernel",
                "'real' or 'sim:DIR'",
                "the running kernel: this host's /dev/liveupdate, or a simulated "
                "one kept in DIR; `--kernel` and `$LIVEUPDATE_KERNEL` win over it",
                "real",
            ),
            Key(
                "state_dir",
                "path",
                "the journal and run state; must survive the kexec (not tmpfs); "
                "`--state-dir` wins over it",
                "/var/lib/liveupdate",
            ),
            Key("next_kernel", "mapping", "the kernel to kexec into", "none"),
            BUDGET,
            Key("defaults", "mapping", "what steps get when they set nothing", "{}"),
            Key(
                "phases",
                "mapping",
                "phase name: its steps; at least one phase",
                required=True,
            ),
        ),
        "next_kernel": (
            Key("image", "path", "the kernel image", required=True),
            Key("initrd", "path", "the initramfs", "none"),
            Key(
                "cmdline",
                "string",
                "the kernel command line, used as is (nothing is appended)",
                "the running kernel's",
            ),
            Key(
                "via",
                "string",
                "how the kexec starts: `syscall` (reboot(KEXEC) right after the "
                "freeze, the fastest) or `systemd` (`systemctl kexec`, an orderly "
                "shutdown; only through the agent, under systemd >= 261 with "
                "FileDescriptorStorePreserve=yes)",
                "syscall",
            ),
        ),
        "defaults": (
            DEFAULT_TIMEOUT,
            Key("retry", "mapping", "the retry policy of every step", "no retry"),
        ),
        "retry": (
            ATTEMPTS,
            BACKOFF,
            MAX_BACKOFF_KEY,
            Key(
                "on_errno",
                "list of errno names",
                "also retry OSErrors with these errnos, e.g. [EAGAIN, EBUSY]",
                "[] (transient errors only)",
            ),
        ),
        "phases.PHASE": (
            PHASE_TIMEOUT,
            Key("steps", "list of steps", "at least one, run in order", required=True),
        ),
        "step": (
            Key("plugin", "string", "the plugin that runs the step", required=True),
            Key(
                "name",
                "string",
                "a label for logs and metrics, distinct within the phase",
                "the plugin's name",
            ),
            STEP_TIMEOUT,
            Key(
                "retry",
                "mapping",
                "this step's retry keys, merged over defaults.retry",
                "defaults.retry",
            ),
            Key(
                "with", "mapping", "the plugin's options (see the plugins below)", "{}"
            ),
        ),
    }
)
"""Every section of a playbook and its keys, in the order the reference lists them."""
