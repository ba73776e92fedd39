"""The Ray Data graph that embeds a catalogue, and the writers that store the result.

    rows -> driver   read + hash each photo, stamp the fingerprint, drop unchanged rows
                     (plan_rows: nothing decoded; an unchanged catalogue stops here)
         -> [tasks]  read photo, decode + resize (ImagePreprocessor), product text to embed
                     (GPU image actors only: on CPU the image actors decode themselves)
         -> [actors] image vectors (encoders.ImageEncoder, batched)
         -> [actors] text vectors  (encoders.TextEncoder, batched)
         -> driver   writes batches (products, the photo bytes read by the task, vectors):
                     directly to Milvus, or through the running service's ProductSearch
                     deployment when it owns a Milvus Lite store.

The encoders are the same classes the Serve deployments use, so online and offline vectors match.
They (and torch) are imported only inside the actors: a rerun that finds nothing changed never
imports them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from batch_index.decode import OK, REJECTED, load_images
from batch_index.service import init_ray
from deployments.core.catalog import CatalogRow, Reject
from deployments.core.colour import COLOUR_DIMS
from deployments.core.images import ImagePreprocessor
from deployments.core.media import MediaStore
from deployments.core.products import Product, image_hash
from deployments.core.settings import AppSettings
from deployments.core.store import ProductStore
from deployments.core.writes import stamp_hash, write_products

log = logging.getLogger(__name__)


@dataclass
class IndexOptions:
    """How the job spreads its work (CPU numbers are Ray reservations, not hard limits)."""

    batch_size: int = 32
    image_actors: int = 1
    text_actors: int = 1
    image_threads: int = 2
    # Decode tasks (GPU image actors only; on CPU the image actors decode): their CPU
    # reservation, and how many run at once. Without a cap Ray Data runs 2 / task_cpus of them
    # (20 on 2 cores), decoding far ahead of the encoder while it still loads its model.
    task_cpus: float = 0.1
    decode_tasks: int = 2
    image_actor_cpus: float = 0.25
    text_actor_cpus: float = 0.1
    num_gpus: float = 0
    force: bool = False
    write_batch: int = 256
    writers: int = 1
    # Ray to start or join when rows need embedding (None: RAY_ADDRESS, the job's, or local).
    ray_address: str | None = None
    # Whether a Ray this job starts itself runs its dashboard (service.init_ray).
    dashboard: bool = False


@dataclass
class Summary:
    """What a run did."""

    total: int = 0
    indexed: int = 0
    unchanged: int = 0
    rejected: int = 0
    wall_s: float = 0.0
    rejects: list[Reject] = field(default_factory=list)
    image_nodes: set[str] = field(default_factory=set)

    @property
    def images_per_s(self) -> float:
        """Indexed products per second of wall time."""
        return self.indexed / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        """One human line."""
        return (f"indexed {self.indexed}, unchanged {self.unchanged}, rejected {self.rejected} "
                f"of {self.total} rows in {self.wall_s:.1f} s ({self.images_per_s:.1f} images/s)")


# -- stage 0: the driver's plan -------------------------------------------------------------
@dataclass
class Plan:
    """The catalogue split in the driver before any Ray work: rows to embed (their product JSON
    stamped with photo hash and fingerprint), how many are unchanged, and unreadable photos."""

    todo: list[CatalogRow] = field(default_factory=list)
    unchanged: int = 0
    rejects: list[Reject] = field(default_factory=list)


def _photo_hash(path: str) -> tuple[str, str]:
    """(SHA-256 of the photo file, "") or ("", why it cannot be read)."""
    try:
        return image_hash(Path(path).read_bytes()), ""
    except FileNotFoundError:
        return "", f"image file not found: {path}"
    except OSError as exc:
        return "", f"unreadable image: {exc}"


def plan_rows(rows: list[CatalogRow], known: dict[str, str], force: bool,
              threads: int = 4) -> Plan:
    """Which rows need embedding: each photo is read and hashed (`threads` overlap the file
    reads), each product stamped as the writer stores it (`writes.stamp_hash`: photo SHA-256 +
    every product field) and compared with `known` (stored id -> fingerprint). Nothing is
    decoded or embedded here, so an unchanged catalogue never reaches Ray Data or a model.
    `force`: every readable row is to embed."""
    plan = Plan()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        hashes = pool.map(_photo_hash, [r.image_path for r in rows])
        for row, (digest, reason) in zip(rows, hashes, strict=True):
            if reason:
                plan.rejects.append(Reject(row.row, row.id, reason))
                continue
            product = stamp_hash(Product.model_validate_json(row.product_json), digest)
            if not force and known.get(row.id) == product.fingerprint:
                plan.unchanged += 1
            else:
                plan.todo.append(CatalogRow(row.row, row.id, product.model_dump_json(),
                                            row.image_path))
    return plan


# -- stages 2 and 3: actor pools -----------------------------------------------------------
class ImageEmbedder:
    """Actor: embeds the decoded photos of a batch with the shared image encoder. With
    `decode`, it first reads and decodes them itself (`load_images`): on CPU that saves moving
    every photo's pixels (150 KB each) through Ray's object store from a decode task and the
    decode workers' own start-up (benchmarks/RESULTS.md, "Bulk index"); a GPU actor leaves
    decoding to CPU tasks so the GPU does not wait on it."""

    def __init__(self, settings: AppSettings, threads: int, decode: bool = False) -> None:
        from deployments.core import encoders  # torch: only where a model runs

        self.encoder = encoders.ImageEncoder(settings.image_model, num_threads=threads)
        self.preprocessor = self.encoder.preprocessor if decode else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.preprocessor is not None:
            batch = load_images(batch, preprocessor=self.preprocessor)
        ok = batch["status"] == OK
        vectors = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        colours = np.zeros((len(ok), COLOUR_DIMS), dtype=np.float32)
        if ok.any():
            features = self.encoder.features_pixels(batch["pixels"][ok])
            vectors[ok] = np.stack([f.vector for f in features])
            colours[ok] = np.stack([f.colour for f in features])
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["image_vector"] = vectors
        out["colour_vector"] = colours
        out["node"] = np.full(len(ok), ray.get_runtime_context().get_node_id())
        return out


class TextEmbedder:
    """Actor: embeds the product texts of a batch with the shared text encoder."""

    def __init__(self, settings: AppSettings) -> None:
        from deployments.core import encoders

        self.encoder = encoders.TextEncoder(settings.text_model, num_threads=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == OK
        vectors = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.encoder.embed([str(t) for t in batch["text"][ok]])
        return {**batch, "text_vector": vectors}


def build_dataset(rows: list[CatalogRow], settings: AppSettings,
                  options: IndexOptions) -> ray.data.Dataset:
    """The lazy Ray Data graph over the rows to embed (stamped by `plan_rows`)."""
    items = [{"row": r.row, "id": r.id, "product_json": r.product_json,
              "image_path": r.image_path} for r in rows]
    # Ray Data's default scheduling strategy is SPREAD, so the actor pools and tasks spread
    # across the cluster's nodes.
    blocks = max(1, len(items) // options.batch_size)
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    decode_in_actor = options.num_gpus == 0
    if not decode_in_actor:
        dataset = dataset.map_batches(
            load_images, batch_size=options.batch_size, num_cpus=options.task_cpus,
            compute=ray.data.TaskPoolStrategy(size=min(options.decode_tasks, blocks)),
            fn_kwargs={"preprocessor": ImagePreprocessor.for_settings(settings.image_model)})
    return (
        dataset
        .map_batches(ImageEmbedder, batch_size=options.batch_size,
                     compute=ray.data.ActorPoolStrategy(size=options.image_actors),
                     fn_constructor_kwargs={"settings": settings,
                                            "threads": options.image_threads,
                                            "decode": decode_in_actor},
                     num_cpus=options.image_actor_cpus, num_gpus=options.num_gpus)
        .map_batches(TextEmbedder, batch_size=options.batch_size * 2,
                     compute=ray.data.ActorPoolStrategy(size=options.text_actors),
                     fn_constructor_kwargs={"settings": settings},
                     num_cpus=options.text_actor_cpus)
    )


# -- writers -------------------------------------------------------------------------------
class DirectWriter:
    """Write straight to Milvus (this process owns the store)."""

    def __init__(self, settings: AppSettings, store: ProductStore) -> None:
        self.store, self.media = store, MediaStore(settings.media_dir)

    def __call__(self, products, images, image_vectors, text_vectors, colour_vectors) -> None:
        write_products(self.store, self.media, products, images, image_vectors, text_vectors,
                       colour_vectors, stamped=True)

    def finish(self) -> None:
        """Seal what was written so searches use the index."""
        self.store.flush()


class ServiceWriter:
    """Write through the running service's ProductSearch deployment (it owns the store)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __call__(self, products, images, image_vectors, text_vectors, colour_vectors) -> None:
        self.handle.upsert_many.remote(products, images, image_vectors, text_vectors,
                                       colour_vectors).result()

    def finish(self) -> None:
        """Seal what was written so searches use the index."""
        self.handle.flush.remote().result()


