"""The quality harness's metrics on hand-made cases."""

from __future__ import annotations

import pytest

from benchmarks.quality_metrics import match_all_at_k, mean, precision_at_k, recall_at_k

LABELS = {"a": "Red", "b": "Blue", "c": "Red", "d": "Red", "e": "Green"}


def test_precision_at_k():
    ranked = ["a", "b", "c", "d", "e"]
    assert precision_at_k(ranked, LABELS, "Red", 1) == 1.0
    assert precision_at_k(ranked, LABELS, "Red", 2) == 0.5
    assert precision_at_k(ranked, LABELS, "Red", 5) == pytest.approx(0.6)
    assert precision_at_k(ranked, LABELS, "Black", 3) == 0.0


def test_precision_counts_missing_places_as_misses():
    assert precision_at_k(["a"], LABELS, "Red", 10) == pytest.approx(0.1)
    assert precision_at_k(["zz"], LABELS, "Red", 1) == 0.0  # unknown id: no label
    with pytest.raises(ValueError):
        precision_at_k(["a"], LABELS, "Red", 0)


def test_match_all_at_k():
    records = {
        1: {"colour": "Black", "article_type": "Casual Shoes", "gender": "Men"},
        2: {"colour": "Black", "article_type": "Casual Shoes", "gender": "Women"},
        3: {"colour": "Brown", "article_type": "Casual Shoes", "gender": "Men"},
        4: {"colour": "Black", "article_type": "Casual Shoes", "gender": "Men"},
    }
    wanted = {"colour": "Black", "article_type": "Casual Shoes", "gender": "Men"}
    assert match_all_at_k([1, 2, 3, 4], records, wanted, 4) == 0.5
    assert match_all_at_k([1, 4, 2, 3], records, wanted, 2) == 1.0
    # only 2 products match at all: finding both in the top 10 is perfect
    assert match_all_at_k([1, 2, 3, 4], records, wanted, 10, available=2) == 1.0
    assert match_all_at_k([1, 2, 3, 4], records, wanted, 10) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        match_all_at_k([1], records, wanted, 10, available=0)


def test_recall_at_k():
    exact = ["a", "b", "c", "d"]
    assert recall_at_k(["a", "b", "c", "d"], exact, 4) == 1.0
    assert recall_at_k(["d", "c", "x", "y"], exact, 4) == 0.5  # order does not matter
    assert recall_at_k(["a", "x"], exact, 2) == 0.5
    assert recall_at_k(["a", "b", "c"], exact, 10) == 0.75  # fewer found than exist
    with pytest.raises(ValueError):
        recall_at_k(["a"], [], 10)


def test_mean():
    assert mean([1.0, 0.0, 0.5]) == 0.5
    assert mean([]) == 0.0
