"""The synthetic demo catalogue."""

from __future__ import annotations

import csv

from deployments.core.demo import COLOURS, TYPES, generate_demo_catalog


def test_demo_catalogue_is_deterministic_and_varied(tmp_path):
    a = generate_demo_catalog(tmp_path / "a", n=80)
    b = generate_demo_catalog(tmp_path / "b", n=80)
    rows = list(csv.DictReader(a.open()))
    assert a.read_text() == b.read_text()
    assert len(rows) == 80 and len({r["id"] for r in rows}) == 80
    assert {r["article_type"] for r in rows} == set(TYPES)
    assert {r["colour"] for r in rows} == set(COLOURS)
    for r in rows[:5]:
        image_a, image_b = (tmp_path / d / r["image"] for d in ("a", "b"))
        assert image_a.read_bytes() == image_b.read_bytes()
        assert r["colour"] in r["title"]
