"""Attribute-aware ranking: pure numpy + PIL, no Ray, no Milvus.

ImageNet features see shape far better than colour, so a photo query is answered in two steps:
the vector search returns a pool of candidates (200 by default) with their labels and colour
descriptors, then `rerank` orders the pool by a weighted sum of four signals:

  visual        cosine of the image vectors (from the search),
  colour        similarity of colour descriptors (`colour_descriptor`: a histogram of the product's
                own pixels, the background left out),
  article_type  P(query's article type == candidate's), by a similarity-weighted vote of the
                query's nearest candidates by image vector (`infer_attributes`),
  colour_label  P(query's colour == candidate's), by a vote of the candidates nearest in colour.

The votes use the catalogue's own labels, so nothing is trained: a new catalogue (or new products)
needs only its colour descriptors (deployments.core.colour). Text queries are parsed in
deployments.core.query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def infer_attributes(
    neighbour_labels: Sequence[Mapping[str, str]], neighbour_scores: Sequence[float],
    fields: Iterable[str] = ("article_type", "colour"), k: int = 10, temperature: float = 0.05,
) -> dict[str, dict[str, float]]:
    """P(query's value) per field, by a vote of its k most similar neighbours (the caller leaves
    out the query itself and copies of its photo). A neighbour's vote weighs
    exp((score - best score) / temperature), so near ties count alike and far ones fade.
    Empty labels do not vote."""
    order = np.argsort(-np.asarray(neighbour_scores, dtype=np.float64), kind="stable")[:k]
    if len(order) == 0:
        return {f: {} for f in fields}
    scores = np.asarray(neighbour_scores, dtype=np.float64)[order]
    weights = np.exp((scores - scores[0]) / temperature)
    result: dict[str, dict[str, float]] = {}
    for name in fields:
        votes: dict[str, float] = {}
        for index, weight in zip(order, weights, strict=True):
            value = neighbour_labels[index].get(name, "")
            if value:
                votes[value] = votes.get(value, 0.0) + float(weight)
        total = sum(votes.values())
        result[name] = {v: w / total for v, w in sorted(votes.items(), key=lambda x: -x[1])}
    return result


@dataclass
class Candidate:
    """A product from the vector search: its similarity, labels, colour descriptor and whatever
    the caller wants back (e.g. the store's Hit)."""

    id: str
    visual: float
    labels: Mapping[str, str]
    colour: np.ndarray | None = None
    item: Any = None


@dataclass
class QuerySignals:
    """What is known of the query photo: its colour descriptor and inferred attributes.
    `appearance`, for a photo without colour information (no descriptor), is per candidate (in
    the candidates' order) how alike their photos look in grey; it then fills the colour slot."""

    colour: np.ndarray | None
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)
    appearance: np.ndarray | None = None


@dataclass(frozen=True)
class Weights:
    """Weights of the signals in the re-ranking score. Visual and colour similarity order the
    products within an inferred (type, colour) class; the class probabilities, worth up to 1
    each, decide which class comes first."""

    visual: float = 1.0
    colour: float = 0.5
    article_type: float = 1.0
    colour_label: float = 1.0


def colour_scores(colour: np.ndarray | None, candidates: Sequence[Candidate]) -> np.ndarray:
    """`colour_similarity` of the query descriptor ((COLOUR_DIMS,) float32, unit length, or
    None) to every candidate: (len(candidates),) float64 in 0..1, 0 where either is missing."""
    scores = np.zeros(len(candidates))
    present = [i for i, c in enumerate(candidates) if c.colour is not None]
    if colour is not None and present:
        matrix = np.stack([candidates[i].colour for i in present]).astype(np.float64)
        scores[present] = np.clip(matrix @ colour, 0.0, 1.0)
    return scores


def query_signals(
    candidates: Sequence[Candidate], colour: np.ndarray | None, k: int = 10,
    temperature: float = 0.05,
) -> QuerySignals:
    """Infer the query's article type from the candidates nearest by image vector and its
    colour from the candidates nearest by colour descriptor (the caller has left the query's
    own product and copies of its photo out of the candidates). Without a descriptor (None or
    all zero: a photo with no colour information) colour gets no vote and no similarity."""
    if colour is not None and not np.any(colour):
        colour = None
    labels = [c.labels for c in candidates]
    attributes = infer_attributes(labels, [c.visual for c in candidates], ("article_type",),
                                  k, temperature)
    if colour is not None:
        attributes.update(infer_attributes(labels, colour_scores(colour, candidates),
                                           ("colour",), k, temperature))
    return QuerySignals(colour, attributes)


def signal_matrix(candidates: Sequence[Candidate], query: QuerySignals) -> np.ndarray:
    """(len(candidates), 4) float64, one row per candidate: visual, colour, article_type,
    colour_label (the Weights order)."""
    types = query.attributes.get("article_type", {})
    colours = query.attributes.get("colour", {})
    matrix = np.zeros((len(candidates), 4))
    matrix[:, 0] = [c.visual for c in candidates]
    matrix[:, 1] = (colour_scores(query.colour, candidates) if query.appearance is None
                    else query.appearance)
    matrix[:, 2] = [types.get(c.labels.get("article_type", ""), 0.0) for c in candidates]
    matrix[:, 3] = [colours.get(c.labels.get("colour", ""), 0.0) for c in candidates]
    return matrix


SIGNALS = ("visual", "colour", "article_type", "colour_label")


def rerank(
    candidates: Sequence[Candidate], query: QuerySignals, weights: Weights = Weights(),
    limit: int | None = None,
) -> list[tuple[Candidate, dict[str, float]]]:
    """Candidates best first (the first `limit`, or all), each with its per-signal scores and
    their weighted `score` (for `explain=true`). Ties keep the search order."""
    signals = signal_matrix(candidates, query)
    totals = signals @ np.array([getattr(weights, s) for s in SIGNALS])
    order = np.argsort(-totals, kind="stable")[:limit]
    return [(candidates[i], {**dict(zip(SIGNALS, signals[i].tolist(), strict=True)),
                             "score": float(totals[i])}) for i in order]
