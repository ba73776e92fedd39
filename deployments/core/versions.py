"""Versioned collections behind an alias, and what made each one (its provenance).

The configured collection name (`milvus.collection`, e.g. `products`) is an alias; the vectors
live in physical collections `products__v1`, `products__v2`, ... Each records in a collection
property (Milvus Lite 3.2.2 drops a schema description, properties survive) the image and text
models that made its vectors, the preprocessing and schema versions, the index settings, the
creation time and the fit artifact (none yet). A service never searches a collection whose
vectors come from another model than the vector it holds: `VersionRouter` sends each query to the
version made by the model that embedded it (tagged by the encoder), so a rolling update of the
encoders never mixes models, and writes go to the version the alias points at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deployments.core.errors import BackendUnavailable, IncompatibleStore
from deployments.core.settings import ImageModelSettings, MilvusSettings, TextModelSettings

log = logging.getLogger(__name__)

PROVENANCE_KEY = "shopsearch.provenance"
# Bump when the collection schema changes (fields, types); 2: DOUBLE prices, byte-sized VARCHARs;
# 3: predicted attributes and the projected photo vector of fitted heads (issue 13).
SCHEMA_VERSION = 3
# Bump when photo -> model pixels changes (padding, resize, normalisation) for the same weights.
PREPROCESSING_VERSION = 1
REBUILD_HINT = ("rebuild the index for the configured model beside the live one with "
                "`python -m batch_index rebuild --config <this config>` and then `python -m "
                "batch_index swap`, or point the service at the config that made it")
_VERSION = re.compile(r"^(?P<alias>.+)__v(?P<n>\d+)$")
_WEIGHT_IDS: dict[tuple[str, float, int], str] = {}


def _weights_id(weights: str) -> str:
    """A stable id of a checkpoint: `package`, `timm`, `none`, or sha256 of the file."""
    if weights in ("package", "timm", "none"):
        return weights
    return file_id(weights)


def file_id(path: str) -> str:
    """`sha256:<16 hex>` of a file's bytes (computed once per path, size and mtime in this
    process), or `file:<path>` when it cannot be read."""
    file = Path(path)
    try:
        stat = file.stat()
    except OSError:
        return f"file:{path}"
    key = (str(file.resolve()), stat.st_mtime, stat.st_size)
    if key not in _WEIGHT_IDS:
        digest = hashlib.sha256()
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _WEIGHT_IDS[key] = "sha256:" + digest.hexdigest()[:16]
    return _WEIGHT_IDS[key]


def image_model_id(settings: ImageModelSettings) -> str:
    """What identifies the vectors of an image model: architecture, weights, preprocessing."""
    return f"{settings.model_name}/{_weights_id(settings.weights)}/pp{PREPROCESSING_VERSION}"


def text_model_id(settings: TextModelSettings) -> str:
    """What identifies the vectors of a text model: its folder (default: the bundled MiniLM)."""
    return f"{settings.model_path or 'bundled:all-MiniLM-L6-v2'}/len{settings.max_length}"


class Provenance(BaseModel):
    """What made one collection's vectors."""

    version: int | None = None
    image_model: str
    image_dim: int
    image_settings: dict[str, Any] = {}
    text_model: str
    text_dim: int
    text_settings: dict[str, Any] = {}
    preprocessing: int = PREPROCESSING_VERSION
    schema_version: int = SCHEMA_VERSION
    index: dict[str, Any] = {}
    created_at: str = ""
    fit_artifact: str | None = None

    @classmethod
    def of(cls, image: ImageModelSettings, image_dim: int, text: TextModelSettings,
           text_dim: int, milvus: MilvusSettings, version: int | None = None) -> Provenance:
        """Provenance of a collection made now by these models and index settings."""
        return cls(
            version=version, image_model=image_model_id(image), image_dim=image_dim,
            image_settings=image.model_dump(exclude={"cache_dir", "device", "backend"}),
            text_model=text_model_id(text), text_dim=text_dim, text_settings=text.model_dump(
                exclude={"cache_dir", "device", "backend"}),
            index={"type": milvus.index_type, "metric": milvus.metric,
                   "params": milvus.index_params},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"))

    def image_model_settings(self, base: ImageModelSettings) -> ImageModelSettings:
        """The image model settings that made this collection (device and cache from `base`)."""
        return base.model_copy(update=self.image_settings)

    def text_model_settings(self, base: TextModelSettings) -> TextModelSettings:
        """The text model settings that made this collection (device and cache from
        `base`)."""
        return base.model_copy(update=self.text_settings)


class EncoderIdentity(BaseModel):
    """What the running encoders make: compared with a collection's provenance."""

    image_model: str
    image_dim: int
    text_model: str
    text_dim: int


def version_name(alias: str, n: int) -> str:
    """Physical collection of version n: `products__v3`."""
    return f"{alias}__v{n}"


def version_number(alias: str, name: str) -> int | None:
    """n for `alias__vn`, else None."""
    match = _VERSION.match(name)
    return int(match["n"]) if match and match["alias"] == alias else None


def mismatch(provenance: Provenance | None, encoders: EncoderIdentity) -> str:
    """Why a collection's vectors cannot be searched with these encoders ('' when they can).
    A collection made before provenance was recorded matches on dims alone."""
    if provenance is None:
        return ""
    wrong = []
    for kind in ("image", "text"):
        made, runs = getattr(provenance, f"{kind}_model"), getattr(encoders, f"{kind}_model")
        if made != runs:
            wrong.append(f"its {kind} vectors come from {made!r} but the service's {kind} "
                         f"encoder is {runs!r}")
    return "; ".join(wrong)


class VersionRouter:
    """Which physical collection serves a request: the version made by the model that embedded
    the query vector, else the one the alias points at. Holds one `Searcher` per version;
    `factory(store)` builds and starts one for a `ProductStore` bound to a physical collection.
    The alias target is re-read by `refresh` (the deployment calls it in the background) and on
    every write; a search never waits on it.
    """

    def __init__(self, store, factory) -> None:
        self.store = store
        self.alias = store.collection
        self.factory = factory
        self._lock = threading.Lock()
        self._searchers: dict[str, Any] = {}
        self._provenance: dict[str, Provenance | None] = {}
        self._target: str = ""
        self.encoders: EncoderIdentity | None = None

    def start(self, encoders: EncoderIdentity, image: ImageModelSettings | None = None,
              text: TextModelSettings | None = None) -> str:
        """Open the live collection (a fresh store: create `<alias>__v1` and point the alias at
        it, recording provenance from `image` / `text`); IncompatibleStore unless some version
        was made by these encoders. Returns the physical collection the alias points at."""
        self.encoders = encoders
        target = self.store.alias_target()
        if target is None and not self.store.exists():
            if image is None or text is None:
                raise IncompatibleStore(f"no collection {self.alias!r}; create it first")
            target = version_name(self.alias, 1)
            provenance = Provenance.of(image, encoders.image_dim, text, encoders.text_dim,
                                       self.store.settings, version=1).model_copy(update={
                "image_model": encoders.image_model, "text_model": encoders.text_model})
            self.store.create_version(target, encoders.image_dim, encoders.text_dim,
                                      provenance.model_dump_json())
            self.store.point_alias(target)
            log.info("created %s and alias %s -> it", target, self.alias)
        elif target is None:
            target = self.alias  # a collection made before versions: its own name
        self.provenance(target)
        problem = mismatch(self._provenance[target], encoders)
        if problem:
            other = self.version_for(encoders.image_model)
            if other is None or mismatch(self.provenance(other), encoders):
                raise IncompatibleStore(
                    f"collection {self.alias!r} ({target}) cannot be searched by this service: "
                    f"{problem}; {REBUILD_HINT}", code="model_mismatch")
            log.warning("alias %s -> %s was made by another model; this service's encoders "
                        "match %s, which serves their queries", self.alias, target, other)
        if self._provenance[target] is None:
            log.warning("collection %s records no provenance (made before versioned "
                        "collections); served as is. %s", target, REBUILD_HINT)
        self._set_target(target)
        return target

    def provenance(self, collection: str) -> Provenance | None:
        """The recorded provenance of a physical collection (None when it has none)."""
        if collection not in self._provenance:
            raw = self.store.provenance(collection)
            self._provenance[collection] = Provenance.model_validate_json(raw) if raw else None
        return self._provenance[collection]

    def _set_target(self, target: str) -> None:
        self.provenance(target)
        self.searcher(target)  # opened before anyone is sent to it
        self._target = target

    def refresh(self) -> str:
        """Re-read which collection the alias points at (opening it first); returns it."""
        self._set_target(self.store.alias_target() or self.alias)
        return self._target

    def target(self, fresh: bool = False) -> str:
        """The physical collection the alias points at, as last read (`fresh`: read now)."""
        return self.refresh() if fresh or not self._target else self._target

    def version_for(self, image_model: str) -> str | None:
        """The newest version whose vectors come from this image model, or None."""
        found = None
        for name in self.store.collections():
            n = version_number(self.alias, name)
            prov = self.provenance(name) if n is not None else None
            if (prov is not None and prov.image_model == image_model
                    and (found is None or n > found[0])):
                found = (n, name)
        return found[1] if found else None

    def searcher(self, collection: str):
        """The Searcher over one physical collection (opened and started once)."""
        with self._lock:
            if collection not in self._searchers:
                self._searchers[collection] = self.factory(self.store.for_collection(collection))
            return self._searchers[collection]

    def for_query(self, image_model: str = ""):
        """The Searcher for a query embedded by `image_model` ('' for a text query or stored
        vectors: the alias target). A query vector from a model no version was made by is a
        BackendUnavailable (retry: an encoder rollout is under way), never a mixed answer."""
        target = self.target()
        prov = self.provenance(target)
        if not image_model or prov is None or prov.image_model == image_model:
            return self.searcher(target)
        other = self.version_for(image_model)
        if other is None:
            raise BackendUnavailable(f"no index version made by image model {image_model!r}; "
                                     "the model is being switched, retry")
        return self.searcher(other)

    def for_write(self, image_model: str = ""):
        """The Searcher of the alias target for a write whose photo vector comes from
        `image_model`; BackendUnavailable (retry) when it comes from another model (an encoder
        rollout is under way), so the write is neither lost nor stored with foreign vectors."""
        target = self.target(fresh=True)
        prov = self.provenance(target)
        if image_model and prov is not None and prov.image_model != image_model:
            raise BackendUnavailable(f"the image model is being switched to {prov.image_model!r}"
                                     f"; this write was embedded by {image_model!r}, retry")
        return self.searcher(target)

    def describe(self) -> dict[str, Any]:
        """The alias target and the versions opened by this process (for /healthz)."""
        target = self.target()
        prov = self.provenance(target)
        return {"collection": target, "image_model": prov.image_model if prov else None,
                "versions_open": sorted(self._searchers)}


def provenance_json(provenance: Provenance | None) -> dict[str, Any] | None:
    """For printing: the provenance as a plain dict."""
    return json.loads(provenance.model_dump_json()) if provenance else None


def ensure_live(store, image: ImageModelSettings, text: TextModelSettings, image_id: str,
                image_dim: int, text_id: str, text_dim: int) -> str:
    """For writers outside the service (`batch_index create|index`): the physical collection
    behind `store`'s alias (created as `<alias>__v1` with provenance on a fresh store),
    IncompatibleStore when its vectors come from other models than these."""
    encoders = EncoderIdentity(image_model=image_id, image_dim=image_dim, text_model=text_id,
                               text_dim=text_dim)
    router = VersionRouter(store, lambda version: version)
    target = router.start(encoders, image, text)
    problem = mismatch(router.provenance(target), encoders)
    if problem:  # start() accepts another version for queries; a writer must match the live one
        raise IncompatibleStore(f"collection {store.collection!r} ({target}): {problem}; "
                                f"{REBUILD_HINT}", code="model_mismatch")
    store.for_collection(target).ensure_collection(image_dim, text_dim)
    return target


class VersionAdmin:
    """The version operations of `batch_index rebuild|swap|rollback|gc|stats`, over the alias
    store: plain data in and out, so the CLI runs them in-process or through the service."""

    OPERATIONS = frozenset({"live", "versions", "create_next", "provenance", "products",
                            "fingerprints", "write", "delete", "flush", "check", "point", "drop"})

    def __init__(self, store) -> None:
        self.store = store
        self.alias = store.collection

    def live(self) -> str:
        """The physical collection the alias points at ('' when none)."""
        target = self.store.alias_target()
        if target is None:
            return self.alias if self.store.exists() else ""
        return target

    def versions(self) -> list[dict[str, Any]]:
        """Every version (oldest first) with its row count, provenance and whether it is live."""
        live = self.live()
        found = []
        for name in self.store.collections():
            n = version_number(self.alias, name)
            if n is None and name != self.alias:
                continue
            raw = self.store.provenance(name)
            found.append({"collection": name, "version": n or 0, "live": name == live,
                          "rows": self.store.for_collection(name).count(),
                          "provenance": json.loads(raw) if raw else None})
        return sorted(found, key=lambda v: v["version"])

    def create_next(self, provenance: dict[str, Any], image_dim: int, text_dim: int) -> str:
        """Create the next version's empty collection with this provenance; returns its name."""
        n = max([v["version"] for v in self.versions()] + [0]) + 1
        name = version_name(self.alias, n)
        record = Provenance.model_validate({**provenance, "version": n})
        self.store.create_version(name, image_dim, text_dim, record.model_dump_json())
        return name

    def provenance(self, collection: str) -> dict[str, Any] | None:
        """One collection's provenance as a dict (None when it has none)."""
        raw = self.store.provenance(collection)
        return json.loads(raw) if raw else None

    def products(self, collection: str) -> list:
        """Every product of a collection."""
        return self.store.for_collection(collection).all_products()

    def fingerprints(self, collection: str) -> dict[str, str]:
        """Content fingerprint per id of a collection."""
        return self.store.for_collection(collection).fingerprints()

    def write(self, collection: str, products, image_vectors, text_vectors,
              colour_vectors) -> int:
        """Upsert products (already stamped, photos already stored) into a version."""
        return self.store.for_collection(collection).upsert(products, image_vectors,
                                                            text_vectors, colour_vectors)

    def delete(self, collection: str, ids: list[str]) -> int:
        """Delete ids from a version."""
        return self.store.for_collection(collection).delete(ids) if ids else 0

    def flush(self, collection: str) -> None:
        """Seal a version's written rows."""
        self.store.for_collection(collection).flush()

    def check(self, new: str, live: str, sample: int = 20, k: int = 10,
              min_recall: float = 0.9, live_rows: int | None = None) -> dict[str, Any]:
        """Before a swap: the same row count as the live version, each sampled product finds
        itself in the top k by its own photo vector, and ANN recall@k against exact search on
        the sample is at least min_recall (`live_rows`: the live count to match, as read by the
        last catch-up; default: now). Returns the figures and `ok`."""
        import numpy as np

        target = self.store.for_collection(new)
        rows = target.count()
        if live_rows is None:
            live_rows = self.store.for_collection(live).count()
        ids, matrix = target.vectors("image")
        rng = np.random.default_rng(0)
        picks = rng.choice(len(ids), size=min(sample, len(ids)), replace=False) if ids else []
        found_self, recall = 0, []
        for i in picks:
            hits = [h.product.id for h in target.search(matrix[i], "image", k)]
            found_self += ids[i] in hits
            exact = np.argsort(-(matrix @ matrix[i]))[:k]
            recall.append(len({ids[j] for j in exact} & set(hits)) / max(1, min(k, len(ids))))
        report = {"collection": new, "live": live, "rows": rows, "live_rows": live_rows,
                  "sampled": len(picks), "found_self": int(found_self),
                  f"recall@{k}": float(np.mean(recall)) if recall else 1.0}
        report["ok"] = (rows == live_rows and found_self == len(picks)
                        and report[f"recall@{k}"] >= min_recall)
        return report

    def point(self, collection: str) -> None:
        """Move the alias to a version (atomic for readers)."""
        if version_number(self.alias, collection) is None:
            raise IncompatibleStore(f"{collection!r} is not a version of {self.alias!r}")
        self.store.point_alias(collection)

    def drop(self, collection: str) -> None:
        """Drop a version that the alias does not point at."""
        if collection == self.live():
            raise IncompatibleStore(f"{collection!r} is live; swap or roll back first")
        self.store.drop_collection(collection)

    def drop_all(self) -> None:
        """Drop the alias and every version (`batch_index drop`), or a pre-version collection."""
        names = [v["collection"] for v in self.versions()]
        if self.store.alias_target() is not None:
            self.store.drop_alias()
        for name in names:
            self.store.drop_collection(name)
