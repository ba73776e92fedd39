"""The Milvus store: the one module that knows the collection schema and speaks to Milvus.

One collection per catalogue holds an image vector, a text vector and typed scalar attributes
(extra attributes in a JSON field). The URI is a local path (embedded Milvus Lite, one process per
data dir, writes serialised) or a server URL. Callers see products and scores, never the client.
On embedded Milvus Lite, searches and reads by id call the engine in this process
(deployments.core.lite_reads) instead of its gRPC server.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import pymilvus
from pymilvus import (
    AnnSearchRequest,
    DataType,
    MilvusClient,
    MilvusException,
    RRFRanker,
    WeightedRanker,
)

from deployments.core import lite_reads, lite_search
from deployments.core.colour import COLOUR_DIMS
from deployments.core.errors import BackendUnavailable, IncompatibleStore, InvalidInput
from deployments.core.filters import Filters
from deployments.core.products import (
    PREDICTED_FIELDS,
    STRING_FIELDS,
    STRING_LIMITS,
    UTF8_MAX_BYTES,
    Prediction,
    Product,
)
from deployments.core.settings import MilvusSettings
from deployments.core.versions import PROVENANCE_KEY

log = logging.getLogger(__name__)

VectorField = Literal["image", "text"]
VECTOR_FIELDS = {"image": "image_vector", "text": "text_vector"}
# What the fitted heads predict, apart from the shop's labels: per field its value
# (`predicted_colour`, VARCHAR, "" = none) and confidence (`predicted_colour_p`, FLOAT 0..1), and
# the heads version that wrote them (`predicted_by`, "" = none: no prediction, no projection).
PREDICTED_VALUE = {name: f"predicted_{name}" for name in PREDICTED_FIELDS}
PREDICTED_CONFIDENCE = {name: f"predicted_{name}_p" for name in PREDICTED_FIELDS}
PREDICTED_BY = "predicted_by"
PREDICTION_FIELDS = (*PREDICTED_VALUE.values(), *PREDICTED_CONFIDENCE.values(), PREDICTED_BY)
SCALAR_FIELDS = (
    "id", "title", *STRING_FIELDS, "price", "attributes", "image_ref", "image_hash", "fingerprint",
    *PREDICTION_FIELDS,
)
# VARCHAR max_length counts UTF-8 bytes on a Milvus server (Milvus Lite counts characters):
# room for the longest value Product accepts (STRING_LIMITS, in characters) in any script.
VARCHAR_BYTES = {name: chars * UTF8_MAX_BYTES for name, chars in STRING_LIMITS.items()} | {
    PREDICTED_VALUE[name]: STRING_LIMITS[name] * UTF8_MAX_BYTES for name in PREDICTED_FIELDS} | {
    PREDICTED_BY: 64}
# Scalar field types of the schema (prices DOUBLE: read back exactly as sent).
SCALAR_TYPES = {name: DataType.VARCHAR for name in VARCHAR_BYTES} | {
    "price": DataType.DOUBLE, "attributes": DataType.JSON} | {
    name: DataType.FLOAT for name in PREDICTED_CONFIDENCE.values()}
REBUILD = ("rebuild it: `python -m batch_index drop` (same --milvus-uri / --collection), then "
           "index the catalogue again with `python -m batch_index index --catalog ...`")


COLOUR_FIELD = "colour_vector"
# Each product's photo projected into the text space by the fitted heads (Heads.project, text_dim,
# L2-normalised), so text queries find it by its pixels; all zero until heads have written it.
PHOTO_TEXT_FIELD = "photo_text_vector"
# What re-ranking reads of each pool candidate (searcher.by_image): labels, the photo (grey
# likeness) and its hash; with the colour descriptor. Full products only for the k returned.
POOL_FIELDS = ("id", "title", "article_type", "colour", "image_ref", "image_hash")


@dataclass
class Hit:
    """One search result: the product, its similarity (higher is more similar), its stored
    colour descriptor when asked for, and per-signal scores when re-ranked with explain."""

    product: Product
    score: float
    colour: np.ndarray | None = None
    signals: dict[str, Any] | None = None
    heads_version: str | None = None  # the fitted heads artifact that ranked it, if any
    found_by: str | None = None  # with heads, a text search says: "text", "photo" or "both"


@dataclass(frozen=True)
class AttributeCounts:
    """Value counts of the catalogue, field -> {value: count}, most common first. `own`: the
    shop's values, each typed field (STRING_FIELDS) and JSON attribute by its name; `predicted`:
    the fitted heads' stored predictions, each PREDICTED_FIELDS field by its name. Kept apart,
    so a predicted value never passes for a label of the shop's."""

    own: dict[str, dict[str, int]]
    predicted: dict[str, dict[str, int]]


def _most_common(counts: dict[str, Counter], n: int) -> dict[str, dict[str, int]]:
    """Each field's n most common values (most common first); fields without values left out."""
    return {name: dict(c.most_common(n)) for name, c in counts.items() if c}


