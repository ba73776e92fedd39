"""The one write path: store each product's photo, stamp its hashes, upsert it with its vectors.

Used by the ProductSearch deployment (online upserts, and the batch job when the service owns a
Milvus Lite store) and by the batch job writing directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deployments.core.media import MediaStore
from deployments.core.products import Product, image_hash
from deployments.core.store import ProductStore


def stamp(product: Product, image: bytes) -> Product:
    """The product with its photo hash and content fingerprint filled in."""
    stamped = product.model_copy(update={"image_hash": image_hash(image)})
    return stamped.model_copy(update={"fingerprint": stamped.content_fingerprint()})


def write_products(
    store: ProductStore, media: MediaStore, products: Sequence[Product],
    images: Sequence[bytes], image_vectors: np.ndarray, text_vectors: np.ndarray,
    colour_vectors: np.ndarray | None = None,
) -> list[Product]:
    """Store photos and upsert products (by id) with their vectors; returns what was stored."""
    stored = []
    for product, image in zip(products, images, strict=True):
        stamped = stamp(product, image)
        ref = media.put(image, stamped.image_hash)
        stored.append(stamped.model_copy(update={"image_ref": ref}))
    store.upsert(stored, image_vectors, text_vectors, colour_vectors)
    return stored
