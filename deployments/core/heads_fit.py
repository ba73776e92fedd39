"""Fitting the heads of deployments.core.heads on a catalogue's stored vectors and labels:
torch on CPU, no Ray, no Milvus. Only the fit (the bulk job's `fit` step, benchmarks, tests)
imports this module and torch; the service applies a fitted artifact with numpy alone.

`fit_heads` holds out a validation split of its own and records its figures in the artifact:
the alignment's own-text -> photo recall on held-out pairs, and per attribute field its held-out
accuracy, log-loss and expected calibration error (`expected_calibration_error`). Then, unless
`FitOptions.refit` is off, each attribute head is fitted again on every labelled product.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deployments.core.encoders import l2_normalise
from deployments.core.heads import AttributeHead, Heads, neighbour_weights


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
    # After the held-out figures are taken, fit each attribute head again on every labelled
    # product (held-out ones too), keeping the temperature and neighbour share the held-out
    # split chose: the final model is refitted after model selection, as scikit-learn's
    # `GridSearchCV(refit=True)` does. The artifact's figures are the first fit's, a slightly
    # pessimistic estimate (fashion-dev, four splits: +0.8-1.6 points of article type accuracy
    # on unseen products, benchmarks/RESULTS.md).
    refit: bool = True
    seed: int = 0
    threads: int = 2


def fit_heads(image: np.ndarray, text: np.ndarray, colour: np.ndarray,
              labels: dict[str, list[str]], has_text: np.ndarray,
              image_model: str, text_model: str, options: FitOptions = FitOptions(),
              embed_text: Callable[[list[str]], np.ndarray] | None = None,
              groups: Sequence[Hashable] | None = None) -> Heads:
    """Fit the alignment head on the products with text and an attribute head per field with
    enough labels. `image` (n, image_dim), `text` (n, text_dim), `colour` (n, colour_dim):
    stored float32 vectors; `labels`: per field, n values ("" = unlabelled); `has_text`: (n,)
    bool; `embed_text` (optional, the text encoder: list of m strings -> (m, text_dim)
    float32): with it the alignment also learns from `options.templates` filled with each
    product's labels. A validation split (`options.validation_share`, `validation_split`:
    by `groups`, (n,) keys such as the photo's content hash, else by product) is held out of
    every fit; its figures go into the artifact. With `options.refit` the attribute
    heads are then fitted again on every labelled product (`_refit_attribute`)."""
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        image = np.asarray(image, np.float32)
        colour = np.asarray(colour, np.float32)
        n = len(image)
        valid = validation_split(n, options, groups)
        features = np.concatenate([image, colour], axis=1)
        mean, std = standardisation(features[~valid])
        x = (features - mean) / std
        validation: dict[str, Any] = {"products": int(n), "held_out": int(valid.sum())}
        projection = None
        pairs = np.asarray(has_text, bool)
        if (pairs & ~valid).sum() >= options.min_pairs:
            sources = [_TextSource(l2_normalise(np.asarray(text, np.float32)), np.arange(n),
                                   pairs)]
            if embed_text is not None:
                sources += [_template_source(t, labels, n, embed_text)
                            for t in options.templates]
            projection, figures = _fit_alignment(image, sources, valid, options)
            validation["alignment"] = figures
        votes = neighbour_weights(colour[valid], colour[~valid], options.neighbours,
                                  options.neighbour_temperature)
        heads: dict[str, AttributeHead] = {}
        values = {name: np.asarray(labels.get(name, [""] * n), dtype=object)
                  for name in options.fields}
        for name in options.fields:
            fitted = _fit_attribute(x, values[name], valid, votes, options)
            if fitted is not None:
                heads[name], validation[name] = fitted
        if options.refit:  # every product now: standardisation and heads
            mean, std = standardisation(features)
            x = (features - mean) / std
            for name, head in heads.items():
                validation[name].update(_refit_attribute(head, x, values[name], options))
        validation["refit"] = options.refit
        validation["fit_s"] = round(time.perf_counter() - start, 2)
    finally:
        torch.set_num_threads(threads)
    fitted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    digest = hashlib.sha256()
    for array in (projection if projection is not None else np.zeros(1), mean,
                  *(h.weight for h in heads.values())):
        digest.update(np.ascontiguousarray(array).tobytes())
    version = f"{fitted_at.replace('-', '').replace(':', '')}-{digest.hexdigest()[:8]}"
    voters = ~valid if not options.refit else np.ones(n, dtype=bool)
    neighbours = colour[voters] if any(h.share > 0 for h in heads.values()) else None
    if neighbours is None:
        for head in heads.values():
            head.neighbour_labels = None
    return Heads(image_model, text_model, image.shape[1], int(np.asarray(text).shape[1]),
                 colour.shape[1], projection, mean.astype(np.float32), std.astype(np.float32),
                 heads, fitted_at, version, validation, neighbours, options.neighbours,
                 options.neighbour_temperature)


def validation_split(n: int, options: FitOptions,
                     groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """(n,) bool: the products a fit holds out, `options.validation_share` of them drawn with
    `options.seed`. With `groups` ((n,) keys, e.g. each product's photo content hash) whole
    groups are drawn, in a random order, while they fit in that share, so products sharing a
    photo fall on the same side (a copy of a held-out photo among the fitted ones would flatter
    the held-out figures) and one big group (a placeholder photo) cannot take most of the
    catalogue; when no group fits, it is drawn by product. ValueError when `groups` is not n
    long."""
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} products")
    target = int(round(n * options.validation_share))
    if groups is not None:
        keys: dict[Hashable, int] = {}
        codes = np.array([keys.setdefault(g, len(keys)) for g in groups], dtype=np.int64)
        sizes = np.bincount(codes, minlength=len(keys))
        held, total = [], 0
        for group in np.random.default_rng(options.seed).permutation(len(keys)):
            if total + sizes[group] <= target:
                held.append(group)
                total += int(sizes[group])
        if 0 < total < n:
            return np.isin(codes, held)
    valid = np.zeros(n, dtype=bool)
    valid[np.random.default_rng(options.seed).permutation(n)[:target]] = True
    return valid


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
    vectors = (l2_normalise(np.asarray(embed_text(unique), np.float32)) if unique
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
        photos = l2_normalise(image[held] @ projection)
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
    keep, y = _classes(values, ~valid, options.min_class_products)
    if len(keep) < 2 or (values != "").sum() < options.min_field_products:
        return None
    train, held = np.flatnonzero((y >= 0) & ~valid), np.flatnonzero((y >= 0) & valid)
    weight, bias = _logistic(x[train], y[train], len(keep), options.l2)
    head = AttributeHead(keep, weight, bias, neighbour_labels=y[~valid].astype(np.int32))
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


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of (n, d) float32 rows: (d,) float32 each. A feature
    (near-)constant on these rows gets scale 1, as scikit-learn's StandardScaler does: dividing
    by a vanishing spread would blow any other photo's value of it up to ~1e6 (the demo
    catalogue's unused colour-histogram bins did, and took fits off course)."""
    mean, std = features.mean(axis=0), features.std(axis=0)
    return mean, np.where(std < 10 * np.finfo(np.float32).eps, 1.0, std).astype(np.float32)


def _refit_attribute(head: AttributeHead, x: np.ndarray, values: np.ndarray,
                     options: FitOptions) -> dict[str, int]:
    """Fit `head` again on every labelled product: its vocabulary (values with at least
    `options.min_class_products` products: a superset of the first fit's), weights and
    neighbour labels (every product's label votes); temperature and share stay as the held-out
    split chose them. Returns the refit's class and product counts."""
    head.labels, y = _classes(values, np.ones(len(values), dtype=bool),
                              options.min_class_products)
    rows = np.flatnonzero(y >= 0)
    head.weight, head.bias = _logistic(x[rows], y[rows], len(head.labels), options.l2)
    head.neighbour_labels = y.astype(np.int32)
    return {"refit_classes": len(head.labels), "refit_products": int(len(rows))}


def _classes(values: np.ndarray, counted: np.ndarray,
             minimum: int) -> tuple[list[str], np.ndarray]:
    """A field's vocabulary: the values ("" = unlabelled) held by at least `minimum` of the
    `counted` ((n,) bool) products, sorted; and per product its class index ((n,) int, -1 for
    unlabelled or rarer values)."""
    names, counts = np.unique(values[counted & (values != "")].astype(str), return_counts=True)
    labels = [str(v) for v in names[counts >= minimum]]
    index = {v: i for i, v in enumerate(labels)}
    return labels, np.array([index.get(str(v), -1) for v in values])


def _logistic(x: np.ndarray, y: np.ndarray, classes: int,
              l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by L-BFGS: (features, classes) float32 weight and
    (classes,) float32 bias for standardised (n, features) rows and (n,) class indices."""
    layer = torch.nn.Linear(x.shape[1], classes)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimiser = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=100,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(layer(xt), yt) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy()


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
