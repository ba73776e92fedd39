"""Pure retrieval metrics for the quality harness (no models, no Milvus)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence


def precision_at_k(
    ranked_ids: Sequence[Hashable], labels: Mapping[Hashable, Hashable], wanted: Hashable, k: int,
) -> float:
    """Share of the first k ranked ids whose label equals `wanted`. A list shorter than k
    counts the missing places as misses (the denominator is always k)."""
    if k <= 0:
        raise ValueError("k must be positive")
    return sum(labels.get(i) == wanted for i in ranked_ids[:k]) / k


def match_all_at_k(
    ranked_ids: Sequence[Hashable], records: Mapping[Hashable, Mapping[str, Hashable]],
    wanted: Mapping[str, Hashable], k: int, available: int | None = None,
) -> float:
    """Share of the first k ranked ids whose record matches every (field, value) in `wanted`.
    The denominator is k, or `available` when fewer than k products match at all (so a query
    with 4 right answers that returns all 4 scores 1.0)."""
    if k <= 0:
        raise ValueError("k must be positive")
    denominator = min(k, available) if available is not None else k
    if denominator <= 0:
        raise ValueError("nothing to find: available must be positive")
    hits = sum(all(records[i].get(f) == v for f, v in wanted.items()) for i in ranked_ids[:k])
    return hits / denominator


def recall_at_k(found_ids: Sequence[Hashable], true_ids: Sequence[Hashable], k: int) -> float:
    """Share of the true top k (e.g. exact search) that the first k found ids contain."""
    truth = set(true_ids[:k])
    if not truth:
        raise ValueError("true_ids is empty")
    return len(truth & set(found_ids[:k])) / len(truth)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0.0 for no values)."""
    return sum(values) / len(values) if values else 0.0
