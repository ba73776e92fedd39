"""Embedded Milvus Lite search without a Python pass over every stored row.

Milvus Lite 3.2 (pure Python) answers each dense search by walking every stored row twice in
Python, whatever the index: once to find each primary key's newest version, once to check every
row against it and the tombstones (`milvus_lite.search.executor_indexed`). That work grows with
the catalogue: at 20k products it was 95% of a search's time, the HNSW search itself 1-2 ms
(benchmarks/RESULTS.md, "Scale of the embedded store"). Segments are immutable, so which of their
rows are live changes only when a flush, compaction or delete changes the snapshot: this module
computes that once per snapshot with numpy and reuses it, and per search only looks at the rows
still in memory (the memtable, at most one flush's worth). Results are the engine's own: the
same indexes, masks, merge and projection (tests/test_lite_search.py compares them).

The segments (at most 100k rows each in Lite) are searched side by side on a thread per CPU, as
Milvus's query nodes do, rather than one after another: their faiss indexes release the GIL, so
a 300k-product catalogue (3 segments) does not cost three segments' time per search. A filter
is evaluated on each segment's own thread too (Arrow's kernels release the GIL as well).

Two smaller per-row costs of the engine are cut the same way: its row-wise filter evaluator (JSON
paths) gets only the columns an expression reads (`evaluate_python`), and whether a returned
field is the primary key is answered once per schema, not per field per hit (`is_primary`).
A filter's primary-key terms ("more like this" excludes the product itself) are answered from
the snapshot's sorted keys, not by checking every row's key (`key_terms`), and the rows a
filter allows reach faiss as a bitmap, not a set built per search (`index_search`). The hits'
fields are read from each segment holding some, side by side, and only the requested columns,
which then need none of the engine's per-hit projection (`_segment_rows`, `_entity_fields`).

`install()` swaps the engine's functions for these when the installed Milvus Lite is a version
this was written against, else leaves the engine alone. Only the embedded engine in this
process is affected; a Milvus server searches its own way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Versions whose executor_indexed.execute_search_with_index this mirrors (read from 3.2.2).
SUPPORTED_VERSIONS = ("3.2.2",)  # exactly the engine this mirrors; any other keeps its own
# One snapshot per collection (keyed weakly by its memtable: a dropped collection's entry goes
# with it) and partition scope, replaced at the first search after a change, so segments that a
# compaction dropped are not kept alive.
_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[Any, dict[tuple, _Snapshot]] = weakref.WeakKeyDictionary()
_original: Callable | None = None
_original_python: Callable | None = None  # the engine's row-wise filter evaluator
_original_is_primary: Callable | None = None
# id(schema) -> (schema, its SchemaFields); the schema held so its id is not reused
_schema_fields: dict[int, tuple[Any, SchemaFields]] = {}
# The engine's bookkeeping columns, never part of a hit's entity.
_INTERNAL_COLUMNS = frozenset({"_seq", "_partition", "$meta"})


@dataclass
class _Snapshot:
    """Which rows of a set of immutable segments are live: the newest version of their key
    and not deleted by a tombstone. Holds the segments, so their ids cannot be reused."""

    segments: tuple
    tombstones: dict[Any, int]
    keys: np.ndarray  # (u,) sorted distinct primary keys
    seqs: np.ndarray  # (n,) int64 write sequence of every row, segments concatenated
    newest: np.ndarray  # (u,) int64 newest sequence per key among the segments
    newest_row: np.ndarray  # (u,) int64 row (in the concatenation) holding the newest version
    offsets: np.ndarray  # (len(segments) + 1,) int64 first row of each segment
    live: list[np.ndarray]  # per segment, (rows,) bool

    def matches(self, segments: Sequence, tombstones: dict[Any, int]) -> bool:
        return (len(segments) == len(self.segments)
                and all(a is b for a, b in zip(segments, self.segments, strict=True))
                and tombstones == self.tombstones)


def _build(segments: tuple, tombstones: dict[Any, int]) -> _Snapshot:
    """Live rows of `segments` (O(rows) numpy work, once per snapshot)."""
    sizes = [s.num_rows for s in segments]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    all_keys = np.concatenate([np.asarray(s.pks) for s in segments])
    seqs = np.concatenate([np.asarray(s.seqs, dtype=np.int64) for s in segments])
    keys, inverse = np.unique(all_keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    newest = np.full(len(keys), -1, dtype=np.int64)
    np.maximum.at(newest, inverse, seqs)
    is_newest = seqs == newest[inverse]
    newest_row = np.zeros(len(keys), dtype=np.int64)
    newest_row[inverse[is_newest]] = np.flatnonzero(is_newest)
    live = is_newest
    if tombstones:
        found, pos = _positions(keys, list(tombstones))
        deleted_at = np.full(len(keys), -1, dtype=np.int64)
        np.maximum.at(deleted_at, pos[found],
                      np.asarray(list(tombstones.values()), dtype=np.int64)[found])
        live = live & ~(deleted_at[inverse] > seqs)
    return _Snapshot(segments, dict(tombstones), keys, seqs, newest, newest_row, offsets,
                     [live[offsets[i]:offsets[i + 1]] for i in range(len(segments))])


def _positions(keys: np.ndarray, wanted: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """For each wanted key: whether it is in sorted `keys`, and its position there."""
    if not len(keys) or not wanted:
        return np.zeros(len(wanted), dtype=bool), np.zeros(len(wanted), dtype=np.int64)
    query = np.asarray(wanted)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return keys[pos] == query, pos


def _snapshot(memtable: Any, partitions: list[str] | None, segments: tuple,
              tombstones: dict[Any, int]) -> _Snapshot:
    """The live rows of one collection's segments in scope (`memtable` identifies the
    collection), built again when its segments or tombstones changed."""
    scope = tuple(sorted(partitions or ()))
    with _lock:
        found = _cache.get(memtable, {}).get(scope)
    if found is not None and found.matches(segments, tombstones):
        return found
    entry = _build(segments, tombstones)
    with _lock:
        _cache.setdefault(memtable, {})[scope] = entry
    return entry


def key_terms(compiled: Any, pk_field: str) -> tuple[list[tuple[bool, tuple]], Any]:
    """The primary-key terms of a filter's top-level AND (`id in [...]`, `id not in [...]`,
    `not (id in [...])`) as (excluded, keys) pairs, and the filter without them (None when
    nothing is left). Milvus Lite checks such a term against every row's key, per segment
    (0.7 ms per 100k rows for one excluded product); the snapshot finds each key's row
    directly, as a Milvus server answers primary-key terms from its key index."""
    from milvus_lite.search.filter.ast import And, FieldRef, InOp, IntLit, Not, StringLit

    def operands(node: Any) -> list[Any]:
        return [n for op in node.operands for n in operands(op)] if isinstance(node, And) \
            else [node]

    terms, rest = [], []
    for node in operands(compiled.ast):
        inner, negated = (node.operand, True) if isinstance(node, Not) else (node, False)
        if (isinstance(inner, InOp) and isinstance(inner.field, FieldRef)
                and inner.field.name == pk_field
                and all(isinstance(e, StringLit | IntLit) for e in inner.values.elements)):
            terms.append((negated != inner.negate,
                          tuple(e.value for e in inner.values.elements)))
        else:
            rest.append(node)
    if not terms:
        return [], compiled
    if not rest:
        return terms, None
    ast = rest[0] if len(rest) == 1 else And(tuple(rest), compiled.ast.pos)
    return terms, dataclasses.replace(compiled, ast=ast)


def _key_masks(snap: _Snapshot, terms: list[tuple[bool, tuple]]) -> list[np.ndarray]:
    """Per segment, (rows,) bool: the rows the primary-key terms allow. Only a key's newest
    row can be live (the snapshot's masks drop every older one), so a term decides by it."""
    allowed = np.ones(len(snap.seqs), dtype=bool)
    for excluded, keys in terms:
        found, pos = _positions(snap.keys, list(keys))
        rows = snap.newest_row[pos[found]]
        if excluded:
            allowed[rows] = False
        else:
            listed = np.zeros_like(allowed)
            listed[rows] = True
            allowed &= listed
    return [allowed[snap.offsets[i]:snap.offsets[i + 1]] for i in range(len(snap.segments))]


def _segment_masks(snap: _Snapshot, newer: dict[Any, int]) -> list[np.ndarray]:
    """The snapshot's live masks less the rows that `newer` (key -> sequence of a write or
    delete still in memory) supersedes. Copies only the segments it changes."""
    masks = list(snap.live)
    found, pos = _positions(snap.keys, list(newer))
    if not found.any():
        return masks
    later = np.asarray(list(newer.values()), dtype=np.int64)[found]
    rows = snap.newest_row[pos[found]]
    rows = rows[later > snap.seqs[rows]]
    for seg in np.unique(np.searchsorted(snap.offsets, rows, side="right") - 1):
        local = rows[(rows >= snap.offsets[seg]) & (rows < snap.offsets[seg + 1])]
        masks[seg] = masks[seg].copy()
        masks[seg][local - snap.offsets[seg]] = False
    return masks


def execute_search(
    query_vectors: np.ndarray,
    segments: Iterable,
    memtable: Any,
    delta_index: Any,
    top_k: int,
    metric_type: str,
    pk_field: str,
    vector_field: str,
    partition_names: list[str] | None = None,
    compiled_filter: Any = None,
    output_fields: list[str] | None = None,
    indexed_filter_plan: Any = None,
    project_record_fn: Callable[[dict], dict] | None = None,
    search_params: dict[str, Any] | None = None,
) -> list[list[dict]]:
    """`milvus_lite.search.executor_indexed.execute_search_with_index` (same arguments and
    results: nq lists of up to top_k `{"id", "distance", "entity"}`, ascending distance), with
    the segments' live rows taken from a per-snapshot cache instead of a Python pass per row."""
    from milvus_lite.index.brute_force import BruteForceIndex

    if query_vectors.ndim == 1:
        query_vectors = query_vectors.reshape(1, -1)
    query_vectors = query_vectors.astype(np.float32, copy=False)
    nq = int(query_vectors.shape[0])
    if nq == 0 or top_k <= 0:
        return [[] for _ in range(nq)]
    wanted = set(partition_names) if partition_names else None
    scope = tuple(s for s in segments
                  if s.num_rows > 0 and (wanted is None or s.partition in wanted))
    mt_pks, mt_seqs, mt_vecs, mt_row_refs, mt_table = memtable.to_search_snapshot(
        vector_field=vector_field, partition_names=partition_names,
        include_table=compiled_filter is not None)
    if not scope and not mt_pks:
        return [[] for _ in range(nq)]

    mt_deletes = memtable.delete_index_snapshot()  # {pk: (seq, partition)}, not yet flushed
    tombstones = getattr(delta_index, "_map", None)
    if tombstones is None:
        tombstones = delta_index.snapshot
    newer = {pk: seq for pk, (seq, _) in mt_deletes.items()}
    for pk, seq in zip(mt_pks, mt_seqs.tolist(), strict=True):
        newer[pk] = max(int(seq), newer.get(pk, -1))
    snap = _snapshot(memtable, partition_names, scope, tombstones) if scope else None
    masks = _segment_masks(snap, newer) if snap is not None else []
    # Primary-key terms ("more like this" excludes the product itself) from the snapshot's
    # key index; the rest of the expression, if any, row by row as the engine does.
    segment_filter = compiled_filter
    if snap is not None and compiled_filter is not None and indexed_filter_plan is None:
        terms, segment_filter = key_terms(compiled_filter, pk_field)
        if terms:
            masks = [m & k for m, k in zip(masks, _key_masks(snap, terms), strict=True)]

    def recall(job: tuple[int, np.ndarray, np.ndarray, Any, Any]) -> list[list[tuple]]:
        """One source's top_k per query: [(distance, source, row)], nq lists. A segment's
        filter is evaluated here, on the segment's own thread (Arrow's kernels release the
        GIL), not one segment after another before the searches start."""
        source, vectors, mask, index, segment = job
        if segment is not None and segment_filter is not None:
            mask = mask & evaluate_segment_filter(segment, segment_filter,
                                                  indexed_filter_plan).astype(bool)
        if not mask.any():
            return [[] for _ in range(nq)]
        if index is None:
            index = BruteForceIndex.build(vectors, metric_type)
        ids, dists = index_search(index, query_vectors, top_k,
                                  None if mask.all() else mask, search_params)
        return [[(float(d), source, int(i)) for i, d in zip(ids[q], dists[q], strict=True)
                 if i >= 0] for q in range(nq)]

    jobs = []
    if compiled_filter is not None:
        from milvus_lite.search.filter import evaluate_mask
        from milvus_lite.search.indexed_filter import evaluate_segment_filter
    for i, seg in enumerate(scope):
        vectors, valid_vectors = seg.vector_data(vector_field)
        mask = masks[i]
        if valid_vectors is not None:
            mask = mask & valid_vectors
        jobs.append((i, vectors, mask, seg.indexes.get(vector_field), seg))
    if mt_pks:
        mt_mask = _memtable_mask(mt_pks, mt_seqs, snap, tombstones, mt_deletes)
        if compiled_filter is not None and mt_table is not None:
            mt_mask &= evaluate_mask(compiled_filter, mt_table).astype(bool)
        jobs.append((len(scope), mt_vecs, mt_mask, None, None))
    # Segments are searched side by side, as Milvus's query nodes do (Lite: one after another):
    # the vector indexes (faiss) release the GIL while they search.
    found = list(_pool().map(recall, jobs)) if len(jobs) > 1 else [recall(j) for j in jobs]
    candidates = [[c for source in found for c in source[q]] for q in range(nq)]

    project = project_record_fn or _projection(output_fields, pk_field, vector_field)
    columns = plain_columns(scope, output_fields, pk_field)
    best = [sorted(candidates[q])[:top_k] for q in range(nq)]
    rows = _segment_rows(scope, best, columns) if columns is not None else {}
    # A row read from exactly the requested plain columns projects to those columns less the
    # key, as the engine's projection gives them (it has no dynamic fields to merge); the
    # engine's own per-hit projection asks per field whether it is the key and merges dynamic
    # fields (0.4 ms of a 10-hit search at 300k products, under cProfile).
    entity_fields = _entity_fields(scope, columns) if columns is not None else []
    results = []
    for q in range(nq):
        row: list[dict] = []
        for dist, source, local in best[q]:
            if (source, local) in rows:  # read with the key first (`plain_columns`)
                record = rows[(source, local)]
                row.append({"id": record[pk_field], "distance": dist,
                            "entity": {f: record[f] for f in entity_fields}})
                continue
            if source < len(scope):
                segment = scope[source]
                record, pk = segment.row_to_dict(local), segment.pks[local]
            else:
                record, pk = memtable.materialize_row(*mt_row_refs[local]), mt_pks[local]
            row.append({"id": record.get(pk_field, pk), "distance": dist,
                        "entity": project(record)})
        results.append(row)
    return results


def index_search(index: Any, queries: np.ndarray, top_k: int, mask: np.ndarray | None,
                 params: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search(queries, top_k, valid_mask=mask, params=params)` of a Lite segment index:
    (nq, top_k) int64 rows (-1 padding) and float32 distances (smaller = more similar, +inf
    padding), the same arrays the engine's own call returns.

    Lite's faiss indexes hand a mask to faiss as an IDSelectorBatch, a hash set of every allowed
    row built for each search: 3.7 ms per 100k-row segment, so a filtered search, a "more like
    this" (which excludes one product) or any search after an update or delete cost 3x an
    unfiltered one at 300k products (benchmarks/RESULTS.md, "Filtered searches at scale"). The
    same rows as faiss's IDSelectorBitmap (the mask's bits, 0.02 ms) select the same hits.
    Other index types, and searches without a mask, go to the index's own search.

    A narrow mask on an HNSW index is searched exhaustively over the allowed rows (the index's
    own stored vectors or SQ8 codes, through the same bitmap), as a Milvus server's knowhere
    does (`_exhaustive`): a graph walk that may only return a few of the rows it visits ends
    before it finds them (100k-row HNSW_SQ segment, ef 128: recall@10 0.31 with 0.2% of the
    rows allowed, 0.62 with 1%, 0.81 with 5%; exhaustive 0.99). So is one whose graph walk
    returned fewer than min(top_k, allowed rows) hits.
    ValueError when the mask's length is not the index's row count (as the engine raises)."""
    parameters = _faiss_parameters(index, params or {}) if mask is not None else None
    if mask is None or parameters is None:
        return index.search(queries, top_k, valid_mask=mask, params=params)
    import faiss

    if mask.shape[0] != index.num_vectors:
        raise ValueError(f"valid_mask length {mask.shape[0]} != num_vectors {index.num_vectors}")
    queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
    nq = int(queries.shape[0])
    if index.num_vectors == 0 or top_k <= 0 or not mask.any():
        return (np.full((nq, top_k), -1, dtype=np.int64),
                np.full((nq, top_k), np.inf, dtype=np.float32))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if index.metric == "COSINE":  # the index holds unit vectors; inner product = cosine
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1.0, norms)
    parameters_class, options = parameters
    graph, allowed = index._index, int(mask.sum())
    hnsw = hasattr(graph, "hnsw")
    selector = faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))  # holds its bits
    scan = hnsw and _exhaustive(int(graph.ntotal), allowed, top_k)
    if not scan:
        dists, ids = graph.search(queries, top_k,
                                  params=parameters_class(sel=selector, **options))
        # A graph walk that came back with fewer hits than there are allowed rows stopped
        # before it met them: answer those queries from a scan too.
        scan = hnsw and bool(((ids >= 0).sum(axis=1) < min(top_k, allowed)).any())
    if scan:
        dists, ids = faiss.downcast_index(graph.storage).search(
            queries, top_k, params=faiss.SearchParameters(sel=selector))
    # faiss pads with id -1 and sometimes FLT_MAX; the engine turns faiss's distances into its
    # own (see milvus_lite.index.faiss_hnsw: L2 -> sqrt, IP -> -dot, COSINE -> 1 - dot).
    kept = (ids >= 0) & (dists < 1e30)
    raw = dists.astype(np.float64)
    converted = {"L2": lambda d: np.sqrt(np.maximum(d, 0.0)), "IP": np.negative,
                 "COSINE": lambda d: 1.0 - d}.get(index.metric, lambda d: d)(raw)
    return (np.where(kept, ids, -1).astype(np.int64),
            np.where(kept, converted, np.inf).astype(np.float32))


# knowhere's HNSW (the index of a Milvus server) searches every allowed row instead of the
# graph when at least this share of the rows is filtered out, or when top_k is at least this
# share of the rows left (src/index/hnsw: kHnswSearchKnnBFFilterThreshold,
# kHnswSearchBFTopkThreshold).
EXHAUSTIVE_FILTERED_SHARE = 0.93
EXHAUSTIVE_TOP_K_SHARE = 0.5


def _exhaustive(total: int, allowed: int, top_k: int) -> bool:
    """Whether a masked search of an HNSW index of `total` rows, `allowed` of them in the mask,
    should scan those rows rather than walk its graph (knowhere's rule, above)."""
    return (total - allowed >= EXHAUSTIVE_FILTERED_SHARE * total
            or top_k >= EXHAUSTIVE_TOP_K_SHARE * allowed)


def _faiss_parameters(index: Any, params: dict[str, Any]) -> tuple[type, dict] | None:
    """The faiss search-parameters class and its options for one of Lite's faiss segment
    indexes, with the index's own defaults (ef 64, nprobe 10); None for any other index."""
    cls = type(index)
    if not cls.__module__.startswith("milvus_lite.index.faiss_"):  # the engine's, over faiss
        return None
    import faiss

    if cls.__name__ in ("FaissHnswIndex", "FaissHnswSqIndex"):
        return faiss.SearchParametersHNSW, {"efSearch": int(params.get("ef", 64))}
    if cls.__name__ in ("FaissIvfFlatIndex", "FaissIvfSq8Index"):
        return faiss.SearchParametersIVF, {"nprobe": int(params.get("nprobe", 10))}
    return None


_searchers: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads that search segments side by side, one per CPU (made on first use)."""
    global _searchers
    with _lock:
        if _searchers is None:
            _searchers = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                            thread_name_prefix="lite-segment-search")
        return _searchers


def _memtable_mask(pks: list[Any], seqs: np.ndarray, snap: _Snapshot | None,
                   tombstones: dict[Any, int], deletes: dict[Any, tuple]) -> np.ndarray:
    """Live rows of the memtable (bounded by one flush's worth): not older than the same key
    in a segment, not deleted by a tombstone or an unflushed delete."""
    older_than: dict[Any, int] = {}
    if snap is not None:
        found, pos = _positions(snap.keys, list(pks))
        older_than = {pk: int(snap.newest[p]) for pk, f, p in zip(pks, found, pos, strict=True)
                      if f}
    mask = np.zeros(len(pks), dtype=bool)
    for i, (pk, seq) in enumerate(zip(pks, seqs.tolist(), strict=True)):
        deleted = deletes.get(pk)
        mask[i] = (older_than.get(pk, -1) <= seq and tombstones.get(pk, -1) <= seq
                   and (deleted is None or deleted[0] <= seq))
    return mask


def _segment_rows(scope: tuple, best: list[list[tuple[float, int, int]]],
                  columns: list[str]) -> dict[tuple[int, int], dict]:
    """{(segment, row): {column: value}} of the segment rows among the hits, read a segment at a
    time (one Arrow `take` of the needed columns, not a Python conversion per cell)."""
    wanted: dict[int, list[int]] = {}
    for hits in best:
        for _, source, local in hits:
            if source < len(scope):
                wanted.setdefault(source, []).append(local)

    def read(item: tuple[int, list[int]]) -> list[tuple[tuple[int, int], dict]]:
        source, locals_ = item
        locals_ = sorted(set(locals_))
        table = scope[source].table.select(columns).take(locals_)
        return [((source, local), record)
                for local, record in zip(locals_, table.to_pylist(), strict=True)]

    # Segments are read side by side, as they are searched: Arrow's `take` releases the GIL.
    items = list(wanted.items())
    parts = _pool().map(read, items) if len(items) > 1 else map(read, items)
    return {key: record for part in parts for key, record in part}


def _entity_fields(scope: tuple, columns: list[str]) -> list[str]:
    """The fields of a hit's entity read from `columns` (the key first, then the requested
    plain columns): the requested ones less the key, in the segments' column order (the
    schema's), as the engine's search projection returns them; never its internal columns."""
    wanted = set(columns[1:]) - _INTERNAL_COLUMNS
    return [name for name in scope[0].table.schema.names if name in wanted] if scope else []


def plain_columns(scope: tuple, output_fields: list[str] | None,
                  pk_field: str) -> list[str] | None:
    """The stored columns a hit's entity (or a record read by id, `lite_reads.get_rows`) is
    built from, the key first, when they are plain columns of every segment: the engine's
    `row_to_dict` converts every column of each hit to Python (a 1,280-d image vector, a 384-d
    text vector, ... per hit: most of a 200-hit search's time), only for its projection
    (`project_record`, which reads the requested schema fields and the dynamic ones) to keep a
    few. None (convert the whole row, as the engine does) without explicit output fields, with
    a wildcard, or when one is not a plain column (a dynamic field lives in `$meta`)."""
    if not output_fields or any("*" in f for f in output_fields):
        return None
    wanted = [pk_field, *(f for f in dict.fromkeys(output_fields) if f != pk_field)]
    for segment in scope:
        names = set(segment.table.schema.names)
        if not set(wanted) <= names or "$meta" in names:
            return None
    return wanted


def _projection(output_fields: list[str] | None, pk_field: str,
                vector_field: str) -> Callable[[dict], dict]:
    """The engine's default entity projection (when no project_record_fn is given)."""
    if output_fields is None:
        return lambda r: {k: v for k, v in r.items() if k not in (pk_field, vector_field)}
    keep = set(output_fields) - {pk_field}
    return lambda r: {k: r[k] for k in keep if k in r}


def evaluate_python(compiled: Any, data: Any) -> Any:
    """The engine's row-wise filter (JSON paths such as `attributes["material"] == "silk"`,
    array functions) on only the columns the expression reads: the engine turns every column
    of every row into Python first (`to_pylist`), 1,280-d vectors included, 0.6-1.5 s per
    search at 5k products. The same rows in the same order, so the same mask."""
    import pyarrow as pa

    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    wanted = [n for n in data.column_names if n in compiled.fields or n == "$meta"]
    if wanted and len(wanted) < data.num_columns:
        data = data.select(wanted)
    return _original_python(compiled, data)


@dataclass(frozen=True)
class SchemaFields:
    """What reads of an engine schema need to know of its fields."""

    primary: frozenset[str]  # the primary key's name (Milvus has one)
    json: frozenset[str]  # JSON fields (the engine keeps their values as text)


def schema_fields(schema: Any) -> SchemaFields:
    """The primary key and JSON fields of an engine schema, worked out once per schema object
    (this module's `is_primary` and `lite_reads` ask for every hit)."""
    entry = _schema_fields.get(id(schema))
    if entry is None or entry[0] is not schema:  # an id reused by a new schema object
        from milvus_lite.schema.types import DataType

        entry = (schema, SchemaFields(
            primary=frozenset(f.name for f in schema.fields if f.is_primary),
            json=frozenset(f.name for f in schema.fields if f.dtype == DataType.JSON)))
        _schema_fields[id(schema)] = entry
    return entry[1]


def is_primary(schema: Any, field_name: str) -> bool:
    """Whether `field_name` is the schema's primary key: the engine asks this for every field
    of every hit it returns, each time looping over every field of the schema (a third of a
    200-hit search's time in the engine); the answer per schema object is computed once."""
    return field_name in schema_fields(schema).primary


def install() -> bool:
    """Route embedded Milvus Lite searches in this process through `execute_search`; returns
    whether it did (False, engine unchanged, for a Milvus Lite version not in
    SUPPORTED_VERSIONS or none installed). Idempotent."""
    global _original, _original_python, _original_is_primary
    try:
        import milvus_lite
        from milvus_lite.engine import collection, projection
        from milvus_lite.search.filter import eval as filter_eval
    except ImportError:
        return False
    version = getattr(milvus_lite, "__version__", "")
    if not version.startswith(SUPPORTED_VERSIONS):
        log.warning("Milvus Lite %s: keeping its own search path (per-row; slower at scale)",
                    version)
        return False
    if collection.execute_search_with_index is not execute_search:
        _original = collection.execute_search_with_index
        collection.execute_search_with_index = execute_search
    if filter_eval.evaluate_python is not evaluate_python:  # `evaluate` looks it up per call
        _original_python = filter_eval.evaluate_python
        filter_eval.evaluate_python = evaluate_python
    if projection._is_primary is not is_primary:  # as does `project_record`
        _original_is_primary = projection._is_primary
        projection._is_primary = is_primary
    return True


def uninstall() -> None:
    """Give Milvus Lite its own search path back (for comparisons)."""
    from milvus_lite.engine import collection, projection
    from milvus_lite.search.filter import eval as filter_eval

    if _original is not None:
        collection.execute_search_with_index = _original
    if _original_python is not None:
        filter_eval.evaluate_python = _original_python
    if _original_is_primary is not None:
        projection._is_primary = _original_is_primary
    with _lock:
        _cache.clear()
