"""Filters: validation messages, and expressions that match literally on real Milvus Lite."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core.errors import InvalidInput
from deployments.core.filters import filters_from_params, parse_filters
from deployments.core.products import Product
from deployments.core.settings import MilvusSettings
from deployments.core.store import ProductStore, filter_expression

HOSTILE = ['Red" or colour != "', "Red' or 1==1", 'x"]) or (true', "ünï©ødé 红", "a\\", "or 1==1"]


@pytest.mark.parametrize(("data", "fragment"), [
    ({"shape": ["round"]}, "unknown filter 'shape'"),
    ({"colour": [""]}, "colour"),
    ({"colour": [3]}, "colour"),
    ({"price_min": -1}, "price_min"),
    ({"price_min": 50, "price_max": 10}, "price_min must be <= price_max"),
    ({"attributes": {"bad name": "x"}}, "attribute name"),
    ({"attributes": {"material": [{"nested": 1}]}}, "material"),
    ({"colour": ["x"] * 51}, "colour"),
])
def test_bad_filters_are_named(data, fragment):
    with pytest.raises(InvalidInput) as err:
        parse_filters(data)
    assert fragment in err.value.message and err.value.code == "invalid_filter"


def test_query_parameters_become_filters():
    f = filters_from_params([("k", "5"), ("colour", "Red"), ("colour", "Blue"),
                             ("price_max", "40"), ("attr.year", "2024")], {"k"})
    assert f.colour == ["Red", "Blue"] and f.price_max == 40
    assert f.attributes == {"year": ["2024", 2024.0]}
    with pytest.raises(InvalidInput, match="unknown filter 'flavour'"):
        filters_from_params([("flavour", "mint")], {"k"})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("filters") / "m.db"
    s = ProductStore(MilvusSettings(uri=str(path), collection="f", index_type="FLAT",
                                    index_params={}))
    s.ensure_collection(4, 4)
    colours = ["Red", "Blue", *HOSTILE]
    products = [Product(id=f"p{i}", title=f"P{i}", colour=colours[i % len(colours)],
                        gender="Men" if i % 2 else "Women", price=float(i * 10),
                        attributes={"material": "cotton" if i % 3 else 'silk"', "year": 2020 + i})
                for i in range(16)]
    vectors = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    s.upsert(products, vectors, vectors)
    yield s, products
    s.close()


def _ids(store, data, vocabulary=None):
    expr = filter_expression(parse_filters(data), vocabulary)
    return sorted(p.id for p in store.list(limit=100, filter=expr))


def _expected(products, predicate):
    return sorted(p.id for p in products if predicate(p))


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_match_only_themselves(store, value):
    s, products = store
    assert _ids(s, {"colour": [value]}) == _expected(products, lambda p: p.colour == value)


def test_fields_and_ranges_combine(store):
    s, products = store
    got = _ids(s, {"colour": ["Red", "Blue"], "gender": "Men", "price_min": 10, "price_max": 120})
    assert got == _expected(products, lambda p: p.colour in ("Red", "Blue") and p.gender == "Men"
                            and 10 <= p.price <= 120)
    assert got  # the case is not vacuous


def test_json_attributes_filter_with_escaping(store):
    s, products = store
    assert _ids(s, {"attributes": {"material": ['silk"']}}) == _expected(
        products, lambda p: p.attributes["material"] == 'silk"')
    assert _ids(s, {"attributes": {"year": [2023, 2025]}}) == ["p3", "p5"]


def test_vocabulary_maps_case(store):
    s, products = store
    got = _ids(s, {"colour": ["red"]}, {"colour": {"red": "Red"}})
    assert got == _expected(products, lambda p: p.colour == "Red")
