"""How the ingress calls deployments: within the request's time budget, retrying (bounded, with
backoff) a call whose replica died or hung, so Serve routes it to a live one."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from deployments.core.settings import ResilienceSettings
from serve_app.http import replica_failed

log = logging.getLogger("ray.serve")
T = TypeVar("T")


async def call(make: Callable[[], Awaitable[T]], policy: ResilienceSettings,
               retry: bool = True) -> T:
    """Await `make()` within `policy.request_timeout_s`; with `retry`, each try gets
    `attempt_timeout_s` and a try that timed out or lost its replica is made again, up to
    `policy.retries` times. Only idempotent calls may retry. Raises TimeoutError past the budget."""
    attempt_timeout = policy.attempt_timeout_s if retry else policy.request_timeout_s
    async with asyncio.timeout(policy.request_timeout_s):
        for attempt in itertools.count():
            try:
                async with asyncio.timeout(attempt_timeout):
                    return await make()
            except Exception as exc:
                # A try that timed out is likely stuck on a lost node: try another replica.
                stuck = isinstance(exc, TimeoutError)
                if not (retry and attempt < policy.retries and (stuck or replica_failed(exc))):
                    raise
                log.warning("retrying after replica failure: %r", exc)
                await asyncio.sleep(policy.retry_backoff_s * 2**attempt)
    raise AssertionError("unreachable")
