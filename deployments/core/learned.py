"""How search uses fitted heads (deployments.core.heads): pure numpy, no Ray, no Milvus.

  text -> photo   every stored product holds its photo projected into the text space; a text
                  query searches the titles and those projected photos together (Milvus hybrid
                  search, ProductStore.text_and_photo_search) and `rank_words_and_photos`
                  orders what they found, so an untitled or badly titled product is still
                  found by its pixels (`photo_query` / `fuse`: the same by the image index);
  stored labels   every stored product gets its photo projected into the text space and its
                  predicted attributes with their confidence (`annotations`, written at upsert
                  and by the fit's backfill `annotate_store`), kept apart from its own labels;
  photo labels    a query photo's predicted attributes are mixed with its neighbours' votes
                  (`mix_attributes`) before re-ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deployments.core.heads import Heads
from deployments.core.products import PREDICTED_FIELDS, Prediction, Product
from deployments.core.query import attribute_evidence
from deployments.core.store import Hit, ProductStore

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


def annotations(heads: Heads, image_vectors: np.ndarray, colour_vectors: np.ndarray | None,
                ) -> tuple[np.ndarray | None, list[dict[str, Prediction]]]:
    """What fitted heads add to stored products: their photos projected into the text space
    ((n, text_dim) float32, L2-normalised; None without an alignment head) and, per product,
    the most likely value of each predicted field (PREDICTED_FIELDS the heads fitted) with its
    calibrated probability. `image_vectors` (n, image_dim), `colour_vectors` (n, colour_dim)
    float32 (None or all zero: no colour information)."""
    image = np.asarray(image_vectors, np.float32)
    colour = (np.zeros((len(image), heads.colour_dim), np.float32) if colour_vectors is None
              else np.asarray(colour_vectors, np.float32))
    projected = heads.project(image) if heads.projection is not None else None
    predictions: list[dict[str, Prediction]] = [{} for _ in range(len(image))]
    for name, p in heads.probabilities(image, colour).items():
        if name not in PREDICTED_FIELDS:
            continue
        labels = heads.attributes[name].labels
        for i, j in enumerate(p.argmax(axis=1)):
            predictions[i][name] = Prediction(value=labels[j],
                                              confidence=round(float(p[i, j]), 4))
    return projected, predictions


def annotate_store(store: ProductStore, heads: Heads, batch_size: int = 256) -> int:
    """The fit's backfill: every product of `store` gets the projection and predictions of
    `heads` (ProductStore.annotate reads and rewrites whole rows in batches). Returns rows
    written. BackendUnavailable when Milvus fails."""

    def annotate(image: np.ndarray, colour: np.ndarray):
        projected, predictions = annotations(heads, image, colour)
        if projected is None:
            projected = np.zeros((len(image), heads.text_dim), np.float32)
        return projected, predictions

    return store.annotate(annotate, heads.version, batch_size)


def found_by(hits: Sequence[Hit], k: int) -> list[str]:
    """For hits of a words-and-photos search (`signals` `text` and `photo` cosines), which
    similarity found each: "text" or "photo" when it alone ranks the product among the k best
    of these hits, "both" when both do; otherwise the one that ranks it higher."""
    text = np.array([h.signals["text"] for h in hits], np.float64)
    photo = np.array([h.signals["photo"] if h.signals["photo"] > 0 else -np.inf for h in hits])
    text_rank = np.argsort(np.argsort(-text, kind="stable"), kind="stable")
    photo_rank = np.argsort(np.argsort(-photo, kind="stable"), kind="stable")
    sources = []
    for t, p, has_photo in zip(text_rank, photo_rank, np.isfinite(photo), strict=True):
        by_text, by_photo = t < k, p < k and has_photo
        if by_text and by_photo:
            sources.append("both")
        elif by_text or by_photo:
            sources.append("text" if by_text else "photo")
        else:
            sources.append("photo" if has_photo and p < t else "text")
    return sources


def named_evidence(product: Product, recognised: dict[str, list[str]],
                   probabilities: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Per recognised field, the probability (0..1) that a product shows one of the values a
    query named: 1 or 0 by its own label; without a label, the heads' probability of the named
    values from its photo (`probabilities`: field -> {value: p}, all values); lacking those,
    its stored prediction's confidence when that is a named value, else 0."""
    predicted = {f: (p.value, p.confidence) for f, p in product.predicted.items()}
    evidence = attribute_evidence(product.model_dump(include=set(recognised)), recognised,
                                  predicted)
    for name, values in recognised.items():
        probs = (probabilities or {}).get(name)
        if probs is not None and not getattr(product, name, ""):
            evidence[name] = min(sum(probs.get(v, 0.0) for v in values), 1.0)
    return evidence


def rank_words_and_photos(hits: Sequence[Hit], recognised: dict[str, list[str]], k: int,
                          explain: bool = False,
                          probabilities: Sequence[dict[str, dict[str, float]]] | None = None,
                          weight: float = 0.1) -> list[Hit]:
    """The k best of a words-and-photos search (ProductStore.text_and_photo_search), best
    first. Each product is scored by the better of its two similarities to the words (title
    `text` cosine; projected photo `photo` cosine, for products with one), plus `weight` x the
    log-probability of each attribute value the query named (`words_photo_scores`;
    `named_evidence`: its own label, else the heads' `probabilities` per hit, else its stored
    prediction). `score` (what the list is ordered by, 0..1, descending): exp(that - 1), so 1
    is a perfect match by words or photo with every named value certain. `found_by` says
    which similarity found it; with `explain`, `text` and `photo` cosines, `evidence`,
    `text_score`, `photo_score` (the two sums before the max)."""
    if not hits:
        return []
    evidence = [named_evidence(h.product, recognised, probabilities[i] if probabilities else None)
                for i, h in enumerate(hits)]
    named = [np.array([e[f] for e in evidence]) for f in recognised]
    text = words_photo_scores(np.array([h.signals["text"] for h in hits]), named, weight)
    photo_cos = np.array([h.signals["photo"] for h in hits])
    photo = np.where(photo_cos > 0, words_photo_scores(photo_cos, named, weight), -np.inf)
    best = np.maximum(text, photo)
    sources = found_by(hits, k)
    ranked = []
    for i in np.argsort(-best, kind="stable")[:k]:
        hit, score = hits[i], float(np.exp(min(best[i], 1.0) - 1.0))
        signals = None
        if explain:
            product = hit.product
            signals = {**(hit.signals or {}), "evidence": evidence[i],
                       "text_score": float(text[i]),
                       "photo_score": float(photo[i]) if np.isfinite(photo[i]) else None,
                       "recognised": {f: v for f, v in recognised.items()
                                      if getattr(product, f) in v},
                       "predicted_used": {f: [product.predicted[f].value,
                                              product.predicted[f].confidence]
                                          for f in recognised if f in product.predicted
                                          and not getattr(product, f)},
                       "found_by": sources[i], "score": score}
        ranked.append(Hit(hit.product, score, signals=signals, found_by=sources[i]))
    return ranked
