"""What the benchmarks share: dataset paths, embedding catalogue rows with the project's
encoders, and one closed-loop HTTP load generator. Health polling is tests.support.wait_healthy.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-dev"
OUT = Path(__file__).resolve().parent / "out"


# -- catalogues and their vectors -------------------------------------------------------------
def read_catalogue(csv_path: Path) -> tuple[list, list[str]]:
    """Products (deployments.core.products.Product) and photo paths of a catalogue CSV, read
    with the project's reader (rejected rows left out)."""
    from deployments.core.catalog import read_csv_catalog
    from deployments.core.products import Product

    rows, _ = read_csv_catalog(csv_path)
    return [Product.model_validate_json(r.product_json) for r in rows], [r.image_path for r in rows]


def demo_photos(folder: Path, n: int = 48) -> tuple[list[bytes], list[str]]:
    """Photos of a generated demo catalogue to query with, and the ids of their products."""
    from deployments.core.demo import generate_demo_catalog

    csv_path = generate_demo_catalog(folder, n)
    files = sorted((csv_path.parent / "images").glob("*.jpg"))
    return [p.read_bytes() for p in files], [p.stem for p in files]


@dataclass
class Embeddings:
    """Vectors of n products, row i for product i: image (n, image_dim) and text (n, text_dim)
    float32 L2-normalised (None when only colours were asked for), colour (n, COLOUR_DIMS)
    float32 unit-length descriptors."""

    image: np.ndarray | None
    text: np.ndarray | None
    colour: np.ndarray


class CatalogueEmbedder:
    """The project's encoders (deployments.core.encoders, configured by configs/config.yaml) as
    the service and the batch job use them: photo -> model pixels -> image vector and colour
    descriptor, product -> embedding text -> text vector. With `vectors=False` no model is
    loaded and only colour descriptors are computed."""

    def __init__(self, settings=None, threads: int = 2, vectors: bool = True) -> None:
        from deployments.core.encoders import ImageEncoder, ImagePreprocessor, TextEncoder
        from deployments.core.settings import load_settings

        settings = settings or load_settings()
        self.image_encoder = self.text_encoder = None
        if vectors:
            self.image_encoder = ImageEncoder(settings.image_model, num_threads=threads)
            self.text_encoder = TextEncoder(settings.text_model, num_threads=threads)
            self.preprocessor = self.image_encoder.preprocessor
        else:
            self.preprocessor = ImagePreprocessor.for_settings(settings.image_model)

    @property
    def dims(self) -> tuple[int, int]:
        """(image_dim, text_dim) of the loaded encoders."""
        return self.image_encoder.dim, self.text_encoder.dim

    def embed(self, products: Sequence, photos: Sequence[bytes]) -> Embeddings:
        """One batch: products and their photo bytes (same order). InvalidInput for a photo
        that cannot be decoded."""
        from deployments.core.colour import colour_descriptor
        from deployments.core.encoders import decode_image

        pixels = np.stack([self.preprocessor.model_pixels(decode_image(p)) for p in photos])
        colour = np.stack([colour_descriptor(px) for px in pixels]).astype(np.float32)
        if self.image_encoder is None:
            return Embeddings(None, None, colour)
        image = self.image_encoder.embed_pixels(pixels)
        text = self.text_encoder.embed([p.embedding_text() for p in products])
        return Embeddings(image, text, colour)

    def embed_files(self, products: Sequence, paths: Sequence[str | Path],
                    batch: int = 32) -> Embeddings:
        """Every product with its photo file, in batches of `batch`."""
        parts = [self.embed(products[i: i + batch],
                            [Path(p).read_bytes() for p in paths[i: i + batch]])
                 for i in range(0, len(paths), batch)]
        colour = np.concatenate([p.colour for p in parts])
        if self.image_encoder is None:
            return Embeddings(None, None, colour)
        return Embeddings(np.concatenate([p.image for p in parts]),
                          np.concatenate([p.text for p in parts]), colour)


