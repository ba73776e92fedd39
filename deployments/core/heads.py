"""Heads fitted on the shop's own catalogue: torch on CPU, no Ray, no Milvus.

Two kinds of small model learn from the stored vectors and labels of a catalogue:

  alignment   one linear layer (image_dim -> text_dim) fitted with a symmetric contrastive
              (InfoNCE) loss on (photo, title) pairs, so a text vector can find photos by their
              pixels (`Heads.project`);
  attributes  per categorical field with enough labelled products, a multinomial logistic
              regression on the image vector + colour descriptor, its probabilities calibrated
              by one temperature fitted on a held-out validation split (`Heads.predict`).

`fit_heads` holds out a validation split of its own and records its figures in the artifact.
The artifact is an `.npz` (weights) and a `.json` (model ids, dims, fields, label vocabularies,
fit date, version, validation figures) in one folder per collection, with `current.json` naming
the version in use; `load_heads` refuses one made for other models or dims (IncompatibleHeads).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deployments.core.errors import SearchError

FORMAT = 1  # the artifact layout; a reader refuses any other
CURRENT = "current.json"


class IncompatibleHeads(SearchError):
    """A heads artifact made for other models, dims or format: refit with `batch_index fit`."""

    code = "incompatible_heads"


@dataclass(frozen=True)
class FitOptions:
    """Hyper-parameters of a fit (HeadSettings carries them from the config)."""

    fields: tuple[str, ...] = ("article_type", "colour", "category", "gender", "subcategory",
                               "usage", "season")
    min_field_products: int = 50  # a field is fitted when this many products carry a label
    min_class_products: int = 5  # rarer values of a field are left out of its vocabulary
    validation_share: float = 0.2
    align_epochs: int = 20
    align_batch: int = 512
    align_temperature: float = 0.05
    align_lr: float = 2e-3
    min_pairs: int = 32  # fewer (photo, text) pairs: no alignment head
    l2: float = 1e-3  # weight decay of the attribute heads
    seed: int = 0
    threads: int = 2


@dataclass
class AttributeHead:
    """Logistic regression of one field: standardised features -> logits / temperature."""

    labels: list[str]
    weight: np.ndarray  # (features, classes) float32
    bias: np.ndarray  # (classes,) float32
    temperature: float = 1.0

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, classes) calibrated probabilities for standardised (n, features) rows."""
        logits = (features @ self.weight + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


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

    # -- use -------------------------------------------------------------------------------
    def project(self, image_vectors: np.ndarray) -> np.ndarray:
        """Image vectors (n, image_dim) mapped into the text space, L2-normalised (n, text_dim).
        IncompatibleHeads when the artifact has no alignment head."""
        if self.projection is None:
            raise IncompatibleHeads("this heads artifact has no alignment head (too few titled "
                                    "products when it was fitted)")
        return _normalise(np.asarray(image_vectors, np.float32) @ self.projection)

    def features(self, image_vectors: np.ndarray, colour_vectors: np.ndarray) -> np.ndarray:
        """Standardised (n, image_dim + colour_dim) features of photos."""
        x = np.concatenate([np.asarray(image_vectors, np.float32),
                            np.asarray(colour_vectors, np.float32)], axis=1)
        return (x - self.mean) / self.std

    def probabilities(self, image_vectors: np.ndarray,
                      colour_vectors: np.ndarray) -> dict[str, np.ndarray]:
        """Per fitted field, (n, classes) calibrated probabilities (classes: head.labels)."""
        x = self.features(image_vectors, colour_vectors)
        return {name: head.probabilities(x) for name, head in self.attributes.items()}

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
                "fields": {name: {"labels": h.labels, "temperature": h.temperature}
                           for name, h in self.attributes.items()},
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
        for name, head in self.attributes.items():
            arrays[f"w:{name}"], arrays[f"b:{name}"] = head.weight, head.bias
        stem = folder / f"heads-{self.version}"
        with open(f"{stem}.npz.tmp", "wb") as out:
            np.savez(out, **arrays)
        os.replace(f"{stem}.npz.tmp", f"{stem}.npz")
        _write_json(Path(f"{stem}.json"), self.metadata())
        _write_json(folder / CURRENT, {"version": self.version})
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
                                      data[f"b:{name}"], float(spec["temperature"]))
                  for name, spec in meta["fields"].items()}
    return Heads(meta["image_model"], meta["text_model"], meta["image_dim"], meta["text_dim"],
                 meta["colour_dim"], data.get("projection"), data["mean"], data["std"],
                 attributes, meta["fitted_at"], meta["version"], meta.get("validation", {}))