def literal(value: Any) -> str:
    """Render a Python value as a Milvus expression literal, escaped (no injection possible)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and np.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise InvalidInput(f"unsupported filter value {value!r}", code="invalid_filter")


def expr_in(field: str, values: Iterable[Any]) -> str:
    """`field in [v1, v2, ...]` with every value escaped."""
    return f"{field} in [{', '.join(literal(v) for v in values)}]"


def _colour(entity: dict[str, Any]) -> np.ndarray | None:
    vector = np.asarray(entity.get(COLOUR_FIELD) or [], dtype=np.float32)
    return vector if vector.size and vector.any() else None


def _colours(entities: Sequence[dict[str, Any]]) -> list[np.ndarray | None]:
    """`_colour` of each entity ((COLOUR_DIMS,) float32, or None for none or all zeros), in one
    array conversion for a whole pool rather than one per hit."""
    vectors = [entity.get(COLOUR_FIELD) or () for entity in entities]
    if any(len(v) != COLOUR_DIMS for v in vectors):
        return [_colour(entity) for entity in entities]
    matrix = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), COLOUR_DIMS)
    return [row if present else None
            for row, present in zip(matrix, matrix.any(axis=1).tolist(), strict=True)]


def _cosines(query: np.ndarray, stored: Sequence[Sequence[float]]) -> np.ndarray:
    """(n,) cosines of a query vector and n stored ones (0 where either is all zero)."""
    if not len(stored):
        return np.zeros(0)
    matrix = np.asarray(stored, np.float32)
    norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(query))
    return np.where(norms > 0, matrix @ query / np.maximum(norms, 1e-30), 0.0)


def filter_expression(filters: Filters, vocabulary: dict[str, dict[str, str]] | None = None,
                      predicted: dict[str, dict[str, str]] | None = None) -> str:
    """A Milvus boolean expression for the filters, every value escaped. `vocabulary` maps a
    field's lower-cased values to the catalogue's spelling, so `red` finds `Red`; `predicted`
    does the same for the stored predictions' values (default: `vocabulary`)."""
    vocabulary = vocabulary or {}
    predicted = vocabulary if predicted is None else predicted
    clauses = []
    for name in STRING_FIELDS:
        values = getattr(filters, name)
        if values:
            known = vocabulary.get(name, {})
            clauses.append(expr_in(name, [known.get(v.lower(), v) for v in values]))
    if filters.price_min is not None:
        clauses.append(f"price >= {literal(filters.price_min)}")
    if filters.price_max is not None:
        clauses.append(f"price <= {literal(filters.price_max)}")
    for name, values in filters.attributes.items():
        path = f"attributes[{literal(name)}]"  # JSON paths take == only, not `in`
        clauses.append("(" + " or ".join(f"{path} == {literal(v)}" for v in values) + ")")
    for name, values in filters.predicted.items():  # the heads' predictions, not the labels
        known = predicted.get(name, {})
        clauses.append(expr_in(PREDICTED_VALUE[name], [known.get(v.lower(), v) for v in values]))
        if filters.predicted_confidence_min is not None:
            # Confidences are stored as FLOAT (float32): 0.2825 is kept as 0.28249999..., so
            # the bound is compared at that precision (a shown confidence filters itself in).
            bound = float(np.float32(filters.predicted_confidence_min)) - 1e-7
            clauses.append(f"{PREDICTED_CONFIDENCE[name]} >= {literal(bound)}")
    return " and ".join(clauses)


def recognised_expression(recognised: dict[str, list[str]], predicted: bool = True) -> str:
    """Products that may show every value a text query named (field -> values, in the
    catalogue's spelling): by their own label, or, where they have no label of that field, by
    the value the fitted heads predicted from their photo (`predicted=False`: any product
    without a label of that field, for a caller that weighs the heads' probabilities itself).
    Every value escaped."""
    clauses = []
    for name, values in recognised.items():
        own = expr_in(name, values)
        if name in PREDICTED_VALUE:
            guess = expr_in(PREDICTED_VALUE[name], values) if predicted else "true"
            own = f"({own} or ({name} == \"\" and {guess}))"
        clauses.append(own)
    return " and ".join(clauses)


def _backend_errors(func):
    """Turn client failures into BackendUnavailable (the API answers 503). A collection found
    released (a restarted server forgets what was loaded) is loaded again and the call retried."""

    @functools.wraps(func)
    def wrapper(self: ProductStore, *args, **kwargs):
        try:
            try:
                return func(self, *args, **kwargs)
            except MilvusException as exc:
                if "released" not in exc.message and "not loaded" not in exc.message:
                    raise
                log.warning("collection %s was released; loading it again", self.collection)
                self._client.load_collection(self.collection,
                                             replica_number=self.settings.replica_number)
                return func(self, *args, **kwargs)
        except MilvusException as exc:
            raise BackendUnavailable(f"Milvus failed: {exc.message}") from exc
        except (ConnectionError, TimeoutError) as exc:
            raise BackendUnavailable(f"Milvus unreachable: {exc}") from exc
        except Exception as exc:
            if not client_failure(exc):
                raise
            log.warning("Milvus client error in %s: %r", func.__name__, exc)
            raise BackendUnavailable(f"Milvus failed: {_client_error_name(exc)}") from exc

    return wrapper


# Packages whose exceptions mean "the Milvus client failed", whatever their type: raw gRPC errors
# (DEADLINE_EXCEEDED, UNAVAILABLE; grpc.aio's too) escape pymilvus unwrapped, and they cannot be
# pickled across Ray, so an unwrapped one reached the ingress as a 500.
CLIENT_PACKAGES = ("pymilvus", "grpc", "milvus_lite")
_CLIENT_DIRS = tuple(str(Path(module.__file__).parent) + "/" for module in (pymilvus, grpc))


def client_failure(exc: BaseException) -> bool:
    """Whether an exception came from the Milvus client stack: a pymilvus / gRPC exception type
    (MilvusException or not), or any exception raised from inside those packages."""
    if isinstance(exc, (MilvusException, grpc.RpcError, grpc.FutureTimeoutError)):
        return True
    if type(exc).__module__.split(".")[0] in CLIENT_PACKAGES:
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_CLIENT_DIRS)


