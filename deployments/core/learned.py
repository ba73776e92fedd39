"""How search uses fitted heads (deployments.core.heads): pure numpy, no Ray, no Milvus.

  text -> photo   a text vector is mapped into the image space (`photo_query`), so the image
                  index finds products by their pixels; that list is fused with the text search
                  (`fuse`), so an untitled or badly titled product is still found;
  photo labels    a query photo's predicted attributes are mixed with its neighbours' votes
                  (`mix_attributes`) before re-ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deployments.core.heads import Heads
from deployments.core.products import Product
from deployments.core.store import Hit

RRF_K = 60  # the usual reciprocal-rank-fusion constant (Milvus RRFRanker's default too)


def photo_query(heads: Heads, text_vector: np.ndarray) -> np.ndarray:
    """The image-space vector whose dot product with a stored image vector x is the projected
    photo's similarity to the text, (P x) . t = x . (P^T t): searching the image index with it
    ranks photos by their pixels' match to the words (up to the norm of P x). (image_dim,)
    float32, L2-normalised."""
    query = heads.projection @ np.asarray(text_vector, np.float32)
    return (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)


def fuse(text_hits: Sequence[Hit], photo_hits: Sequence[Hit], k: int,
         explain: bool = False) -> list[Hit]:
    """Reciprocal-rank fusion of a text search and a photo-by-words search, best first; each
    hit's `score` is its fused score (what it was ranked by) and `found_by` says which lists
    found it ("text", "photo" or "both"; also in `signals` with explain)."""
    fused: dict[str, tuple[float, Hit, set[str], dict[str, float]]] = {}
    for source, hits in (("text", text_hits), ("photo", photo_hits)):
        for rank, hit in enumerate(hits):
            score, first, sources, sims = fused.get(hit.product.id, (0.0, hit, set(), {}))
            sims[source] = hit.score
            fused[hit.product.id] = (score + 1.0 / (RRF_K + rank + 1), first, sources | {source},
                                     sims)
    ranked = sorted(fused.values(), key=lambda item: -item[0])[:k]
    result = []
    for score, hit, sources, sims in ranked:
        found_by = "both" if len(sources) == 2 else next(iter(sources))
        signals = None
        if explain:
            signals = {**(hit.signals or {}), **{f"{s}_similarity": v for s, v in sims.items()},
                       "found_by": found_by, "score": score}
        result.append(Hit(hit.product, score, signals=signals, found_by=found_by))
    return result


def with_known_labels(predicted: dict[str, dict[str, float]],
                      product: Product | None) -> dict[str, dict[str, float]]:
    """A catalogue product's own labels in place of predictions ("more like this": they are
    known); fields it has no label for keep their prediction."""
    if product is None:
        return predicted
    return {name: ({getattr(product, name): 1.0} if getattr(product, name, "") else probs)
            for name, probs in predicted.items()}


def mix_attributes(votes: dict[str, dict[str, float]], predicted: dict[str, dict[str, float]],
                   weight: float) -> dict[str, dict[str, float]]:
    """Per field of `votes`, (1 - weight) x neighbour votes + weight x the heads' prediction
    (a field the heads do not predict keeps its votes; one without votes is left out)."""
    mixed = {}
    for name, vote in votes.items():
        if name not in predicted or not vote:
            mixed[name] = vote
            continue
        values = set(vote) | set(predicted[name])
        mixed[name] = {v: (1 - weight) * vote.get(v, 0.0) + weight * predicted[name].get(v, 0.0)
                       for v in values}
    return mixed


def words_photo_scores(similarity: np.ndarray, evidence: Sequence[np.ndarray],
                       weight: float = 0.1, floor: float = 1e-4) -> np.ndarray:
    """Scores of products for words, from their photos: the projected photo's cosine to the
    text vector plus `weight` x the log-probability that the product has each attribute value
    the words name. `similarity`: (n,) cosines of the projected photos (Heads.project) to the
    text vector; `evidence`: per named attribute, (n,) probabilities in 0..1 (a product's own
    label: 1.0 if it is the named value else 0.0; otherwise the heads' calibrated
    probability of that value, 0.0 when the heads do not know it), floored at `floor` so one
    zero does not sink a product past recovery. (n,) float64, higher is better; with no
    evidence, the similarity alone. ValueError when the shapes differ."""
    score = np.asarray(similarity, np.float64).copy()
    for p in evidence:
        p = np.asarray(p, np.float64)
        if p.shape != score.shape:
            raise ValueError(f"evidence of shape {p.shape} for {score.shape} similarities")
        score += weight * np.log(np.maximum(p, floor))
    return score