def direct_writer(settings: AppSettings, store: ProductStore) -> DirectWriter:
    """Write straight to Milvus (this process owns the store)."""
    return DirectWriter(settings, store)


def service_writer(handle) -> ServiceWriter:
    """Write through the running service's ProductSearch deployment."""
    return ServiceWriter(handle)


def run_index(rows: list[CatalogRow], rejects: list[Reject], settings: AppSettings,
              known: dict[str, str], writer: DirectWriter | ServiceWriter,
              options: IndexOptions) -> Summary:
    """Embed and write every changed row (`known`: stored id -> fingerprint); count what
    happened. Unchanged rows are found by `plan_rows` in this process: when none changed, no
    dataset is built, no actor starts and no model loads."""
    start = time.perf_counter()
    plan = plan_rows(rows, known, options.force)
    summary = Summary(total=len(rows) + len(rejects), unchanged=plan.unchanged,
                      rejects=[*rejects, *plan.rejects])
    log.info("plan: %d rows to embed, %d unchanged, %d unreadable (%.1f s)", len(plan.todo),
             plan.unchanged, len(plan.rejects), time.perf_counter() - start)
    if plan.todo:
        init_ray(options.ray_address, options.dashboard)
        _embed_and_write(plan.todo, settings, writer, options, summary)
        if summary.indexed:
            writer.finish()
    summary.rejected = len(summary.rejects)
    summary.wall_s = time.perf_counter() - start
    _record_metrics(summary, options.ray_address)
    return summary


