"""ProductSearch deployment: owns the Milvus store and the photo store.

With Milvus Lite this is the single process that opens the data dir (one replica, writes
serialised); with a Milvus server it can scale out like the encoders.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.encoders import ImageFeatures
from deployments.errors import NotFound
from deployments.filters import Filters
from deployments.ingest import write_products
from deployments.media import MediaStore
from deployments.products import Product
from deployments.ranking import AttributeVocabulary, Candidate, Weights, query_signals, rerank
from deployments.store import Hit, ProductStore, VectorField, filter_expression, literal
from serve_app.settings import MilvusSettings, RankingSettings

log = logging.getLogger("ray.serve")
T = TypeVar("T")
ATTRIBUTES_TTL_S = 30.0
FLUSH_EVERY_ROWS = 1000  # unflushed rows are searched by brute force in Milvus Lite


@serve.deployment
class ProductSearch:
    """Vector search, product CRUD and photo storage over one catalogue."""

    async def __init__(
        self, milvus: MilvusSettings, media_dir: str,
        image_encoder: DeploymentHandle, text_encoder: DeploymentHandle,
        ranking: RankingSettings | None = None,
    ) -> None:
        self.ranking = ranking or RankingSettings()
        self.weights = Weights(colour=self.ranking.colour_weight,
                               article_type=self.ranking.article_type_weight,
                               colour_label=self.ranking.colour_label_weight)
        image_dim, text_dim = await asyncio.gather(
            image_encoder.dim.remote(), text_encoder.dim.remote()
        )
        self.store = ProductStore(milvus)
        self.store.ensure_collection(image_dim, text_dim)
        self.store.flush()  # rows left unflushed by an earlier run would be brute-forced
        self.media = MediaStore(media_dir)
        self.dims = {"image": image_dim, "text": text_dim}
        self._attributes: tuple[float, dict[str, dict[str, int]]] | None = None
        self._unflushed = 0
        self._vocab: AttributeVocabulary | None = None

    async def _call(self, op: str, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call off the event loop, timing it."""
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

    async def search(
        self, field: VectorField, vector: np.ndarray, k: int, filters: Filters | None = None,
        exclude_ids: tuple[str, ...] = (), extra_filter: str = "",
    ) -> list[Hit]:
        """Top-k products by raw similarity of the `field` vector, best first, within filters."""
        expr = await self._expression(filters, extra_filter)
        return await self._call("search", self.store.search, vector, field, k, expr, exclude_ids)

    async def search_image(
        self, features: ImageFeatures, k: int, filters: Filters | None = None,
        exclude_ids: tuple[str, ...] = (), extra_filter: str = "", explain: bool = False,
    ) -> list[Hit]:
        """Products that look like a photo: the nearest `candidates` by image vector, re-ranked
        by colour similarity and the article type and colour inferred from them."""
        if not self.ranking.enabled:
            return await self.search("image", features.vector, k, filters, exclude_ids,
                                     extra_filter)
        expr = await self._expression(filters, extra_filter)
        pool = await self._call("search", self.store.search, features.vector, "image",
                                max(k, self.ranking.candidates), expr, exclude_ids, True)
        return rerank_hits(pool, features.colour, k, self.weights, explain)

    async def search_text(
        self, vector: np.ndarray, text: str, k: int, filters: Filters | None = None,
        explain: bool = False,
    ) -> list[Hit]:
        """Products that match a description. Attribute words of the catalogue's own vocabulary
        ("black", "casual shoes", "men") become filters, unless the shopper set that field; if
        they leave fewer than k products, the rest come from the unfiltered search."""
        filters = filters or Filters()
        parsed = (await self._vocabulary()).parse(text) if self.ranking.text_attributes else None
        extra = {f: v for f, v in (parsed.filters if parsed else {}).items()
                 if not getattr(filters, f)}
        if not extra:
            return await self.search("text", vector, k, filters)
        narrowed = filters.model_copy(update=extra)
        hits = await self.search("text", vector, k, narrowed)
        if len(hits) < k:
            seen = tuple(h.product.id for h in hits)
            hits += await self.search("text", vector, k - len(hits), filters, seen)
        if explain:
            for hit in hits:
                hit.signals = {"text": hit.score, "recognised": {
                    f: v for f, v in extra.items()
                    if getattr(hit.product, f) in v}}
        return hits

    async def hybrid(
        self, features: ImageFeatures, text_vector: np.ndarray, k: int,
        filters: Filters | None = None, ranker: str = "rrf", image_weight: float = 0.5,
    ) -> list[Hit]:
        """Top-k products by fused photo and text similarity (Milvus hybrid search)."""
        expr = await self._expression(filters)
        return await self._call("hybrid_search", self.store.hybrid_search, features.vector,
                                text_vector, k, expr, ranker, image_weight)

    async def similar(self, product_id: str, k: int, filters: Filters | None = None,
                      explain: bool = False) -> list[Hit]:
        """Products that look like a stored one (its stored vectors, no re-embedding), itself
        and copies of its photo left out."""
        product = await self.get(product_id)
        vectors = await self._call("get_vectors", self.store.get_vectors, product_id)
        if vectors is None:
            raise NotFound(f"no product with id {product_id!r}")
        duplicates = f"image_hash != {literal(product.image_hash)}" if product.image_hash else ""
        colour = vectors["colour"] if vectors["colour"].any() else None
        return await self.search_image(ImageFeatures(vectors["image"], colour), k, filters,
                                       (product_id,), duplicates, explain)

    async def attributes(self) -> dict[str, dict[str, int]]:
        """Each filterable field's values with counts (cached for a few seconds)."""
        now = time.monotonic()
        if self._attributes is None or now - self._attributes[0] > ATTRIBUTES_TTL_S:
            counts = await self._call("attributes", self.store.attribute_counts, 1000)
            self._attributes = (now, counts)
            self._vocab = None
        return self._attributes[1]

    async def _vocabulary(self) -> AttributeVocabulary:
        counts = await self.attributes()
        if self._vocab is None:
            self._vocab = AttributeVocabulary(counts)
        return self._vocab

    async def _expression(self, filters: Filters | None, extra: str = "") -> str:
        clauses = [extra] if extra else []
        if filters is not None and not filters.is_empty():
            vocabulary = {name: {str(v).lower(): v for v in values if isinstance(v, str)}
                          for name, values in (await self.attributes()).items()}
            clauses.append(filter_expression(filters, vocabulary))
        return " and ".join(f"({c})" for c in clauses)

    async def get(self, product_id: str) -> Product:
        """One product; NotFound if absent."""
        found = await self._call("get", self.store.get, [product_id])
        if not found:
            raise NotFound(f"no product with id {product_id!r}")
        return found[0]

    async def browse(self, limit: int, offset: int) -> tuple[list[Product], int]:
        """A page of products and the catalogue size."""
        page = await self._call("list", self.store.list, limit, offset)
        total = await self._call("count", self.store.count)
        return page, total

    async def count(self) -> int:
        """Number of products in the catalogue."""
        return await self._call("count", self.store.count)

    async def upsert(
        self, product: Product, image: bytes, features: ImageFeatures, text_vector: np.ndarray
    ) -> Product:
        """Store the photo and insert-or-replace the product with its vectors."""
        stored = await self.upsert_many([product], [image], features.vector[None, :],
                                        text_vector[None, :], features.colour[None, :])
        return stored[0]

    async def upsert_many(
        self, products: list[Product], images: list[bytes], image_vectors: np.ndarray,
        text_vectors: np.ndarray, colour_vectors: np.ndarray | None = None,
    ) -> list[Product]:
        """Insert-or-replace products with their photos and vectors (also the bulk path)."""
        self._attributes = None  # new values may have appeared
        stored = await self._call("upsert", write_products, self.store, self.media, products,
                                  images, image_vectors, text_vectors, colour_vectors)
        self._unflushed += len(stored)
        if self._unflushed >= FLUSH_EVERY_ROWS:
            await self.flush()
        return stored

    async def flush(self) -> None:
        """Seal written rows into indexed segments (bulk writers call this when done)."""
        self._unflushed = 0
        await self._call("flush", self.store.flush)

    async def fingerprints(self, ids: list[str] | None = None) -> dict[str, str]:
        """Stored content fingerprint per id (all when ids is None)."""
        return await self._call("fingerprints", self.store.fingerprints, ids)

    async def delete(self, product_id: str) -> None:
        """Delete one product; NotFound if absent."""
        if not await self._call("delete", self.store.delete, [product_id]):
            raise NotFound(f"no product with id {product_id!r}")

    async def image(self, product_id: str) -> tuple[bytes, str]:
        """The stored photo of a product and its content type."""
        product = await self.get(product_id)
        return await asyncio.to_thread(self.media.get, product.image_ref)

    async def health(self) -> dict[str, Any]:
        """Raises BackendUnavailable unless Milvus answers; otherwise a short status."""
        await self._call("ping", self.store.ping)
        return {"milvus": "ok", "collection": self.store.collection, "dims": self.dims}



def rerank_hits(pool: list[Hit], colour: np.ndarray | None, k: int, weights: Weights,
                explain: bool) -> list[Hit]:
    """Re-rank vector hits by the ranking signals; keep the visual cosine as `score`."""
    candidates = [Candidate(h.product.id, h.score, {"article_type": h.product.article_type,
                                                     "colour": h.product.colour}, h.colour, h)
                  for h in pool]
    query = query_signals(candidates, colour)
    ranked = rerank(candidates, query, weights)[:k]
    hits = []
    for candidate, signals in ranked:
        hit = Hit(candidate.item.product, candidate.item.score)
        if explain:
            hit.signals = {**signals, "inferred": {
                field: max(probs, key=probs.get) for field, probs in query.attributes.items()
                if probs}}
        hits.append(hit)
    return hits