# -- load generation --------------------------------------------------------------------------
@dataclass
class Record:
    """Every request's outcome, for the report."""

    events: list[tuple[float, str, int, float]] = field(default_factory=list)  # t, kind, status, s
    acknowledged: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def latencies_ms(self, ok: tuple[int, ...] = (200, 201)) -> list[float]:
        """Latencies of the successful requests, in milliseconds."""
        return [e[3] * 1000 for e in self.events if e[2] in ok]


@dataclass
class Request:
    """One request of a workload: `kind` names it in the record; `acknowledges` is an id that
    counts as durably written when the answer is 201."""

    kind: str
    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)  # httpx request keyword arguments
    acknowledges: str | None = None


# Next request of user `uid`, its `n`-th (from 1), drawn with the user's own seeded rng.
Workload = Callable[[int, int, random.Random], Request]


async def closed_loop(url: str, users: int, seconds: float, workload: Workload, record: Record,
                      requests_per_user: int | None = None, timeout: float = 30,
                      headers: dict[str, str] | None = None) -> float:
    """`users` closed-loop users (each sends its next request when the last is answered) for
    `seconds` or `requests_per_user` requests each; every outcome goes into `record` (status
    0 for a connection error, -1 for a timeout). Returns the wall time in seconds."""
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=users + 4)

    async def user(uid: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(uid)
        n = 0
        while time.monotonic() < stop and (requests_per_user is None or n < requests_per_user):
            n += 1
            request = workload(uid, n, rng)
            start = time.monotonic()
            try:
                response = await client.request(request.method, request.path, **request.options)
                status = response.status_code
            except httpx.HTTPError as exc:
                status = -1 if isinstance(exc, httpx.TimeoutException) else 0
            record.events.append((start, request.kind, status, time.monotonic() - start))
            if request.acknowledges and status == 201:
                record.acknowledged.append(request.acknowledges)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits,
                                 headers=headers) as client:
        began = time.monotonic()
        await asyncio.gather(*(user(u, client) for u in range(users)))
        return time.monotonic() - began


QUERIES = ["red dress", "black sports shoes", "blue t-shirt for men", "leather handbag",
           "white mug", "grey trousers", "yellow cap", "brown watch"]


def mixed_workload(photos: list[bytes], ids: list[str], write_every: int = 20,
                   write_headers: dict[str, str] | None = None) -> Workload:
    """Shoppers: photo, text and similar-product searches (2:1:1), and every `write_every`-th
    request a product upsert (sent with `write_headers`, e.g. an API key)."""

    def next_request(uid: int, n: int, rng: random.Random) -> Request:
        if write_every and n % write_every == 0:
            product_id = f"stress-{uid}-{n}"
            product = {"id": product_id, "title": f"Stress product {uid} {n}"}
            return Request("write", "POST", "/products", {
                "files": {"image": ("p.jpg", rng.choice(photos))},
                "data": {"product": json.dumps(product)}, "headers": write_headers},
                acknowledges=product_id)
        kind = rng.choice(["photo", "photo", "text", "similar"])
        if kind == "photo":
            return Request(kind, "POST", "/search/image",
                           {"files": {"image": ("q.jpg", rng.choice(photos))}})
        if kind == "text":
            return Request(kind, "POST", "/search/text", {"json": {"query": rng.choice(QUERIES)}})
        return Request(kind, "GET", f"/products/{rng.choice(ids)}/similar")

    return next_request


async def run_load(url: str, photos: list[bytes], ids: list[str], users: int, seconds: float,
                   record: Record, write_every: int = 20,
                   write_headers: dict[str, str] | None = None) -> None:
    """The mixed shopper workload (`mixed_workload`) from `users` users for `seconds`."""
    await closed_loop(url, users, seconds,
                      mixed_workload(photos, ids, write_every, write_headers), record)
