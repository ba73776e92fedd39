"""Heads fitted on the shop's own catalogue: torch on CPU, no Ray, no Milvus.

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
from collections.abc import Callable, Sequence
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
    align_epochs: int = 30  # cycling through titles and the templates
    align_batch: int = 512
    align_temperature: float = 0.05
    align_lr: float = 2e-3
    # Label sentences the alignment also learns from (needs `embed_text`); epochs cycle
    # through titles and each template, so the fit costs no more per epoch.
    templates: tuple[str, ...] = ("{colour} {article_type}", "{article_type}")
    neighbours: int = 10  # colour-descriptor neighbours that vote beside a head
    neighbour_temperature: float = 0.05
    neighbour_shares: tuple[float, ...] = (0.0, 0.25, 0.5)  # picked on the held-out split
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
        return _normalise(np.asarray(image_vectors, np.float32) @ self.projection)

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
                                      data[f"b:{name}"], float(spec["temperature"]),
                                      float(spec.get("share", 0.0)), data.get(f"n:{name}"))
                  for name, spec in meta["fields"].items()}
    near = meta.get("neighbours", {})
    return Heads(meta["image_model"], meta["text_model"], meta["image_dim"], meta["text_dim"],
                 meta["colour_dim"], data.get("projection"), data["mean"], data["std"],
                 attributes, meta["fitted_at"], meta["version"], meta.get("validation", {}),
                 data.get("neighbours"), int(near.get("k", 10)),
                 float(near.get("temperature", 0.05)))


# -- fitting -------------------------------------------------------------------------------
def fit_heads(image: np.ndarray, text: np.ndarray, colour: np.ndarray,
              labels: dict[str, list[str]], has_text: np.ndarray,
              image_model: str, text_model: str, options: FitOptions = FitOptions(),
              embed_text: Callable[[list[str]], np.ndarray] | None = None) -> Heads:
    """Fit the alignment head on the products with text and an attribute head per field with
    enough labels. `image` (n, image_dim), `text` (n, text_dim), `colour` (n, colour_dim):
    stored float32 vectors; `labels`: per field, n values ("" = unlabelled); `has_text`: (n,)
    bool; `embed_text` (optional, the text encoder: list of m strings -> (m, text_dim)
    float32): with it the alignment also learns from `options.templates` filled with each
    product's labels. A validation split (by product, `options.validation_share`) is held
    out of every fit; its figures go into the artifact."""
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
            sources = [_TextSource(_normalise(np.asarray(text, np.float32)), np.arange(n),
                                   pairs)]
            if embed_text is not None:
                sources += [_template_source(t, labels, n, embed_text)
                            for t in options.templates]
            projection, figures = _fit_alignment(image, sources, valid, options)
            validation["alignment"] = figures
        votes = neighbour_weights(colour[valid], colour[~valid], options.neighbours,
                                  options.neighbour_temperature)
        heads: dict[str, AttributeHead] = {}
        for name in options.fields:
            values = np.asarray(labels.get(name, [""] * n), dtype=object)
            fitted = _fit_attribute(x, values, valid, votes, options)
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
    neighbours = colour[~valid] if any(h.share > 0 for h in heads.values()) else None
    if neighbours is None:
        for head in heads.values():
            head.neighbour_labels = None
    return Heads(image_model, text_model, image.shape[1], int(np.asarray(text).shape[1]),
                 colour.shape[1], projection, mean.astype(np.float32), std.astype(np.float32),
                 heads, fitted_at, version, validation, neighbours, options.neighbours,
                 options.neighbour_temperature)


@dataclass
class _TextSource:
    """What the photos are aligned to in one pass: per product a row of `vectors` (`rows`,
    (n,)), and which products take part (`mask`, (n,) bool). Products sharing a row (the same
    label sentence) are all right answers for each other."""

    vectors: np.ndarray  # (m, text_dim) float32, L2-normalised
    rows: np.ndarray  # (n,) int
    mask: np.ndarray  # (n,) bool


def _template_source(template: str, labels: dict[str, list[str]], n: int,
                     embed_text: Callable[[list[str]], np.ndarray]) -> _TextSource:
    """A label sentence per product ("{colour} {article_type}" -> "black shirts"), lower
    case; products lacking a label the template names take no part."""
    names = [f for f in labels if "{" + f + "}" in template]
    sentences = []
    for i in range(n):
        values = {f: str(labels[f][i]).strip().lower() for f in names}
        sentences.append(template.format(**values) if all(values.values()) else "")
    unique = sorted({t for t in sentences if t})
    index = {t: j for j, t in enumerate(unique)}
    vectors = (_normalise(np.asarray(embed_text(unique), np.float32)) if unique
               else np.zeros((0, 1), np.float32))
    rows = np.array([index.get(t, -1) for t in sentences])
    return _TextSource(vectors, np.maximum(rows, 0), rows >= 0)


def _fit_alignment(image: np.ndarray, sources: list[_TextSource], valid: np.ndarray,
                   options: FitOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """Linear image -> text map by symmetric InfoNCE over in-batch negatives (in-batch
    products with the same text count as positives); epochs cycle through `sources`
    (sources[0]: the products' own texts). Figures: own-text -> photo recall@1/@10 among the
    held-out pairs (chance: 1/n, 10/n)."""
    xi = torch.from_numpy(image)
    layer = torch.nn.Linear(image.shape[1], sources[0].vectors.shape[1], bias=False)
    optimiser = torch.optim.AdamW(layer.parameters(), lr=options.align_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(options.seed)
    usable = [s for s in sources if (s.mask & ~valid).sum() >= options.min_pairs]
    for epoch in range(options.align_epochs):
        source = usable[epoch % len(usable)]
        train = torch.from_numpy(np.flatnonzero(source.mask & ~valid))
        texts, rows = torch.from_numpy(source.vectors), torch.from_numpy(source.rows)
        batch = min(options.align_batch, len(train))
        order = train[torch.randperm(len(train), generator=generator)]
        for s in range(0, len(order) - batch + 1, batch):
            idx = order[s: s + batch]
            logits = F.normalize(layer(xi[idx]), dim=1) @ texts[rows[idx]].T
            same = (rows[idx][:, None] == rows[idx][None, :]).float()
            target = same / same.sum(dim=1, keepdim=True)
            logits = logits / options.align_temperature
            loss = -((target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
                     + (target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    projection = layer.weight.detach().numpy().T.copy()
    own = sources[0]
    held = np.flatnonzero(own.mask & valid)
    figures: dict[str, Any] = {"train_pairs": int((own.mask & ~valid).sum()),
                               "held_out_pairs": int(len(held)),
                               "label_sentences": int(sum(len(s.vectors)
                                                          for s in sources[1:]))}
    if len(held) >= 2:
        photos = _normalise(image[held] @ projection)
        texts = own.vectors[own.rows[held]]
        rank = (texts @ photos.T > np.sum(texts * photos, axis=1)[:, None]).sum(axis=1)
        figures.update({"text_to_photo_recall@1": round(float(np.mean(rank < 1)), 4),
                        "text_to_photo_recall@10": round(float(np.mean(rank < 10)), 4)})
    return projection, figures


def _fit_attribute(x: np.ndarray, values: np.ndarray, valid: np.ndarray, votes: np.ndarray,
                   options: FitOptions) -> tuple[AttributeHead, dict[str, Any]] | None:
    """A calibrated logistic regression of one field, or None without enough support; the
    share of the colour neighbours' vote (`votes`: held-out x fitted products, from
    `neighbour_weights`) is the one of `options.neighbour_shares` with the lowest held-out
    log-loss."""
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
                         layer.bias.detach().numpy().copy(),
                         neighbour_labels=y[~valid].astype(np.int32))
    figures: dict[str, Any] = {"classes": len(keep), "train": int(len(train)),
                               "held_out": int(len(held)),
                               "chance": round(float(np.max(np.bincount(y[train])) / len(train)),
                                               4)}
    if len(held):
        logits = torch.from_numpy(x[held] @ head.weight + head.bias)
        target = torch.from_numpy(y[held])
        head.temperature = _fit_temperature(logits, target)
        held_votes = votes[np.flatnonzero(valid).searchsorted(held)]
        losses = {}
        for share in options.neighbour_shares:
            head.share = share
            p = head.probabilities(x[held], held_votes)
            losses[share] = float(-np.log(p[np.arange(len(held)), y[held]] + 1e-12).mean())
        head.share = min(losses, key=losses.get)
        p = head.probabilities(x[held], held_votes)
        hits = p.argmax(axis=1) == y[held]
        figures.update({"accuracy": round(float(hits.mean()), 4),
                        "nll": round(losses[head.share], 4),
                        "ece": round(expected_calibration_error(p.max(axis=1), hits), 4),
                        "temperature": round(head.temperature, 4),
                        "neighbour_share": head.share})
    return head, figures


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
