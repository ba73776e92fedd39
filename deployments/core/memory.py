"""Giving back memory the allocators keep after bulk writes into the embedded store.

Milvus Lite holds each segment as Arrow tables and builds its faiss indexes in this process.
After a bulk load (inserts, flushes, compactions, index builds) most of the process's RSS is
memory already freed but kept by the allocators for reuse: glibc's heap pages and Arrow's
mimalloc pool. Measured with `benchmarks/scale.py` (benchmarks/RESULTS.md, "Memory after a bulk
load"): 1,180 -> 453 MB at 10k products, 9,075 -> 4,239 MB at 300k once given back. Neither
allocator returns it on its own while the process is quiet, so the search deployment asks them
to, now and then, after writes (`MilvusSettings.release_memory_s`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time


def release_free_memory() -> float:
    """Return freed memory to the OS: Arrow's default pool (`release_unused`) and glibc's heap
    (`malloc_trim(0)`; skipped where the C library has none, e.g. musl or macOS). Takes the
    allocators' locks briefly, so call it off the request path. Returns the time taken, ms."""
    import pyarrow as pa

    start = time.perf_counter()
    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    return (time.perf_counter() - start) * 1000


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, once (`find_library` runs `ldconfig` in a subprocess)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None