def _client_error_name(exc: BaseException) -> str:
    """A short, picklable description: the gRPC status when there is one, else the type."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            status = code()
            return f"gRPC {getattr(status, 'name', status)}"
        except Exception:  # not a finished call
            pass
    return type(exc).__name__


class ProductStore:
    """Products and their vectors in one Milvus collection."""

    def __init__(self, settings: MilvusSettings) -> None:
        self.settings = settings
        self.collection = settings.collection
        self._write_lock = threading.Lock()
        self._read = {"timeout": settings.read_timeout_s}
        self._write = {"timeout": settings.timeout_s}
        self._client = self._connect()
        # Embedded Milvus Lite: hot reads go straight to the engine in this process.
        self._direct = (lite_reads.reader(settings.uri)
                        if settings.is_lite and settings.lite_direct_reads else None)

    @_backend_errors
    def _connect(self) -> MilvusClient:
        uri = self.settings.uri
        if self.settings.is_lite:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            if self.settings.lite_search_cache:
                lite_search.install()
        # Reconnect quickly once a restarted server is back (gRPC's default backoff grows to
        # many seconds during an outage, which delays recovery by as much).
        fast_reconnect = {"grpc.initial_reconnect_backoff_ms": 200,
                          "grpc.min_reconnect_backoff_ms": 200,
                          "grpc.max_reconnect_backoff_ms": 1000}
        return MilvusClient(uri=uri, token=self.settings.token, timeout=self.settings.timeout_s,
                            grpc_options=fast_reconnect)

    # -- collection lifecycle -------------------------------------------------------------
    @_backend_errors
    def ensure_collection(self, image_dim: int, text_dim: int) -> None:
        """Create the collection (schema, indexes, shards) if missing, else check that its
        schema is this version's (IncompatibleStore names the rebuild command); load it."""
        if self._client.has_collection(self.collection):
            self._check_schema(image_dim, text_dim)
        else:
            self._create(image_dim, text_dim)
        self._client.load_collection(self.collection, replica_number=self.settings.replica_number)

    def _create(self, image_dim: int, text_dim: int, properties: dict | None = None) -> None:
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=VARCHAR_BYTES["id"])
        schema.add_field("title", DataType.VARCHAR, max_length=VARCHAR_BYTES["title"])
        for name in STRING_FIELDS:
            schema.add_field(name, DataType.VARCHAR, max_length=VARCHAR_BYTES[name],
                             default_value="")
        schema.add_field("price", DataType.DOUBLE, nullable=True)
        schema.add_field("attributes", DataType.JSON)
        for name in ("image_ref", "image_hash", "fingerprint"):
            schema.add_field(name, DataType.VARCHAR, max_length=VARCHAR_BYTES[name])
        schema.add_field("image_vector", DataType.FLOAT_VECTOR, dim=image_dim)
        schema.add_field("text_vector", DataType.FLOAT_VECTOR, dim=text_dim)
        schema.add_field(COLOUR_FIELD, DataType.FLOAT_VECTOR, dim=COLOUR_DIMS)
        for name in PREDICTED_FIELDS:
            schema.add_field(PREDICTED_VALUE[name], DataType.VARCHAR,
                             max_length=VARCHAR_BYTES[PREDICTED_VALUE[name]], default_value="")
            schema.add_field(PREDICTED_CONFIDENCE[name], DataType.FLOAT, default_value=0.0)
        schema.add_field(PREDICTED_BY, DataType.VARCHAR, max_length=VARCHAR_BYTES[PREDICTED_BY],
                         default_value="")
        schema.add_field(PHOTO_TEXT_FIELD, DataType.FLOAT_VECTOR, dim=text_dim)
        index = self._client.prepare_index_params()
        for field in (*VECTOR_FIELDS.values(), PHOTO_TEXT_FIELD):
            index.add_index(
                field, index_type=self.settings.index_type, metric_type=self.settings.metric,
                params=self.settings.index_params,
            )
        # The colour descriptor is only read back for re-ranking, never searched at scale.
        index.add_index(COLOUR_FIELD, index_type="FLAT", metric_type="IP", params={})
        self._client.create_collection(
            self.collection, schema=schema, index_params=index,
            num_shards=self.settings.num_shards,
            consistency_level=self.settings.consistency_level, properties=properties or {},
        )
        log.info("created collection %s (image %d-d, text %d-d, %s %s)", self.collection,
                 image_dim, text_dim, self.settings.index_type, self.settings.metric)

    def _check_schema(self, image_dim: int, text_dim: int) -> None:
        fields = self._client.describe_collection(self.collection)["fields"]
        # An earlier schema kept prices as FLOAT (19.99 read back as 19.989999771118164) and
        # sized VARCHARs in characters, and had no fields for fitted heads (schema 3): serving
        # from it would give wrong answers or fail on writes.
        wrong = []
        for field in fields:
            name, kind = field["name"], DataType(field["type"])
            expected = SCALAR_TYPES.get(name)
            if expected is not None and kind != expected:
                wrong.append(f"{name} is {kind.name}, not {expected.name}")
            elif expected == DataType.VARCHAR:
                size = int(field.get("params", {}).get("max_length", 0))
                if size < VARCHAR_BYTES[name]:
                    wrong.append(f"{name} holds {size} bytes, not {VARCHAR_BYTES[name]}")
        missing = {*SCALAR_FIELDS, COLOUR_FIELD, PHOTO_TEXT_FIELD} - {f["name"] for f in fields}
        if missing:
            wrong.append(f"it lacks fields {sorted(missing)}")
        if wrong:
            raise IncompatibleStore(
                f"collection {self.collection!r} was made by an earlier schema "
                f"({'; '.join(wrong)}); {REBUILD}",
            )
        dims = {f["name"]: f.get("params", {}).get("dim") for f in fields}
        expected = {"image_vector": image_dim, "text_vector": text_dim,
                    PHOTO_TEXT_FIELD: text_dim}
        for name, dim in expected.items():
            if dims.get(name) is not None and int(dims[name]) != dim:
                raise IncompatibleStore(
                    f"collection {self.collection!r} has {name} of {dims[name]} dims but the "
                    f"configured model gives {dim}; drop it or use another collection",
                    code="dimension_mismatch",
                )

    def _engine(self) -> lite_reads.LiteReader | None:
        """The embedded engine's reader when this process has it open, else None (reads go
        through the client)."""
        return self._direct if self._direct is not None and self._direct.available() else None

    def _search_rows(self, vectors: np.ndarray, field: str, k: int, expr: str,
                     output_fields: Sequence[str]) -> list[list[dict[str, Any]]]:
        """pymilvus-shaped hits of a dense search of `field` for each row of `vectors` ((n, dim)
        float32): from the embedded engine in this process when there is one
        (deployments.core.lite_reads: no gRPC round trip), else through the client."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if engine := self._engine():
            return engine.search(self.collection, vectors, field, k, expr, output_fields,
                                 self.settings.metric, self._search_params(k))
        return self._client.search(
            self.collection, data=vectors.tolist(), anns_field=field, limit=k, filter=expr,
            output_fields=list(output_fields),
            search_params={"metric_type": self.settings.metric,
                           "params": self._search_params(k)}, **self._read,
        )

    def _search_params(self, k: int) -> dict[str, Any]:
        """The configured search params for a search `k` deep, with an HNSW index's `ef` (the
        candidate list its search keeps) raised to at least k. Below k, HNSW returns only part
        of the true top k (benchmarks/RESULTS.md, "ef below k"), and a Milvus server refuses
        such a search outright ("ef(128) should be larger than k(200)", milvus-io/knowhere#929),
        which a 200-candidate re-ranking pool is."""
        params = dict(self.settings.search_params)
        if "HNSW" in self.settings.index_type.upper() and "ef" in params:
            params["ef"] = max(int(params["ef"]), k)
        return params

    def _hybrid_rows(self, routes: Sequence[tuple[np.ndarray, str, int, str]],
                     ranker: RRFRanker | WeightedRanker, k: int,
                     output_fields: Sequence[str]) -> list[dict[str, Any]]:
        """pymilvus-shaped fused hits of one hybrid search: each route (vector (dim,) float32,
        field, depth, filter) searched and fused by `ranker`, from the embedded engine when
        there is one, else through the client."""
        if engine := self._engine():
            deepest = max((depth for _, _, depth, _ in routes), default=k)
            return engine.hybrid_search(self.collection, routes, ranker.dict(), k,
                                        output_fields, self.settings.metric,
                                        self._search_params(deepest))
        requests = [AnnSearchRequest([np.asarray(v, np.float32).tolist()], field,
                                     {"metric_type": self.settings.metric,
                                      "params": self._search_params(depth)},
                                     depth, filter=expr or None)
                    for v, field, depth, expr in routes]
        return self._client.hybrid_search(self.collection, requests, ranker, limit=k,
                                          output_fields=list(output_fields), **self._read)[0]

    def _rows_by_id(self, ids: Sequence[str], output_fields: Sequence[str],
                    strong: bool = False) -> list[dict[str, Any]]:
        """The rows with these ids (missing ones left out, any order): from the embedded engine
        when there is one (which reads every acknowledged write), else a query by id through the
        client (`strong`: with Strong consistency, else the searches')."""
        if engine := self._engine():
            return engine.get(self.collection, ids, output_fields)
        consistency = {"consistency_level": "Strong"} if strong else {}
        return self._client.query(self.collection, filter=expr_in("id", ids),
                                  output_fields=list(output_fields), **consistency, **self._read)

    @_backend_errors
    def exists(self) -> bool:
        """Whether the collection exists."""
        return self._client.has_collection(self.collection, **self._write)

    @_backend_errors
    def drop(self) -> None:
        """Delete the collection and everything in it."""
        if self._client.has_collection(self.collection, **self._write):
            self._client.drop_collection(self.collection, **self._write)

    @_backend_errors
    def ping(self) -> None:
        """Raise BackendUnavailable unless Milvus answers."""
        self._client.has_collection(self.collection, **self._read)

    @_backend_errors
    def close(self) -> None:
        """Release the client (Milvus Lite flushes and frees the data dir)."""
        self._client.close()

    # -- versions and the alias (deployments.core.versions) -------------------------------
    def for_collection(self, name: str) -> ProductStore:
        """This store bound to another (physical) collection, sharing the client and lock."""
        other = copy.copy(self)
        other.collection = name
        return other

    @_backend_errors
    def create_version(self, name: str, image_dim: int, text_dim: int, provenance: str) -> None:
        """Create physical collection `name` recording `provenance` (JSON) and load it."""
        self.for_collection(name)._create(image_dim, text_dim, {PROVENANCE_KEY: provenance})
        self._client.load_collection(name, replica_number=self.settings.replica_number)

    @_backend_errors
    def provenance(self, name: str | None = None) -> str | None:
        """The provenance JSON recorded on a collection (default: this one), or None."""
        info = self._client.describe_collection(name or self.collection, **self._read)
        return (info.get("properties") or {}).get(PROVENANCE_KEY)

    @_backend_errors
    def alias_target(self) -> str | None:
        """The physical collection this store's name is an alias of (None: not an alias)."""
        # list_aliases() without a collection lists none on Milvus Lite; describe resolves.
        if not self._client.has_collection(self.collection, **self._read):
            return None
        name = self._client.describe_collection(self.collection, **self._read)["collection_name"]
        return name if name != self.collection else None

    @_backend_errors
    def point_alias(self, target: str) -> None:
        """Make this store's name an alias of `target` (atomic switch when it exists)."""
        with self._write_lock:
            if self.alias_target() is None:
                self._client.create_alias(target, self.collection, **self._write)
            else:
                self._client.alter_alias(target, self.collection, **self._write)

    @_backend_errors
    def collections(self) -> list[str]:
        """Every physical collection in the database."""
        return list(self._client.list_collections(**self._read))

    @_backend_errors
    def all_products(self) -> list[Product]:
        """Every product of this collection (a rebuild's input), in storage order."""
        found: list[Product] = []
        # A collection of an older schema (a rebuild's source) lacks the newer fields.
        present = {f["name"] for f in self._client.describe_collection(
            self.collection, **self._read)["fields"]}
        for batch in self._batches([f for f in SCALAR_FIELDS if f in present]):
            found += [self._product(r) for r in batch]
        return found

    @_backend_errors
    def vectors(self, field: VectorField) -> tuple[list[str], np.ndarray]:
        """Every product's id and `field` vector ((n, dim) float32), for exact-search checks."""
        rows = self._query_all(["id", VECTOR_FIELDS[field]])
        return ([r["id"] for r in rows],
                np.asarray([r[VECTOR_FIELDS[field]] for r in rows], dtype=np.float32))

    @_backend_errors
    def drop_alias(self) -> None:
        """Remove this store's name as an alias (the collections stay)."""
        with self._write_lock:
            self._client.drop_alias(self.collection, **self._write)

    @_backend_errors
    def drop_collection(self, name: str) -> None:
        """Drop one physical collection (not the alias target: see versions)."""
        self._client.drop_collection(name, **self._write)

    # -- writes -------------------------------------------------------------------------
    @_backend_errors
    def upsert(
        self, products: Sequence[Product], image_vectors: np.ndarray, text_vectors: np.ndarray,
        colour_vectors: np.ndarray | None = None, photo_text_vectors: np.ndarray | None = None,
        predicted_by: str = "",
    ) -> int:
        """Insert or replace products by id with their vectors (image (n, image_dim), text
        (n, text_dim) float32, L2-normalised; colour (n, COLOUR_DIMS) float32); returns rows
        written. Without colour descriptors, products simply get no colour signal in
        re-ranking. `photo_text_vectors` (n, text_dim) float32: the photos projected by the
        fitted heads `predicted_by` (a version), which also made each product's `predicted`
        values (without them: an all-zero projection, which no search uses).
        ValueError when the lengths differ; BackendUnavailable when Milvus fails."""
        n = len(products)
        if colour_vectors is None:
            colour_vectors = np.zeros((n, COLOUR_DIMS), dtype=np.float32)
        if photo_text_vectors is None:  # no alignment head: no projection to search
            photo_text_vectors = np.zeros((n, np.shape(text_vectors)[-1]), dtype=np.float32)
        lengths = {len(image_vectors), len(text_vectors), len(colour_vectors),
                   len(photo_text_vectors)}
        if lengths != {n}:
            raise ValueError("products and vectors differ in length")
        if not products:
            return 0
        rows = [
            {**p.model_dump(exclude={"predicted"}), **_prediction_columns(p, predicted_by),
             "image_vector": iv.tolist(), "text_vector": tv.tolist(), COLOUR_FIELD: cv.tolist(),
             PHOTO_TEXT_FIELD: pv.tolist()}
            for p, iv, tv, cv, pv in zip(products, image_vectors, text_vectors, colour_vectors,
                                         photo_text_vectors, strict=True)
        ]
        with self._write_lock:
            result = self._client.upsert(self.collection, rows, **self._write)
        return int(result.get("upsert_count", len(rows)))

    @_backend_errors
    def annotate(self, annotator: Callable[[np.ndarray, np.ndarray], tuple[
                 np.ndarray, list[dict[str, Prediction]]]], predicted_by: str,
                 batch_size: int = 256) -> int:
        """Give every stored product its projected photo vector and predicted attributes from
        fitted heads (`predicted_by`: their version). `annotator(image (n, image_dim), colour
        (n, COLOUR_DIMS))` returns the projected vectors ((n, text_dim) float32, L2-normalised)
        and per product its predictions. Milvus upserts whole rows, so each batch of products
        is read in full and written back, under the write lock (a write by another process
        between the read and the write of a batch would be undone: run it when the catalogue
        is quiet, or through the service that owns the store). Returns rows written."""
        ids = [r["id"] for r in self._query_all(["id"], batch_size)]
        fields = [*SCALAR_FIELDS, *VECTOR_FIELDS.values(), COLOUR_FIELD]
        written = 0
        for start in range(0, len(ids), batch_size):
            with self._write_lock:
                rows = self._client.query(self.collection, filter=expr_in(
                    "id", ids[start: start + batch_size]), output_fields=fields,
                    consistency_level="Strong", **self._write)
                if not rows:
                    continue
                image = np.asarray([r["image_vector"] for r in rows], np.float32)
                colour = np.asarray([r[COLOUR_FIELD] for r in rows], np.float32)
                projected, predictions = annotator(image, colour)
                for row, vector, predicted in zip(rows, projected, predictions, strict=True):
                    row.update(_prediction_columns(Product.model_construct(
                        predicted=predicted), predicted_by))
                    row[PHOTO_TEXT_FIELD] = np.asarray(vector, np.float32).tolist()
                    row.pop("$meta", None)
                result = self._client.upsert(self.collection, rows, **self._write)
            written += int(result.get("upsert_count", len(rows)))
        return written

    def _batches(self, fields: list[str], batch_size: int = 4096) -> Iterator[list[dict[str, Any]]]:
        """Every row of the collection, only `fields`, a batch at a time (the query iterator
        is closed however the caller stops)."""
        iterator = self._client.query_iterator(self.collection, batch_size=batch_size,
                                               output_fields=fields, **self._write)
        try:
            while batch := iterator.next():
                yield batch
        finally:
            iterator.close()

    def _query_all(self, fields: list[str], batch_size: int = 4096) -> list[dict[str, Any]]:
        """Every row of the collection, only `fields`."""
        return [row for batch in self._batches(fields, batch_size) for row in batch]

    @_backend_errors
    def flush(self) -> None:
        """Seal written rows so they are served from the vector index. Milvus Lite otherwise
        searches unflushed rows by brute force (about 0.7 s per search at 7k rows, measured)."""
        with self._write_lock:
            self._client.flush(self.collection, **self._write)

    @_backend_errors
    def delete(self, ids: Sequence[str]) -> int:
        """Delete products by id; returns how many existed."""
        existing = [p.id for p in self.get(ids)]
        if existing:
            with self._write_lock:
                self._client.delete(self.collection, filter=expr_in("id", existing),
                                    **self._write)
        return len(existing)

    # -- reads --------------------------------------------------------------------------
    @_backend_errors
    def get(self, ids: Sequence[str]) -> list[Product]:
        """Products with these ids (missing ids are left out), in the order asked."""
        if not ids:
            return []
        rows = self._rows_by_id(ids, SCALAR_FIELDS, strong=True)
        by_id = {r["id"]: self._product(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    @_backend_errors
    def get_vectors(self, product_id: str) -> dict[str, np.ndarray] | None:
        """The stored vectors of one product, or None: `image` (image_dim,), `text`
        (text_dim,) and `colour` (COLOUR_DIMS,), float32 (colour all zero when none)."""
        rows = self._rows_by_id([product_id], [*VECTOR_FIELDS.values(), COLOUR_FIELD],
                                strong=True)
        if not rows:
            return None
        fields = {**VECTOR_FIELDS, "colour": COLOUR_FIELD}
        return {k: np.asarray(rows[0][f], dtype=np.float32) for k, f in fields.items()}

    @_backend_errors
    def fingerprints(self, ids: Sequence[str] | None = None) -> dict[str, str]:
        """Stored content fingerprint per id (all products when ids is None), for skipping
        unchanged rows on re-index."""
        fields = ["id", "fingerprint"]
        if ids is not None:
            if not ids:
                return {}
            rows = self._client.query(self.collection, filter=expr_in("id", ids),
                                      output_fields=fields, consistency_level="Strong",
                                      **self._write)
            return {r["id"]: r["fingerprint"] for r in rows}
        return {r["id"]: r["fingerprint"] for batch in self._batches(fields) for r in batch}

    @_backend_errors
    def vectors_and_labels(self, batch_size: int = 2048) -> dict[str, Any]:
        """Every product's stored vectors and labels, for fitting heads (deployments.core.heads):
        `ids`, `titles`, `labels` (one list per STRING_FIELDS name, "" = none), and float32
        arrays `image` (n, image_dim), `text` (n, text_dim), `colour` (n, COLOUR_DIMS), and
        `image_hashes` (each product's photo content hash: products sharing a photo share it)."""
        fields = ["id", "title", "image_hash", *STRING_FIELDS, *VECTOR_FIELDS.values(),
                  COLOUR_FIELD]
        rows = self._query_all(fields, batch_size)
        result: dict[str, Any] = {"ids": [r["id"] for r in rows],
                                  "titles": [r["title"] for r in rows],
                                  "image_hashes": [r["image_hash"] for r in rows]}
        result["labels"] = {name: [r.get(name) or "" for r in rows] for name in STRING_FIELDS}
        for key, name in {**VECTOR_FIELDS, "colour": COLOUR_FIELD}.items():
            result[key] = np.asarray([r[name] for r in rows], dtype=np.float32)
        return result

    @_backend_errors
    def list(self, limit: int = 20, offset: int = 0, filter: str = "") -> list[Product]:
        """Browse products (in storage order)."""
        rows = self._client.query(
            self.collection, filter=filter, limit=limit, offset=offset,
            output_fields=list(SCALAR_FIELDS), **self._read,
        )
        return [self._product(r) for r in rows]

    @_backend_errors
    def attribute_counts(self, max_values: int = 100) -> AttributeCounts:
        """One scan of every product: for each typed field and JSON attribute (the shop's own
        values), and apart from them for each PREDICTED_FIELDS field (the fitted heads' stored
        predictions), its `max_values` most common values with counts, most common first.
        Fields without any value are left out."""
        own: dict[str, Counter] = {name: Counter() for name in STRING_FIELDS}
        predicted: dict[str, Counter] = {name: Counter() for name in PREDICTED_FIELDS}
        fields = [*STRING_FIELDS, "attributes", *PREDICTED_VALUE.values()]
        for batch in self._batches(fields):
            for row in batch:
                for name in STRING_FIELDS:
                    if row.get(name):
                        own[name][row[name]] += 1
                for name, value in (row.get("attributes") or {}).items():
                    if isinstance(value, str | int | float | bool):
                        own.setdefault(name, Counter())[value] += 1
                for name, column in PREDICTED_VALUE.items():
                    if row.get(column):  # "" = no prediction
                        predicted[name][row[column]] += 1
        return AttributeCounts(_most_common(own, max_values), _most_common(predicted, max_values))

    @_backend_errors
    def count(self, filter: str = "") -> int:
        """Number of products stored."""
        rows = self._client.query(
            self.collection, filter=filter, output_fields=["count(*)"],
            consistency_level="Strong", **self._read,
        )
        return int(rows[0]["count(*)"]) if rows else 0

    @_backend_errors
    def search(
        self,
        vector: np.ndarray,
        field: VectorField,
        k: int,
        filter: str = "",
        exclude_ids: Sequence[str] = (),
        with_colour: bool = False,
    ) -> list[Hit]:
        """The k products whose `field` vector is most similar to `vector` ((dim,) float32,
        L2-normalised), best first (`with_colour`: also return their colour descriptors, for
        re-ranking). BackendUnavailable when Milvus fails."""
        vectors = np.asarray(vector, dtype=np.float32)[None]
        return self.search_batch(vectors, field, k, filter, exclude_ids, with_colour)[0]

    @_backend_errors
    def search_batch(
        self,
        vectors: np.ndarray,
        field: VectorField,
        k: int,
        filter: str = "",
        exclude_ids: Sequence[str] = (),
        with_colour: bool = False,
    ) -> list[list[Hit]]:
        """`search` for each row of `vectors` ((n, dim) float32, L2-normalised) in one call."""
        clauses = [f"({filter})" if filter else "", f"not ({expr_in('id', exclude_ids)})"
                   if exclude_ids else ""]
        expr = " and ".join(c for c in clauses if c)
        fields = [*SCALAR_FIELDS, COLOUR_FIELD] if with_colour else list(SCALAR_FIELDS)
        result = self._search_rows(vectors, VECTOR_FIELDS[field], k, expr, fields)
        return [[Hit(self._product(h["entity"]), float(h["distance"]),
                     _colour(h["entity"]) if with_colour else None) for h in row]
                for row in result]

    @_backend_errors
    def search_pool(
        self, vector: np.ndarray, field: VectorField, k: int, filter: str = "",
        exclude_ids: Sequence[str] = (),
    ) -> list[Hit]:
        """`search(..., with_colour=True)` for a re-ranking pool: each hit's product holds only
        POOL_FIELDS (the rest left at their defaults, unvalidated), so a pool of hundreds costs
        little to fetch and decode; `complete` then reads the full products of the few kept."""
        clauses = [f"({filter})" if filter else "", f"not ({expr_in('id', exclude_ids)})"
                   if exclude_ids else ""]
        result = self._search_rows(np.asarray(vector, dtype=np.float32)[None],
                                   VECTOR_FIELDS[field], k, " and ".join(c for c in clauses if c),
                                   [*POOL_FIELDS, COLOUR_FIELD])
        entities = [h["entity"] for h in result[0]]
        return [Hit(_pool_product({f: entity[f] for f in POOL_FIELDS
                                   if entity.get(f) is not None}), float(h["distance"]), colour)
                for h, entity, colour in zip(result[0], entities, _colours(entities),
                                             strict=True)]

    @_backend_errors
    def complete(self, hits: Sequence[Hit]) -> list[Hit]:
        """The hits with their full products, read in one query by id (the searches'
        consistency, not Strong); a product deleted since the search is left out."""
        if not hits:
            return []
        rows = self._rows_by_id([h.product.id for h in hits], SCALAR_FIELDS)
        by_id = {r["id"]: self._product(r) for r in rows}
        return [dataclasses.replace(h, product=by_id[h.product.id]) for h in hits
                if h.product.id in by_id]

    @_backend_errors
    def hybrid_search(
        self, image_vector: np.ndarray, text_vector: np.ndarray, k: int, filter: str = "",
        ranker: Literal["rrf", "weighted"] = "rrf", image_weight: float = 0.5,
        candidates: int = 100, similarities: bool = False,
    ) -> list[Hit]:
        """Fuse an image-vector and a text-vector search ((image_dim,) and (text_dim,) float32,
        L2-normalised) by RRF or weighted scores, best first; `score` is the fused score.
        `similarities`: each hit's `signals` also hold its `visual` and `text` cosines."""
        queries = {"image": np.asarray(image_vector, np.float32),
                   "text": np.asarray(text_vector, np.float32)}
        routes = [(v, VECTOR_FIELDS[field], max(k, candidates), filter)
                  for field, v in queries.items()]
        fuse = RRFRanker() if ranker == "rrf" else WeightedRanker(image_weight, 1 - image_weight)
        fields = list(SCALAR_FIELDS) + (list(VECTOR_FIELDS.values()) if similarities else [])
        result = self._hybrid_rows(routes, fuse, k, fields)
        hits = [Hit(self._product(h["entity"]), float(h["distance"])) for h in result]
        if similarities:
            cosines = {"visual" if f == "image" else f: _cosines(
                q, [h["entity"][VECTOR_FIELDS[f]] for h in result])
                for f, q in queries.items()}
            for i, hit in enumerate(hits):
                hit.signals = {name: float(c[i]) for name, c in cosines.items()}
        return hits

    @_backend_errors
    def text_and_photo_search(
        self, text_vector: np.ndarray, k: int, filter: str = "", candidates: int = 100,
        exclude_ids: Sequence[str] = (), fields: Sequence[str] | None = None,
    ) -> list[Hit]:
        """Products found by words through their titles and their photos: one Milvus hybrid
        search (RRF) of the text vectors and the projected photo vectors (PHOTO_TEXT_FIELD;
        only products fitted heads have written) with one text vector ((text_dim,) float32,
        L2-normalised). Each list is max(k, candidates) deep and every product either found is
        returned, best first by fused score (`score`), its `signals` holding its `text` and
        `photo` cosines to the query (so a caller can tell which list found it). `fields`
        (product fields; None: all, validated): each hit's product holds only these and their
        stored predictions, unvalidated, as `search_pool`'s do, for `complete` to read in full
        once ranked (hundreds of hits cost little to fetch and decode)."""
        depth = max(k, candidates)
        clauses = [f"({filter})" if filter else "",
                   f"not ({expr_in('id', exclude_ids)})" if exclude_ids else ""]
        text_filter = " and ".join(c for c in clauses if c)
        photo_filter = " and ".join(c for c in [*clauses, f'{PREDICTED_BY} != ""'] if c)
        query = np.asarray(text_vector, np.float32)
        routes = [(query, field, depth, expr) for field, expr in
                  ((VECTOR_FIELDS["text"], text_filter), (PHOTO_TEXT_FIELD, photo_filter))]
        scalars = list(SCALAR_FIELDS) if fields is None else _lean_columns(fields)
        result = self._hybrid_rows(routes, RRFRanker(), 2 * depth,
                                   [*scalars, VECTOR_FIELDS["text"], PHOTO_TEXT_FIELD])
        rows = [h["entity"] for h in result]
        text = _cosines(query, [r[VECTOR_FIELDS["text"]] for r in rows])
        photo = _cosines(query, [r[PHOTO_TEXT_FIELD] for r in rows])
        return [Hit(self._product(r) if fields is None else _lean_product(r),
                    float(h["distance"]), signals={"text": float(t), "photo": float(p)})
                for h, r, t, p in zip(result, rows, text, photo, strict=True)]

    @_backend_errors
    def image_features(self, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Stored image vector ((image_dim,) float32) and colour descriptor ((COLOUR_DIMS,)
        float32, all zero when none) per id found (the searches' consistency)."""
        if not ids:
            return {}
        rows = self._rows_by_id(ids, ["id", VECTOR_FIELDS["image"], COLOUR_FIELD])
        return {r["id"]: (np.asarray(r[VECTOR_FIELDS["image"]], np.float32),
                          np.asarray(r[COLOUR_FIELD] or np.zeros(COLOUR_DIMS), np.float32))
                for r in rows}

    @staticmethod
    def _product(row: dict[str, Any]) -> Product:
        data = {k: row.get(k) for k in SCALAR_FIELDS if k in row and k not in PREDICTION_FIELDS}
        data["attributes"] = data.get("attributes") or {}
        data["predicted"] = _predictions(row)
        return Product.model_validate(data)


# Every field at its default: pool products start from these with their few fields set
# (model_construct would evaluate every default factory per product, pydantic inspecting each
# factory's signature: 17 us against 0.9 us, x200 candidates per query).
_POOL_DEFAULTS = dict(Product.model_construct(id="", title="").__dict__)
PRODUCT_COLUMNS = frozenset(f for f in SCALAR_FIELDS if f not in PREDICTION_FIELDS)


def _lean_columns(fields: Sequence[str]) -> list[str]:
    """The columns of a lean product holding `fields`: id, those fields and, for predicted
    ones, their stored prediction (value, confidence)."""
    columns = ["id", *(f for f in fields if f != "id")]
    for name in fields:
        if name in PREDICTED_VALUE:
            columns += [PREDICTED_VALUE[name], PREDICTED_CONFIDENCE[name]]
    return columns


def _lean_product(row: dict[str, Any]) -> Product:
    """An unvalidated product of a lean row (`_lean_columns`), its predictions included."""
    fields = {k: v for k, v in row.items() if k in PRODUCT_COLUMNS and v is not None}
    return _pool_product({**fields, "predicted": _predictions(row)})


def _pool_product(fields: dict[str, Any]) -> Product:
    """An unvalidated product holding `fields` (POOL_FIELDS, or a lean row's), the rest at their
    defaults (fresh mutable ones, so no two share a dict)."""
    # What pydantic's model_construct does when given every field (no default factories run),
    # without its per-field loop: 0.9 us against 1.9 us for a template copy, x200 per query.
    product = Product.__new__(Product)
    _set = object.__setattr__
    _set(product, "__dict__", {**_POOL_DEFAULTS, "attributes": {}, "predicted": {}, **fields})
    _set(product, "__pydantic_fields_set__", set(fields))
    _set(product, "__pydantic_extra__", None)
    _set(product, "__pydantic_private__", None)
    return product


def _prediction_columns(product: Product, predicted_by: str) -> dict[str, Any]:
    """The stored prediction columns of a product: every PREDICTED_FIELDS value and confidence
    ("" and 0 where the heads predict nothing), and which heads made them."""
    columns: dict[str, Any] = {PREDICTED_BY: predicted_by if product.predicted else ""}
    for name in PREDICTED_FIELDS:
        prediction = product.predicted.get(name)
        columns[PREDICTED_VALUE[name]] = prediction.value if prediction else ""
        columns[PREDICTED_CONFIDENCE[name]] = float(prediction.confidence) if prediction else 0.0
    return columns


def _predictions(row: dict[str, Any]) -> dict[str, Prediction]:
    """The predictions stored in a row (fields without a predicted value left out)."""
    found = {}
    for name in PREDICTED_FIELDS:
        value = row.get(PREDICTED_VALUE[name])
        if value:
            confidence = min(max(float(row.get(PREDICTED_CONFIDENCE[name]) or 0.0), 0.0), 1.0)
            found[name] = Prediction(value=value, confidence=round(confidence, 4))
    return found
