"""The one write path: store each product's photo, stamp its hashes, upsert it with its vectors.

Used by the ProductSearch deployment (online upserts, and the batch job when the service owns a
Milvus Lite store) and by the batch job writing directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deployments.core.heads import Heads
from deployments.core.learned import annotations
from deployments.core.media import MediaStore
from deployments.core.products import Product, image_hash
from deployments.core.store import ProductStore


def stamp(product: Product, image: bytes) -> Product:
    """The product with its photo hash (SHA-256 of `image`) and content fingerprint filled in."""
    return stamp_hash(product, image_hash(image))


def stamp_hash(product: Product, photo_hash: str) -> Product:
    """`stamp` for a photo whose `image_hash` is already known (64 hex chars): the bulk job
    hashes each photo once, before deciding whether the row changed."""
    stamped = product.model_copy(update={"image_hash": photo_hash})
    return stamped.model_copy(update={"fingerprint": stamped.content_fingerprint()})


def write_products(
    store: ProductStore, media: MediaStore, products: Sequence[Product],
    images: Sequence[bytes], image_vectors: np.ndarray, text_vectors: np.ndarray,
    colour_vectors: np.ndarray | None = None, stamped: bool = False,
    heads: Heads | None = None,
) -> list[Product]:
    """Store photos and upsert products (by id) with their vectors: image (n, image_dim) and
    text (n, text_dim) float32, L2-normalised; colour (n, COLOUR_DIMS) float32 or None. Row i
    of each belongs to products[i] and images[i]. `stamped`: the products already carry
    `stamp(product, image)` of these very images (the batch job stamps where it reads the
    photo), so they are not hashed again. `heads` (fitted, in use): each product also gets its
    projected photo vector and predicted attributes (learned.annotations). Returns the
    products as stored. ValueError when the lengths differ; BackendUnavailable when Milvus
    fails."""
    stored = []
    for product, image in zip(products, images, strict=True):
        if not stamped:
            product = stamp(product, image)
        ref = media.put(image, product.image_hash)
        stored.append(product.model_copy(update={"image_ref": ref, "predicted": {}}))
    if heads is None:
        store.upsert(stored, image_vectors, text_vectors, colour_vectors)
        return stored
    projected, predictions = annotations(heads, image_vectors, colour_vectors)
    stored = [p.model_copy(update={"predicted": predicted})
              for p, predicted in zip(stored, predictions, strict=True)]
    store.upsert(stored, image_vectors, text_vectors, colour_vectors, projected, heads.version)
    return stored
