"""The fit step of the bulk job: heads learned from the stored catalogue (deployments.core.heads).

    python -m batch_index fit                      # also at the end of `index` unless --no-fit
    ray job submit --working-dir . -- python -m batch_index fit

Reads every product's stored vectors and labels (from Milvus, or through the running service when
it owns a Milvus Lite store), fits the heads in one Ray task that reserves `heads.fit_cpus`, and
writes the artifact to `<heads.dir>/<collection>/`; the search deployment picks it up within
`heads.poll_s` seconds, without a restart. Then every stored product gets the new heads' projected
photo vector and predicted attributes (a backfill through the store, or through the service).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from deployments.core.heads import Heads, heads_folder, model_ids
from deployments.core.heads_fit import FitOptions, fit_heads
from deployments.core.learned import annotate_store
from deployments.core.settings import AppSettings, HeadSettings

log = logging.getLogger(__name__)


def fit_options(heads: HeadSettings) -> FitOptions:
    """The fit's hyper-parameters from the config's `heads:` block."""
    return FitOptions(fields=tuple(heads.fields), min_field_products=heads.min_field_products,
                      min_class_products=heads.min_class_products,
                      validation_share=heads.validation_share, align_epochs=heads.align_epochs,
                      refit=heads.refit, threads=heads.threads)


def has_text(data: dict[str, Any]) -> np.ndarray:
    """Products whose title says something: not empty and not merely their id or file name."""
    return np.array([bool(t.strip()) and t.strip() != i and not t.lower().endswith(
        (".jpg", ".jpeg", ".png", ".webp")) for t, i in zip(data["titles"], data["ids"],
                                                             strict=True)])


def fit_data(data: dict[str, Any], settings: AppSettings) -> Heads:
    """Fit heads on stored vectors and labels (a `ProductStore.vectors_and_labels` dict); the
    configured text encoder embeds the label sentences the alignment also learns from, and the
    validation split keeps products sharing a photo together (`photo_groups`)."""
    from deployments.core.encoders import TextEncoder

    if not len(data["ids"]):
        raise SystemExit("the collection is empty: index a catalogue first")
    labels = {name: data["labels"][name] for name in settings.heads.fields
              if name in data["labels"]}
    encoder = TextEncoder(settings.text_model, num_threads=settings.heads.threads)
    return fit_heads(data["image"], data["text"], data["colour"], labels, has_text(data),
                     *model_ids(settings.image_model, settings.text_model),
                     fit_options(settings.heads), encoder.embed, photo_groups(data))


def photo_groups(data: dict[str, Any]) -> list[str]:
    """Per product, the key its fit's validation split is drawn by: its photo's content hash,
    so products sharing a photo are held out together (its id when no hash is stored)."""
    hashes = data.get("image_hashes")
    if hashes is None:  # a service of an earlier version does not send them
        hashes = [""] * len(data["ids"])
    return [h or f"id:{i}" for h, i in zip(hashes, data["ids"], strict=True)]


def run_fit(settings: AppSettings, search_handle=None, store=None) -> Heads | None:
    """Read the catalogue, fit on Ray (one task reserving heads.fit_cpus), save the artifact
    beside the collection, then write the heads' projection and predictions into every stored
    product; returns the heads. Reads and writes through `store` (a ProductStore), or through
    `search_handle` (the running service's ProductSearch, which owns a Milvus Lite store and
    then loads the new fit at once). None, and nothing written, below heads.min_products."""
    if search_handle is not None:
        data = search_handle.vectors_and_labels.remote().result()
    else:
        data = store.vectors_and_labels()
    if len(data["ids"]) < settings.heads.min_products:
        log.info("heads not fitted: %d products < heads.min_products (%d)", len(data["ids"]),
                 settings.heads.min_products)
        return None
    task = ray.remote(num_cpus=settings.heads.fit_cpus)(fit_data)
    heads = ray.get(task.remote(data, settings))
    path = heads.save(heads_folder(settings.heads.dir, settings.milvus.collection))
    log.info("heads %s written to %s", heads.version, path)
    if search_handle is not None:
        search_handle.reload_heads.remote().result()
        written = search_handle.annotate.remote().result()
    else:
        written = annotate_store(store, heads)
    log.info("heads %s written into %d stored products", heads.version, written)
    return heads