def _embed_and_write(rows: list[CatalogRow], settings: AppSettings,
                     writer: DirectWriter | ServiceWriter, options: IndexOptions,
                     summary: Summary) -> None:
    """Stream the rows through the Ray Data graph and hand each batch to the writer."""
    dataset = build_dataset(rows, settings, options)
    with ThreadPoolExecutor(max(1, options.writers)) as pool, \
            tqdm(total=len(rows), desc="index", unit="row") as bar:
        pending = []
        for batch in _batches(dataset, options.write_batch):
            _count(batch, summary)
            ok = batch["status"] == OK
            if ok.any():
                products = [Product.model_validate_json(j) for j in batch["product_json"][ok]]
                images = list(batch["photo"][ok])  # read by the task
                pending.append(pool.submit(
                    writer, products, images, batch["image_vector"][ok],
                    batch["text_vector"][ok], batch["colour_vector"][ok]))
                summary.indexed += int(ok.sum())
                while len(pending) > 2 * options.writers:  # bound what waits in memory
                    pending.pop(0).result()
            bar.update(len(ok))
        for future in pending:
            future.result()


def _batches(dataset: ray.data.Dataset, size: int) -> Iterator[dict[str, np.ndarray]]:
    yield from dataset.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2)


def _count(batch: dict[str, np.ndarray], summary: Summary) -> None:
    summary.image_nodes.update(str(n) for n in batch["node"])
    for i in np.flatnonzero(batch["status"] == REJECTED):
        summary.rejects.append(Reject(int(batch["row"][i]), str(batch["id"][i]),
                                      str(batch["reason"][i])))


def _record_metrics(summary: Summary, address: str | None) -> None:
    """Index job rows by outcome, through Ray's metrics API. A run that needed no Ray records
    them on the cluster it was pointed at (`address`); a local Ray would die with this process,
    so without one nothing is recorded."""
    from ray.util.metrics import Counter

    if not ray.is_initialized():
        if address in (None, "local"):
            return
        init_ray(address)

    counter = Counter("shopsearch_index_rows", description="Catalogue rows by index outcome.",
                      tag_keys=("outcome",))
    for outcome, n in (("indexed", summary.indexed), ("unchanged", summary.unchanged),
                       ("rejected", summary.rejected)):
        if n:
            counter.inc(n, tags={"outcome": outcome})


def write_rejects(path: str | Path, rejects: list[Reject]) -> None:
    """Rejects as JSONL, one `{"row", "id", "reason"}` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.as_json() + "\n" for r in sorted(rejects, key=lambda r: r.row)))


def summary_json(summary: Summary) -> str:
    """The summary as one JSON object (for scripts)."""
    return json.dumps({"total": summary.total, "indexed": summary.indexed,
                       "unchanged": summary.unchanged, "rejected": summary.rejected,
                       "wall_s": round(summary.wall_s, 2),
                       "images_per_s": round(summary.images_per_s, 2),
                       "image_actor_nodes": len(summary.image_nodes)})
