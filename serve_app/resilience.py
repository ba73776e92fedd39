"""How the ingress calls deployments: within the request's time budget, retrying (bounded, with
backoff) a call whose replica died or hung, so Serve routes it to a live one."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.core.errors import BackendUnavailable
from deployments.core.settings import ResilienceSettings
from serve_app.http import replica_failed

log = logging.getLogger("ray.serve")
T = TypeVar("T")
SHED = (BackPressureError, DeploymentUnavailableError)  # a queue is full / nothing to route to


async def call(make: Callable[[], Awaitable[T]], policy: ResilienceSettings,
               retry: bool = True) -> T:
    """Await `make()` within `policy.request_timeout_s`; with `retry`, each try gets
    `attempt_timeout_s` and a try that timed out or lost its replica is made again, up to
    `policy.retries` times. Only idempotent calls may retry. Raises TimeoutError past the budget,
    BackendUnavailable (code `overloaded`) when a deployment's bounded queue shed the call."""
    try:
        return await _call(make, policy, retry)
    except SHED as exc:
        # Serve answers these itself, ahead of the app's handlers: plain text and no
        # Retry-After. As our own error they get the JSON 503 + Retry-After every 503 gets.
        raise BackendUnavailable("service busy (queue full); retry shortly",
                                 code="overloaded") from exc


async def _call(make: Callable[[], Awaitable[T]], policy: ResilienceSettings,
                retry: bool) -> T:
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
