"""Retry policies, built in one place.

A step is retried only on a :class:`TransientError` or on an ``OSError``
whose errno the playbook step lists in ``retry.on_errno`` -- never on
cancellation or timeouts of the enclosing scope. Waits grow exponentially up
to ``max_backoff``; the step's own timeout bounds each attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from orchestrator.errors import TransientError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._playbook import RetryPolicy


def is_transient(policy: RetryPolicy) -> Callable[[BaseException], bool]:
    def transient(exc: BaseException) -> bool:
        if isinstance(exc, TransientError):
            return True
        return isinstance(exc, OSError) and exc.errno in policy.on_errno

    return transient


def retrying(
    policy: RetryPolicy, before_sleep: Callable[[RetryCallState], None]
) -> AsyncRetrying:
    """The retry loop for a step with *policy* (use only when attempts > 1)."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient(policy)),
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.backoff, max=policy.max_backoff),
        sleep=anyio.sleep,
        reraise=True,
        before_sleep=before_sleep,
    )
