"""ProductSearch deployment: a thin Serve wrapper over one core `Searcher` (deployments.core).

It runs each blocking store call in a thread, times it as a metric, and refreshes the attribute
vocabulary in the background after writes. With Milvus Lite this is the single process that opens
the data dir (one replica, writes serialised); with a Milvus server it can scale out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.core.encoders import ImageFeatures
from deployments.core.errors import InvalidInput
from deployments.core.filters import Filters
from deployments.core.heads import current_version, heads_folder, load_heads, model_ids
from deployments.core.learned import annotate_store
from deployments.core.media import MediaStore
from deployments.core.memory import release_free_memory
from deployments.core.products import Product
from deployments.core.searcher import Searcher
from deployments.core.settings import HeadSettings, MilvusSettings, RankingSettings
from deployments.core.store import Hit, ProductStore, VectorField
from deployments.core.versions import EncoderIdentity, VersionAdmin, VersionRouter

log = logging.getLogger("ray.serve")
T = TypeVar("T")
VOCABULARY_REFRESH_S = 5.0  # how soon after writes /attributes counts are exact again
ALIAS_REFRESH_S = 0.5  # how soon reads follow a moved alias (writes re-read it every time)
# How long after a write the embedded store's freed memory is still given back: a bulk load's
# index builds run for minutes after its last flush (benchmarks/RESULTS.md, scale: 485 s).
RELEASE_WINDOW_S = 900.0


@serve.deployment
class ProductSearch:
    """Vector search, product CRUD and photo storage over one catalogue."""

    async def __init__(
        self, milvus: MilvusSettings, media_dir: str,
        image_encoder: DeploymentHandle, text_encoder: DeploymentHandle,
        ranking: RankingSettings | None = None, heads: HeadSettings | None = None,
    ) -> None:
        # The encoders say what they run, so a model change redeploys them, not this.
        # One call at a time: an encoder with a small queue (max_queued_requests) would shed a
        # burst of start-up calls.
        image_dim, text_dim, image_id, text_id, image_model, text_model = [
            await call.remote() for call in (
                image_encoder.dim, text_encoder.dim, image_encoder.model_id,
                text_encoder.model_id, image_encoder.model_settings, text_encoder.model_settings)]
        self.dims = {"image": image_dim, "text": text_dim}
        media = MediaStore(media_dir)

        def open_version(store: ProductStore) -> Searcher:
            searcher = Searcher(store, media, ranking)
            searcher.head_settings = heads or HeadSettings()
            searcher.start(image_dim, text_dim)
            return searcher

        # Queries go to the collection version made by the model that embedded them.
        self.router = VersionRouter(ProductStore(milvus), open_version)
        identity = EncoderIdentity(image_model=image_id, image_dim=image_dim,
                                   text_model=text_id, text_dim=text_dim)
        await asyncio.to_thread(self.router.start, identity, image_model, text_model)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_vocabulary())
        self._follower = asyncio.get_running_loop().create_task(self._follow_alias())
        # Fitted heads: the current artifact of this collection, re-read when a new fit appears
        # (`batch_index fit` writes it) or when `user_config` pins a version (reconfigure).
        self.head_settings = heads or HeadSettings()
        self.heads_dir = heads_folder(self.head_settings.dir, milvus.collection)
        # Heads are refused unless fitted on these models (deployments.core.heads).
        self.model_ids = model_ids(image_model, text_model)
        self.pinned_version: str | None = None
        self.heads_error: str | None = None
        with contextlib.suppress(Exception):  # a bad artifact: serve without it, say so
            await self.reload_heads()
        self._heads_poller = asyncio.get_running_loop().create_task(self._poll_heads())
        self._written_at = time.monotonic()  # opening the store loaded it: count as a write
        if milvus.is_lite and milvus.release_memory_s > 0:
            self._releaser = asyncio.get_running_loop().create_task(
                self._release_memory(milvus.release_memory_s))

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve `user_config`: `{"heads_version": "<version>"}` pins an artifact (null: the
        current one). Applied in place, without a replica restart."""
        self.pinned_version = (config or {}).get("heads_version")
        if hasattr(self, "searcher"):
            await self.reload_heads()

    async def reload_heads(self) -> dict[str, Any] | None:
        """Load the pinned or current heads artifact if it is not the one in use; returns its
        summary (None: no artifact). IncompatibleHeads for one made for other models; the
        heads in use stay."""
        wanted = self.pinned_version or await asyncio.to_thread(current_version, self.heads_dir)
        heads = self.searcher.heads
        if wanted is None:  # nothing fitted (or the fit was removed): search as without heads
            self.searcher.heads = self.heads_error = None
            return None
        if heads is not None and heads.version == wanted:
            return heads.summary()
        try:
            loaded = await asyncio.to_thread(load_heads, self.heads_dir, *self.model_ids,
                                             self.dims["image"], self.dims["text"], wanted)
        except Exception as exc:
            self.heads_error = f"{getattr(exc, 'code', 'error')}: {exc}"[:300]
            log.warning("heads %s not loaded: %s", wanted, exc)
            raise
        self.heads_error = None
        self.searcher.heads = loaded  # one assignment: a search uses the old or the new heads
        # A new fit wrote its predictions, perhaps straight into the store (the fit job on a
        # Milvus server): recount the values /attributes lists.
        self.searcher.vocabulary.mark_stale()
        log.info("heads %s in use", wanted)
        return loaded.summary() if loaded is not None else None

    async def _poll_heads(self) -> None:
        """Pick up a new fit of this collection without a restart."""
        while True:
            await asyncio.sleep(self.head_settings.poll_s)
            with contextlib.suppress(Exception):  # logged in reload_heads; try again next round
                await self.reload_heads()

    async def _follow_alias(self) -> None:
        """Notice soon when `batch_index swap` / `rollback` moves the alias."""
        while True:
            await asyncio.sleep(ALIAS_REFRESH_S)
            with contextlib.suppress(Exception):  # Milvus down: try again next round
                await asyncio.to_thread(self.router.refresh)

    async def _release_memory(self, every_s: float) -> None:
        """Embedded store: give the allocators' freed memory back to the OS every `every_s`
        seconds while writes are recent (RELEASE_WINDOW_S: the index builds they start run
        for minutes after a bulk load); a quiet store is left alone."""
        while True:
            await asyncio.sleep(every_s)
            if time.monotonic() - self._written_at > RELEASE_WINDOW_S:
                continue
            try:
                ms = await asyncio.to_thread(release_free_memory)
            except Exception as exc:  # never end the loop: the next round tries again
                log.warning("embedded store: giving freed memory back failed: %r", exc)
            else:
                log.info("embedded store: freed memory given back to the OS (%.0f ms)", ms)

    @property
    def searcher(self) -> Searcher:
        """The Searcher of the version the alias points at."""
        return self.router.for_query()

    async def _call(self, op: str, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking core call off the event loop, timing it."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.to_thread(func, *args)
        except Exception:
            outcome = "error"
            raise
        finally:
            ms = (time.perf_counter() - start) * 1000
            metrics.milvus_latency_ms().observe(ms, tags={"op": op, "outcome": outcome})

    async def _refresh_vocabulary(self) -> None:
        """Recount attribute values off the request path once writes have settled."""
        while True:
            await asyncio.sleep(VOCABULARY_REFRESH_S)
            for searcher in list(self.router._searchers.values()):
                if searcher.vocabulary.stale:
                    with contextlib.suppress(Exception):  # Milvus down: try again next round
                        await self._call("attributes", searcher.vocabulary.refresh)

    # -- searches (vectors come from the encoder deployments) ------------------------------
    async def nearest(self, field: VectorField, vector: np.ndarray, k: int,
                      filters: Filters | None = None) -> list[Hit]:
        """Top-k products by raw similarity of one vector field."""
        return await self._call("search", self.searcher.nearest, field, vector, k, filters)

    async def by_image(self, features: ImageFeatures, k: int, filters: Filters | None = None,
                       explain: bool = False) -> list[Hit]:
        """Products that look like a photo, re-ranked (Searcher.by_image)."""
        def search() -> list[Hit]:  # one thread hop: the version lookup can block too
            return self.router.for_query(features.model).by_image(features, k, filters, (), "",
                                                                   explain)
        return await self._call("search", search)

    async def by_text(self, vector: np.ndarray, text: str, k: int,
                      filters: Filters | None = None, explain: bool = False) -> list[Hit]:
        """Products that match a description (Searcher.by_text)."""
        return await self._call("search", self.searcher.by_text, vector, text, k, filters,
                                explain)

    async def hybrid(self, features: ImageFeatures, text_vector: np.ndarray, k: int,
                     filters: Filters | None = None, ranker: str = "rrf",
                     image_weight: float = 0.5, explain: bool = False) -> list[Hit]:
        """Photo and description fused (Searcher.hybrid)."""
        def search() -> list[Hit]:
            return self.router.for_query(features.model).hybrid(
                features, text_vector, k, filters, ranker, image_weight, explain)
        return await self._call("hybrid_search", search)

    async def similar(self, product_id: str, k: int, filters: Filters | None = None,
                      explain: bool = False) -> list[Hit]:
        """Products that look like a stored one (Searcher.similar)."""
        return await self._call("search", self.searcher.similar, product_id, k, filters,
                                explain)

    # -- catalogue ----------------------------------------------------------------------------
    async def attributes(self) -> dict[str, dict[str, int]]:
        """Each filter's values with counts, keyed by filter name (Searcher.attributes)."""
        return self.searcher.attributes()

    async def get(self, product_id: str) -> Product:
        """One product; NotFound if absent."""
        return await self._call("get", self.searcher.get, product_id)

    async def browse(self, limit: int, offset: int) -> tuple[list[Product], int]:
        """A page of products and the catalogue size."""
        return await self._call("list", self.searcher.browse, limit, offset)

    async def count(self) -> int:
        """Number of products in the catalogue."""
        return await self._call("count", self.searcher.store.count)

    async def upsert(self, product: Product, image: bytes, features: ImageFeatures,
                     text_vector: np.ndarray) -> Product:
        """Store the photo and insert-or-replace one product with its vectors."""
        stored = await self.upsert_many([product], [image], features.vector[None, :],
                                        text_vector[None, :], features.colour[None, :],
                                        features.model)
        return stored[0]

    async def upsert_many(self, products: list[Product], images: list[bytes],
                          image_vectors: np.ndarray, text_vectors: np.ndarray,
                          colour_vectors: np.ndarray | None = None,
                          image_model: str = "") -> list[Product]:
        """Insert-or-replace products with their photos and vectors (also the bulk path) in
        the version the alias points at (`image_model`: what made the photo vectors; another
        model's are refused with BackendUnavailable, retry)."""
        searcher = await asyncio.to_thread(self.router.for_write, image_model)
        self._written_at = time.monotonic()
        return await self._call("upsert", searcher.upsert, products, images,
                                image_vectors, text_vectors, colour_vectors)

    async def flush(self) -> None:
        """Seal written rows into indexed segments (bulk writers call this when done)."""
        self._written_at = time.monotonic()
        await self._call("flush", self.searcher.flush)

    async def fingerprints(self, ids: list[str] | None = None) -> dict[str, str]:
        """Stored content fingerprint per id (all when ids is None)."""
        return await self._call("fingerprints", self.searcher.store.fingerprints, ids)

    async def delete(self, product_id: str) -> None:
        """Delete one product; NotFound if absent."""
        searcher = await asyncio.to_thread(self.router.for_write)
        self._written_at = time.monotonic()
        await self._call("delete", searcher.delete, product_id)

    async def image(self, product_id: str) -> tuple[bytes, str]:
        """The stored photo of a product and its content type."""
        return await self._call("get", self.searcher.image, product_id)

    async def version_admin(self, method: str, *args: Any) -> Any:
        """A VersionAdmin operation for `batch_index rebuild|swap|...` (this process owns a
        Milvus Lite store, so the job cannot open it); a moved alias is followed at once."""
        if method not in VersionAdmin.OPERATIONS:
            raise InvalidInput(f"unknown version operation {method!r}")
        admin = VersionAdmin(self.router.store)
        result = await self._call("versions", getattr(admin, method), *args)
        if method == "point":
            await asyncio.to_thread(self.router.refresh)
        return result

    async def health(self) -> dict[str, Any]:
        """Raises BackendUnavailable unless Milvus answers; otherwise a short status."""
        await self._call("ping", self.searcher.store.ping)
        heads = self.searcher.heads
        status = {"version": heads.version, "fitted_at": heads.fitted_at} if heads else None
        if self.heads_error:
            status = {**(status or {}), "error": self.heads_error}
        return {"milvus": "ok", "collection": self.router.alias, "dims": self.dims,
                "version": self.router.describe(), "heads": status}

    async def annotate(self) -> int:
        """Write the heads in use into every stored product (projected photo, predicted
        attributes: learned.annotate_store); returns rows written, 0 without heads. The fit
        calls it through the service when the service owns a Milvus Lite store."""
        searcher = self.searcher
        if searcher.heads is None:
            return 0
        written = await self._call("annotate", annotate_store, searcher.store, searcher.heads)
        searcher.vocabulary.mark_stale()  # new predictions: /attributes recounts them
        return written

    async def vectors_and_labels(self) -> dict[str, Any]:
        """Every product's stored vectors and labels (the fit reads them through the service
        when it owns a Milvus Lite store)."""
        return await self._call("query", self.searcher.store.vectors_and_labels)