# -- fitting -------------------------------------------------------------------------------
def fit_heads(image: np.ndarray, text: np.ndarray, colour: np.ndarray,
              labels: dict[str, list[str]], has_text: np.ndarray,
              image_model: str, text_model: str, options: FitOptions = FitOptions()) -> Heads:
    """Fit the alignment head on the products with text and an attribute head per field with
    enough labels. `image` (n, image_dim), `text` (n, text_dim), `colour` (n, colour_dim):
    stored float32 vectors; `labels`: per field, n values ("" = unlabelled); `has_text`: (n,)
    bool. A validation split (by product, `options.validation_share`) is held out of every
    fit; its figures go into the artifact."""
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        image = np.asarray(image, np.float32)
        colour = np.asarray(colour, np.float32)
        n = len(image)
        rng = np.random.default_rng(options.seed)
        valid = np.zeros(n, dtype=bool)
        valid[rng.permutation(n)[: int(round(n * options.validation_share))]] = True
        x = np.concatenate([image, colour], axis=1)
        mean, std = x[~valid].mean(axis=0), x[~valid].std(axis=0) + 1e-6
        x = (x - mean) / std
        validation: dict[str, Any] = {"products": int(n), "held_out": int(valid.sum())}
        projection = None
        pairs = np.asarray(has_text, bool)
        if (pairs & ~valid).sum() >= options.min_pairs:
            projection, figures = _fit_alignment(image, np.asarray(text, np.float32), pairs,
                                                 valid, options)
            validation["alignment"] = figures
        heads: dict[str, AttributeHead] = {}
        for name in options.fields:
            values = np.asarray(labels.get(name, [""] * n), dtype=object)
            fitted = _fit_attribute(x, values, valid, options)
            if fitted is not None:
                heads[name], validation[name] = fitted
        validation["fit_s"] = round(time.perf_counter() - start, 2)
    finally:
        torch.set_num_threads(threads)
    fitted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    digest = hashlib.sha256()
    for array in (projection if projection is not None else np.zeros(1), mean,
                  *(h.weight for h in heads.values())):
        digest.update(np.ascontiguousarray(array).tobytes())
    version = f"{fitted_at.replace('-', '').replace(':', '')}-{digest.hexdigest()[:8]}"
    return Heads(image_model, text_model, image.shape[1], int(np.asarray(text).shape[1]),
                 colour.shape[1], projection, mean.astype(np.float32), std.astype(np.float32),
                 heads, fitted_at, version, validation)


def _fit_alignment(image: np.ndarray, text: np.ndarray, pairs: np.ndarray, valid: np.ndarray,
                   options: FitOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Linear image -> text map by symmetric InfoNCE over in-batch negatives; figures: text ->
    photo recall@1/@10 among the held-out pairs (chance: 1/n, 10/n)."""
    train = np.flatnonzero(pairs & ~valid)
    xi = torch.from_numpy(image[train])
    xt = F.normalize(torch.from_numpy(text[train]), dim=1)
    layer = torch.nn.Linear(image.shape[1], text.shape[1], bias=False)
    optimiser = torch.optim.AdamW(layer.parameters(), lr=options.align_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(options.seed)
    batch = min(options.align_batch, len(train))
    for _ in range(options.align_epochs):
        order = torch.randperm(len(train), generator=generator)
        for s in range(0, len(train) - batch + 1, batch):
            idx = order[s: s + batch]
            logits = F.normalize(layer(xi[idx]), dim=1) @ xt[idx].T / options.align_temperature
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    projection = layer.weight.detach().numpy().T.copy()
    held = np.flatnonzero(pairs & valid)
    figures: dict[str, Any] = {"train_pairs": int(len(train)), "held_out_pairs": int(len(held))}
    if len(held) >= 2:
        photos = _normalise(image[held] @ projection)
        texts = _normalise(text[held])
        rank = (texts @ photos.T > np.sum(texts * photos, axis=1)[:, None]).sum(axis=1)
        figures.update({"text_to_photo_recall@1": round(float(np.mean(rank < 1)), 4),
                        "text_to_photo_recall@10": round(float(np.mean(rank < 10)), 4)})
    return projection, figures


def _fit_attribute(x: np.ndarray, values: np.ndarray, valid: np.ndarray,
                   options: FitOptions) -> tuple[AttributeHead, dict[str, Any]] | None:
    """A calibrated logistic regression of one field, or None without enough support."""
    labelled = values != ""
    names, counts = np.unique(values[labelled & ~valid].astype(str), return_counts=True)
    keep = names[counts >= options.min_class_products]
    if len(keep) < 2 or labelled.sum() < options.min_field_products:
        return None
    index = {v: i for i, v in enumerate(keep)}
    y = np.array([index.get(v, -1) for v in values])
    train, held = np.flatnonzero((y >= 0) & ~valid), np.flatnonzero((y >= 0) & valid)
    layer = torch.nn.Linear(x.shape[1], len(keep))
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    optimiser = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=100,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(layer(xt), yt) + options.l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    head = AttributeHead([str(v) for v in keep], layer.weight.detach().numpy().T.copy(),
                         layer.bias.detach().numpy().copy())
    figures: dict[str, Any] = {"classes": len(keep), "train": int(len(train)),
                               "held_out": int(len(held)),
                               "chance": round(float(np.max(np.bincount(y[train])) / len(train)),
                                               4)}
    if len(held):
        logits = torch.from_numpy(x[held] @ head.weight + head.bias)
        target = torch.from_numpy(y[held])
        head.temperature = _fit_temperature(logits, target)
        p = head.probabilities(x[held])
        hits = p.argmax(axis=1) == y[held]
        figures.update({"accuracy": round(float(hits.mean()), 4),
                        "nll": round(float(-np.log(p[np.arange(len(held)), y[held]] + 1e-12)
                                           .mean()), 4),
                        "ece": round(expected_calibration_error(p.max(axis=1), hits), 4),
                        "temperature": round(head.temperature, 4)})
    return head, figures


def _fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature T minimising the held-out NLL of softmax(logits / T)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    edges = np.minimum((np.asarray(confidence) * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = edges == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / max(len(confidence), 1))


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
