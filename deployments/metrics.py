"""Prometheus metrics through Ray's metrics API (exported by every node; seen in the dashboard)."""

from __future__ import annotations

import time
from functools import cache

from ray.util import metrics

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


@cache
def encoder_batch_size() -> metrics.Histogram:
    """Items per batch an encoder replica runs, tagged by encoder."""
    return metrics.Histogram(
        "shopsearch_encoder_batch_size", description="Items per encoder batch.",
        boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("encoder",),
    )


@cache
def requests() -> metrics.Counter:
    """HTTP requests by route and status."""
    return metrics.Counter(
        "shopsearch_requests", description="HTTP requests by route and status.",
        tag_keys=("route", "status"),
    )


@cache
def request_latency_ms() -> metrics.Histogram:
    """HTTP request latency by route."""
    return metrics.Histogram(
        "shopsearch_request_latency_ms", description="HTTP request latency (ms) by route.",
        boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",),
    )


@cache
def milvus_latency_ms() -> metrics.Histogram:
    """Milvus call latency by operation and outcome."""
    return metrics.Histogram(
        "shopsearch_milvus_latency_ms", description="Milvus call latency (ms).",
        boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("op", "outcome"),
    )


@cache
def encoder_queue_wait_ms() -> metrics.Histogram:
    """Time a request waits in an encoder replica before its batch runs."""
    return metrics.Histogram(
        "shopsearch_encoder_queue_wait_ms", description="Wait before an encoder batch (ms).",
        boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("encoder",),
    )


def observe_batch(encoder: str, enqueued: list[float]) -> None:
    """Record one batch: its size and how long each item waited for it."""
    now = time.monotonic()
    tags = {"encoder": encoder}
    encoder_batch_size().observe(len(enqueued), tags=tags)
    for started in enqueued:
        encoder_queue_wait_ms().observe((now - started) * 1000, tags=tags)
