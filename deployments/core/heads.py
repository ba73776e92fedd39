"""Heads fitted on the shop's own catalogue, as the service applies them: numpy only, no torch,
no Ray, no Milvus (the fit, with torch, is deployments.core.heads_fit).

Two kinds of small model learn from the stored vectors and labels of a catalogue:

  alignment   one linear layer (image_dim -> text_dim) fitted with a symmetric contrastive
              (InfoNCE) loss on (photo, title) pairs, so a text vector can find photos by their
              pixels (`Heads.project`);
  attributes  per categorical field with enough labelled products, a multinomial logistic
              regression on the image vector + colour descriptor, its probabilities calibrated
              by one temperature fitted on a held-out validation split, blended (where the
              held-out split says it helps, e.g. colour) with a vote of the fitted products
              nearest by colour descriptor (`Heads.predict`).

The alignment learns from titles and, when the fit is given the text encoder, from sentences
built from the labels ("{colour} {article_type}", "{article_type}"): the words shoppers type.

`heads_fit.fit_heads` holds out a validation split of its own and records its figures in the
artifact. The artifact is an `.npz` (weights) and a `.json` (model ids, dims, fields, label
vocabularies, fit date, version, validation figures) in one folder per collection, with
`current.json` naming the version in use; `load_heads` refuses one made for other models or dims
(IncompatibleHeads).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deployments.core.encoders import l2_normalise
from deployments.core.errors import SearchError
from deployments.core.files import write_atomically

FORMAT = 1  # the artifact layout; a reader refuses any other
CURRENT = "current.json"


class IncompatibleHeads(SearchError):
    """A heads artifact made for other models, dims or format: refit with `batch_index fit`."""

    code = "incompatible_heads"


@dataclass
class AttributeHead:
    """Logistic regression of one field: standardised features -> logits / temperature."""

    labels: list[str]
    weight: np.ndarray  # (features, classes) float32
    bias: np.ndarray  # (classes,) float32
    temperature: float = 1.0
    # Share of the neighbour vote in the blend (0: the logistic head alone) and, per fitted
    # product of Heads.neighbours, its class index (-1: unlabelled, no vote).
    share: float = 0.0
    neighbour_labels: np.ndarray | None = None  # (m,) int32

    def probabilities(self, features: np.ndarray, votes: np.ndarray | None = None) -> np.ndarray:
        """(n, classes) calibrated probabilities for standardised (n, features) rows; `votes`
        ((n, m) neighbour weights, rows summing to 1, from `neighbour_weights`) blends in the
        neighbours' labels by `share`."""
        logits = (features @ self.weight + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        if self.share > 0 and votes is not None and self.neighbour_labels is not None:
            voted = votes.sum(axis=1) > 0  # a photo without colour (zero descriptor): no vote
            p[voted] = ((1 - self.share) * p[voted] + self.share * label_votes(
                votes[voted], self.neighbour_labels, len(self.labels)))
        return p


@dataclass
class Heads:
    """A fitted artifact: alignment projection and attribute heads, with what made them."""

    image_model: str
    text_model: str
    image_dim: int
    text_dim: int
    colour_dim: int
    projection: np.ndarray | None  # (image_dim, text_dim) float32, or None (too few pairs)
    mean: np.ndarray  # (image_dim + colour_dim,) feature standardisation
    std: np.ndarray
    attributes: dict[str, AttributeHead] = field(default_factory=dict)
    fitted_at: str = ""
    version: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    # Colour descriptors (m, colour_dim) of the fitted products whose labels vote beside the
    # heads (AttributeHead.share), or None when no head uses them.
    neighbours: np.ndarray | None = None
    neighbour_k: int = 10
    neighbour_temperature: float = 0.05

    # -- use -------------------------------------------------------------------------------
    def project(self, image_vectors: np.ndarray) -> np.ndarray:
        """Image vectors (n, image_dim) mapped into the text space, L2-normalised (n, text_dim).
        IncompatibleHeads when the artifact has no alignment head."""
        if self.projection is None:
            raise IncompatibleHeads("this heads artifact has no alignment head (too few titled "
                                    "products when it was fitted)")
        return l2_normalise(np.asarray(image_vectors, np.float32) @ self.projection)

    def features(self, image_vectors: np.ndarray, colour_vectors: np.ndarray) -> np.ndarray:
        """Standardised (n, image_dim + colour_dim) features of photos."""
        x = np.concatenate([np.asarray(image_vectors, np.float32),
                            np.asarray(colour_vectors, np.float32)], axis=1)
        return (x - self.mean) / self.std

    def probabilities(self, image_vectors: np.ndarray, colour_vectors: np.ndarray,
                      fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per fitted field (of `fields`, default all), (n, classes) calibrated probabilities
        (classes: head.labels)."""
        heads = {name: head for name, head in self.attributes.items()
                 if fields is None or name in fields}
        x = self.features(image_vectors, colour_vectors)
        votes = None
        if self.neighbours is not None and any(h.share > 0 for h in heads.values()):
            votes = neighbour_weights(np.asarray(colour_vectors, np.float32), self.neighbours,
                                      self.neighbour_k, self.neighbour_temperature)
        return {name: head.probabilities(x, votes) for name, head in heads.items()}

    def predict(self, image_vectors: np.ndarray, colour_vectors: np.ndarray,
                top: int = 5) -> list[dict[str, dict[str, float]]]:
        """Per photo, per field, its `top` most likely values with their probabilities (most
        likely first)."""
        probs = self.probabilities(image_vectors, colour_vectors)
        result: list[dict[str, dict[str, float]]] = [{} for _ in range(len(image_vectors))]
        for name, p in probs.items():
            labels = self.attributes[name].labels
            order = np.argsort(-p, axis=1)[:, :top]
            for i, row in enumerate(order):
                result[i][name] = {labels[j]: float(p[i, j]) for j in row}
        return result

    def summary(self) -> dict[str, Any]:
        """What /healthz and the fit command show: version, date, fields, validation figures."""
        return {"version": self.version, "fitted_at": self.fitted_at,
                "alignment": self.projection is not None, "fields": sorted(self.attributes),
                "validation": self.validation}

    # -- storage ---------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The JSON half of the artifact."""
        return {"format": FORMAT, "version": self.version, "fitted_at": self.fitted_at,
                "image_model": self.image_model, "text_model": self.text_model,
                "image_dim": self.image_dim, "text_dim": self.text_dim,
                "colour_dim": self.colour_dim, "alignment": self.projection is not None,
                "fields": {name: {"labels": h.labels, "temperature": h.temperature,
                                  "share": h.share}
                           for name, h in self.attributes.items()},
                "neighbours": {"k": self.neighbour_k,
                               "temperature": self.neighbour_temperature},
                "validation": self.validation}

    def save(self, folder: str | Path) -> Path:
        """Write `heads-<version>.npz/.json` into `folder` and point `current.json` at it
        (written last, atomically, so a reader never sees half an artifact). Returns the
        JSON path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "std": self.std}
        if self.projection is not None:
            arrays["projection"] = self.projection
        if self.neighbours is not None:
            arrays["neighbours"] = self.neighbours
        for name, head in self.attributes.items():
            arrays[f"w:{name}"], arrays[f"b:{name}"] = head.weight, head.bias
            if head.neighbour_labels is not None:
                arrays[f"n:{name}"] = head.neighbour_labels
        stem = folder / f"heads-{self.version}"
        npz = io.BytesIO()
        np.savez(npz, **arrays)
        write_atomically(f"{stem}.npz", npz.getvalue())
        write_atomically(f"{stem}.json", json.dumps(self.metadata(), indent=2))
        write_atomically(folder / CURRENT, json.dumps({"version": self.version}, indent=2))
        return Path(f"{stem}.json")


def model_ids(image_model: Any, text_model: Any) -> tuple[str, str]:
    """Stable names of the configured encoders (ImageModelSettings, TextModelSettings): an
    artifact fitted on one pair of models is refused by another."""
    image = f"{image_model.model_name}:{image_model.weights}"
    text = text_model.model_path or "bundled:all-MiniLM-L6-v2"
    return image, text


def heads_folder(root: str | Path, collection: str) -> Path:
    """Where the artifacts of one collection live: one folder per collection under `root`."""
    return Path(root) / collection


def current_version(folder: str | Path) -> str | None:
    """The version `current.json` names, or None when nothing has been fitted."""
    path = Path(folder) / CURRENT
    if not path.exists():
        return None
    return str(json.loads(path.read_text())["version"])


def load_heads(folder: str | Path, image_model: str, text_model: str, image_dim: int,
               text_dim: int, version: str | None = None) -> Heads | None:
    """The artifact `version` (default: the current one) of a folder, or None when none has been
    fitted. IncompatibleHeads when it was made for other models, dims or format."""
    folder = Path(folder)
    version = version or current_version(folder)
    if version is None:
        return None
    stem = folder / f"heads-{version}"
    if not Path(f"{stem}.json").exists():
        raise IncompatibleHeads(f"heads artifact {version!r} not found in {folder}")
    meta = json.loads(Path(f"{stem}.json").read_text())
    expected = {"format": FORMAT, "image_model": image_model, "text_model": text_model,
                "image_dim": image_dim, "text_dim": text_dim}
    wrong = [f"{k} {meta.get(k)!r} (this service: {v!r})" for k, v in expected.items()
             if meta.get(k) != v]
    if wrong:
        raise IncompatibleHeads(
            f"heads artifact {version!r} in {folder} was fitted for other models: "
            f"{'; '.join(wrong)}; refit it with `python -m batch_index fit`")
    with np.load(f"{stem}.npz") as arrays:
        data = {k: arrays[k] for k in arrays.files}
    attributes = {name: AttributeHead(list(spec["labels"]), data[f"w:{name}"],
                                      data[f"b:{name}"], float(spec["temperature"]),
                                      float(spec.get("share", 0.0)), data.get(f"n:{name}"))
                  for name, spec in meta["fields"].items()}
    near = meta.get("neighbours", {})
    return Heads(meta["image_model"], meta["text_model"], meta["image_dim"], meta["text_dim"],
                 meta["colour_dim"], data.get("projection"), data["mean"], data["std"],
                 attributes, meta["fitted_at"], meta["version"], meta.get("validation", {}),
                 data.get("neighbours"), int(near.get("k", 10)),
                 float(near.get("temperature", 0.05)))


def neighbour_weights(queries: np.ndarray, neighbours: np.ndarray, k: int,
                      temperature: float) -> np.ndarray:
    """(n, m) vote weights of m neighbours for n queries by colour descriptor ((n, d) and
    (m, d), unit length): the k most similar get exp((sim - best) / temperature), the rest 0;
    each row sums to 1 (all zero without neighbours, and for an all-zero query: a photo
    without colour information)."""
    if not len(neighbours) or not len(queries):
        return np.zeros((len(queries), len(neighbours)), np.float32)
    sims = queries @ neighbours.T
    k = min(k, len(neighbours))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    near = np.take_along_axis(sims, top, axis=1)
    weights = np.exp((near - near.max(axis=1, keepdims=True)) / temperature)
    votes = np.zeros_like(sims)
    np.put_along_axis(votes, top, weights / weights.sum(axis=1, keepdims=True), axis=1)
    votes[~np.any(queries, axis=1)] = 0.0
    return votes.astype(np.float32)


def label_votes(votes: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(n, classes) share of each class in the neighbour vote (`votes` (n, m) from
    `neighbour_weights`, `labels` (m,) class index or -1); uniform where no labelled
    neighbour votes."""
    known = labels >= 0
    onehot = np.zeros((len(labels), classes), np.float32)
    onehot[np.flatnonzero(known), labels[known]] = 1.0
    p = votes @ onehot
    total = p.sum(axis=1, keepdims=True)
    return np.where(total > 0, p / np.maximum(total, 1e-12), 1.0 / classes)
