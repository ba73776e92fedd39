"""Memory the allocators keep after bulk writes is given back (deployments.core.memory), and
the search replica that runs the embedded store does so on its own after writes, in the
environment the config gives it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil

from deployments.core.memory import release_free_memory


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def test_freed_heap_memory_goes_back_to_the_os():
    # ~400 MB in 8 KB blocks: glibc serves them from its heap and keeps them when freed.
    blocks = [np.ones(2000, np.float32) for _ in range(50_000)]
    held = _rss_mb()
    del blocks
    kept = _rss_mb()
    assert kept > held - 100  # freed but still counted against the process
    assert release_free_memory() >= 0
    assert _rss_mb() < kept - 200


def _search_replicas() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:shopsearch:ProductSearch" in cmdline:
            found.append(proc)
    return found


def test_search_replica_gives_memory_back_on_its_own(service, service_settings):
    """The shared test service indexed its demo catalogue at start: its search replica runs
    with the configured allocator setting and gives freed memory back within a few periods."""
    from ray._private.worker import global_worker

    replicas = _search_replicas()
    assert replicas, "no ProductSearch replica process"
    assert {p.environ().get("MALLOC_ARENA_MAX") for p in replicas} == {"2"}
    logs = Path(global_worker.node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + 4 * service_settings.milvus.release_memory_s + 10
    while True:
        text = "".join(p.read_text(errors="ignore")
                       for p in logs.glob("replica_shopsearch_ProductSearch_*.log"))
        if "freed memory given back to the OS" in text:
            break
        assert time.monotonic() < deadline, "the search replica never gave memory back"
        time.sleep(0.5)
