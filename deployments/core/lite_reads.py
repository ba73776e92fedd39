"""Reads of an embedded Milvus Lite collection from its engine in this process, without gRPC.

Milvus Lite 3.2 (pure Python) runs its engine inside the process that opens a local data path,
behind a gRPC server on 127.0.0.1, and pymilvus talks to that server as to a remote Milvus. A read
is encoded to protobuf, sent over the socket, decoded by Lite's servicer, answered by the engine
in Python dicts, encoded back to protobuf, sent back and decoded by pymilvus value by value. For
the search replica's re-ranking pool (200 hits) that round trip cost 10.5 ms of CPU against
1.6 ms for the engine's own search, and reading the 10 kept products 3.6 ms against 1.1 ms
(benchmarks/RESULTS.md, "Embedded reads without the gRPC round trip").

`LiteReader` calls the engine's `Collection.search` / `get` (and, for a hybrid search, its
rerank chain, as Lite's servicer does) directly and returns what pymilvus would (`{"id",
"distance", "entity"}` hits with the primary key in `entity`, JSON fields parsed), so the
store's callers cannot tell the paths apart (tests/test_lite_reads.py compares them on one
store). Reads see every acknowledged write (what Strong consistency gives). They have no
deadline of their own (there is no channel to time out): a slow search, e.g. while Lite builds
an index, answers late instead of failing after `milvus.read_timeout_s`, and the ingress's
per-attempt timeout still bounds the request. Writes, collection management and scans keep
going through pymilvus. An engine error is raised as a `MilvusException` with the engine's
message, so the store treats it as it treats the client's.

Only the engine this process opened is read; a Milvus server (or another process's data dir) is
always reached through pymilvus. `reader()` returns None where this does not apply (a server
URI, another Milvus Lite version, no engine open for the path), and the store then reads
through pymilvus as before.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pymilvus import MilvusException

from deployments.core.lite_search import plain_columns, schema_fields

log = logging.getLogger(__name__)

# Versions whose engine API (Collection.search / get, the server manager's table) this was
# read from; any other keeps the pymilvus path.
SUPPORTED_VERSIONS = ("3.2.2",)


class LiteReader:
    """Search and get on the collections of one embedded Milvus Lite data dir, in process."""

    def __init__(self, data_dir: str, lookup: Callable[[str], Any]) -> None:
        self._data_dir = data_dir
        self._lookup = lookup  # data dir -> the open engine (milvus_lite.db.MilvusLite) or None

    def available(self) -> bool:
        """Whether the engine for this data dir is open in this process."""
        db = self._lookup(self._data_dir)
        return db is not None and not db.closed

    def search(
        self, collection: str, vectors: np.ndarray, anns_field: str, limit: int, filter: str,
        output_fields: Sequence[str], metric: str, params: dict[str, Any],
    ) -> list[list[dict[str, Any]]]:
        """Top-`limit` hits of each row of `vectors` ((n, dim) float32) on `anns_field`, best
        first, as pymilvus returns them. MilvusException on an engine error."""
        col = self._collection(collection)
        fields = list(output_fields)
        result = _engine_call(col.search, [row.tolist() for row in np.asarray(vectors)],
                              top_k=limit, metric_type=_engine_call(col.resolve_search_metric,
                                                                    anns_field, metric),
                              expr=filter or None, output_fields=fields, anns_field=anns_field,
                              search_params=dict(params))
        for hits in result:
            self._as_pymilvus(col, fields, hits)
        return result

    def hybrid_search(
        self, collection: str, routes: Sequence[tuple[np.ndarray, str, int, str]],
        ranker: dict[str, Any], limit: int, output_fields: Sequence[str], metric: str,
        params: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """One query's fused hits, best first, as pymilvus's `hybrid_search` returns them: each
        route (vector (dim,) float32, anns_field, depth, filter) searched, then fused by
        `ranker` (a pymilvus ranker's `dict()`: RRF or weighted) with the engine's own rerank
        chain, as its servicer does. MilvusException on an engine error."""
        from milvus_lite.adapter.grpc.function_chain import hit_score_for_chain
        from milvus_lite.function.builder import build_hybrid_rerank_chain
        from milvus_lite.function.dataframe import DataFrame
        from milvus_lite.function.types import GROUP_SCORE_FIELD, ID_FIELD, SCORE_FIELD

        col = self._collection(collection)
        fields = list(output_fields)
        frames, metrics = [], []
        for vector, anns_field, depth, expr in routes:
            route_metric = _engine_call(col.resolve_search_metric, anns_field, metric)
            hits = _engine_call(col.search, [np.asarray(vector, np.float32).tolist()],
                                top_k=depth, metric_type=route_metric, expr=expr or None,
                                output_fields=fields, anns_field=anns_field,
                                search_params=dict(params))[0]
            frames.append(DataFrame([[{ID_FIELD: h["id"],
                                       SCORE_FIELD: hit_score_for_chain(h, route_metric),
                                       **h.get("entity", {})} for h in hits]]))
            metrics.append(route_metric)
        chain = _engine_call(
            build_hybrid_rerank_chain, strategy=ranker.get("strategy", "rrf"),
            params=ranker.get("params", {}),
            search_params={"limit": limit, "offset": 0, "group_by_field": None,
                           "group_size": 1, "metric_types": metrics})
        fused = _engine_call(chain.execute, *frames)
        virtual = {ID_FIELD, SCORE_FIELD, GROUP_SCORE_FIELD}
        result = [{"id": row[ID_FIELD], "distance": row[SCORE_FIELD],
                   "entity": {k: v for k, v in row.items() if k not in virtual}}
                  for row in (fused.chunk(0) if fused.num_chunks else [])]
        return self._as_pymilvus(col, fields, result)

    def get(self, collection: str, ids: Sequence[Any],
            output_fields: Sequence[str]) -> list[dict[str, Any]]:
        """The rows with these primary keys (missing ones left out), as pymilvus's query by id
        returns them. MilvusException on an engine error."""
        col = self._collection(collection)
        fields = list(output_fields)
        rows = _engine_call(get_rows, col, list(ids), fields)
        decode = schema_fields(col.schema).json.intersection(fields)
        for row in rows:
            for name in decode:
                row[name] = _parsed(row.get(name))
        return rows

    def _collection(self, name: str) -> Any:
        db = self._lookup(self._data_dir)
        if db is None or db.closed:
            raise MilvusException(message=f"Milvus Lite for {self._data_dir} is not open")
        return _engine_call(db.get_collection, name)  # resolves an alias; cached by the engine

    def _as_pymilvus(self, col: Any, fields: list[str],
                     hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`hits` (engine hits, changed in place) as pymilvus gives them: the primary key in
        each entity when asked for, JSON fields parsed."""
        known = schema_fields(col.schema)
        keys, decode = known.primary.intersection(fields), known.json.intersection(fields)
        for hit in hits:
            entity = hit["entity"]
            for key in keys:
                entity[key] = hit["id"]
            for name in decode:
                entity[name] = _parsed(entity.get(name))
        return hits


def get_rows(col: Any, pks: list[Any], output_fields: list[str]) -> list[dict[str, Any]]:
    """`col.get(pks, output_fields=output_fields)` of Milvus Lite 3.2.2's engine (the same
    records, in the same order, missing keys left out), reading only the requested columns of
    the segments holding the rows: the engine converts every column of each row to Python (a
    1,280-d image vector, two 384-d ones, ...) before projecting it to a few (0.77 ms for the
    10 products a photo query keeps; benchmarks/RESULTS.md, "The search replica's own CPU").
    Each key is looked up as the engine does: the memtable's live row, else its tombstone, else
    the newest version among the segments unless a tombstone is newer; a key asked for twice
    gets two records sharing no lists. Falls back to the engine's own `get` when a requested
    field is not a plain column of every segment."""
    from milvus_lite.engine.projection import build_projection_plan, project_record

    col._require_loaded()
    segments, tombstones = col._read_snapshot()
    primary = next(iter(schema_fields(col.schema).primary))
    columns = plain_columns(segments, output_fields, primary)
    if columns is None:
        return col.get(pks, output_fields=output_fields)
    plan = build_projection_plan(output_fields, col._schema, api_kind="get")
    memtable = col._memtable
    found: list[dict | tuple[int, int]] = []  # a memtable record, or (segment, row)
    for pk in pks:
        record = memtable.get(pk, partition_filter=None)
        if record is not None:
            found.append(record)
            continue
        if memtable.is_locally_deleted(pk):
            continue
        newest, best = -1, None
        for source, segment in enumerate(segments):
            row = segment.find_row(pk)
            if row is not None and int(segment.seqs[row]) > newest:
                newest, best = int(segment.seqs[row]), (source, row)
        if best is not None and not tombstones.is_deleted(pk, newest):
            found.append(best)
    # Cell by cell (0.13 ms for 10 rows of the store's scalar fields), not with an Arrow
    # `take` (0.12 ms): `take` releases the GIL, and beside a busy Python thread getting it back
    # cost 19 ms; cells cost the same either way (the engine's `get`: 0.9 / 1.8 ms).
    arrays: dict[int, list] = {}

    def record(item: dict | tuple[int, int]) -> dict:
        if not isinstance(item, tuple):
            return item
        source, row = item
        if source not in arrays:
            arrays[source] = [segments[source].table.column(name) for name in columns]
        return {name: array[row].as_py()
                for name, array in zip(columns, arrays[source], strict=True)}

    return [project_record(record(item), col._schema, plan) for item in found]


def _engine_call(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """`func(...)`, its milvus_lite errors raised as MilvusException with their message."""
    try:
        return func(*args, **kwargs)
    except MilvusException:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "milvus_lite":
            raise
        raise MilvusException(message=f"{type(exc).__name__}: {exc}") from exc


def _parsed(value: Any) -> Any:
    """A JSON column's value as pymilvus gives it (the engine keeps it as text)."""
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def reader(uri: str) -> LiteReader | None:
    """A reader of the embedded Milvus Lite engine for local data path `uri`, or None where
    reads must go through pymilvus (another Milvus Lite version, or none installed)."""
    try:
        import milvus_lite
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return None
    version = getattr(milvus_lite, "__version__", "")
    if version not in SUPPORTED_VERSIONS:
        log.info("Milvus Lite %s: reads go through pymilvus (direct reads written for %s)",
                 version, ", ".join(SUPPORTED_VERSIONS))
        return None
    servers = server_manager_instance._servers  # noqa: SLF001 - path -> (server, db, port)

    def lookup(path: str) -> Any:
        entry = servers.get(path)
        return entry[1] if entry else None

    return LiteReader(os.path.abspath(uri), lookup)
