"""The Milvus store on a temporary embedded Milvus Lite."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core.errors import IncompatibleStore, InvalidInput
from deployments.core.products import Prediction, Product
from deployments.core.settings import MilvusSettings
from deployments.core.store import ProductStore, expr_in, literal

IMAGE_DIM, TEXT_DIM = 16, 8
HOSTILE = ['x" or id != "', "it's", "a\\b", 'back\\"slash', "or 1==1", "ünï©ødé 红", "tab\tnl\n"]


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _products(n: int) -> list[Product]:
    colours = ["Red", "Blue", *HOSTILE]
    return [
        Product(id=f"p{i}", title=f"Product {i}", colour=colours[i % len(colours)],
                price=None if i == 3 else float(i), attributes={"material": "cotton", "i": i},
                image_ref=f"ref{i}", image_hash=f"hash{i}")
        for i in range(n)
    ]


@pytest.fixture
def milvus(tmp_path):
    return MilvusSettings(uri=str(tmp_path / "m.db"), collection="test", index_type="FLAT",
                          index_params={})


@pytest.fixture
def store(milvus):
    s = ProductStore(milvus)
    s.ensure_collection(IMAGE_DIM, TEXT_DIM)
    yield s
    s.close()


def test_upsert_get_and_count(store):
    products = _products(12)
    assert store.upsert(products, _vectors(12, IMAGE_DIM, 1), _vectors(12, TEXT_DIM, 2)) == 12
    assert store.count() == 12
    got = store.get(["p3", "p0", "missing"])
    assert [p.id for p in got] == ["p3", "p0"]
    assert got[0] == products[3] and got[0].price is None
    assert got[1].attributes == {"material": "cotton", "i": 0}


def test_upsert_replaces_by_id(store):
    products = _products(4)
    store.upsert(products, _vectors(4, IMAGE_DIM, 1), _vectors(4, TEXT_DIM, 2))
    renamed = products[1].model_copy(update={"title": "Renamed"})
    store.upsert([renamed], _vectors(1, IMAGE_DIM, 9), _vectors(1, TEXT_DIM, 9))
    assert store.count() == 4
    assert store.get(["p1"])[0].title == "Renamed"


def test_search_is_best_first_and_finds_itself(store):
    image = _vectors(20, IMAGE_DIM, 1)
    store.upsert(_products(20), image, _vectors(20, TEXT_DIM, 2))
    hits = store.search(image[7], "image", k=5)
    assert hits[0].product.id == "p7" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    excluded = store.search(image[7], "image", k=5, exclude_ids=("p7",))
    assert "p7" not in [h.product.id for h in excluded]


def test_search_by_text_vector_uses_the_text_field(store):
    text = _vectors(10, TEXT_DIM, 5)
    store.upsert(_products(10), _vectors(10, IMAGE_DIM, 1), text)
    assert store.search(text[4], "text", k=1)[0].product.id == "p4"


def test_hostile_values_are_matched_literally(store):
    products = _products(len(HOSTILE) + 2)
    n = len(products)
    store.upsert(products, _vectors(n, IMAGE_DIM, 1), _vectors(n, TEXT_DIM, 2))
    for value in HOSTILE:
        expected = [p.id for p in products if p.colour == value]
        found = store.list(limit=100, filter=f"colour == {literal(value)}")
        assert sorted(p.id for p in found) == sorted(expected), value
    assert store.get(['p1" or id != "']) == []
    assert store.count(filter=expr_in("id", ['p0" or 1==1 or id == "'])) == 0


def test_literal_rejects_what_it_cannot_escape():
    with pytest.raises(InvalidInput):
        literal(float("nan"))
    with pytest.raises(InvalidInput):
        literal(object())


def test_delete_then_gone(store):
    store.upsert(_products(5), _vectors(5, IMAGE_DIM, 1), _vectors(5, TEXT_DIM, 2))
    assert store.delete(["p2", "nope"]) == 1
    assert store.get(["p2"]) == [] and store.count() == 4
    assert store.delete(["p2"]) == 0


def test_data_survives_reopening(milvus):
    image = _vectors(6, IMAGE_DIM, 1)
    first = ProductStore(milvus)
    first.ensure_collection(IMAGE_DIM, TEXT_DIM)
    first.upsert(_products(6), image, _vectors(6, TEXT_DIM, 2))
    first.close()
    second = ProductStore(milvus)
    second.ensure_collection(IMAGE_DIM, TEXT_DIM)
    assert second.count() == 6
    assert second.search(image[5], "image", k=1)[0].product.id == "p5"
    assert np.allclose(second.get_vectors("p5")["image"], image[5], atol=1e-6)
    second.close()


def test_dimension_mismatch_is_explained(milvus):
    first = ProductStore(milvus)
    first.ensure_collection(IMAGE_DIM, TEXT_DIM)
    first.close()
    second = ProductStore(milvus)
    with pytest.raises(IncompatibleStore, match="dims"):
        second.ensure_collection(IMAGE_DIM * 2, TEXT_DIM)
    second.close()


def test_a_store_without_the_fitted_heads_fields_is_refused_with_the_rebuild_command(milvus):
    """A collection of schema 2 (before stored predictions and projected photos) is refused
    with a message naming the missing fields and the command that rebuilds it."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(milvus.uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("title", DataType.VARCHAR, max_length=2000)
    for name in ("category", "subcategory", "article_type", "colour", "size", "gender",
                 "season", "usage"):
        schema.add_field(name, DataType.VARCHAR, max_length=256, default_value="")
    schema.add_field("price", DataType.DOUBLE, nullable=True)
    schema.add_field("attributes", DataType.JSON)
    for name in ("image_ref", "image_hash", "fingerprint"):
        schema.add_field(name, DataType.VARCHAR, max_length=1024)
    index = client.prepare_index_params()
    for name, dim in (("image_vector", IMAGE_DIM), ("text_vector", TEXT_DIM),
                      ("colour_vector", 54)):
        schema.add_field(name, DataType.FLOAT_VECTOR, dim=dim)
        index.add_index(name, index_type="FLAT", metric_type="COSINE")
    client.create_collection(milvus.collection, schema=schema, index_params=index)
    client.close()
    store = ProductStore(milvus)
    try:
        with pytest.raises(IncompatibleStore) as caught:
            store.ensure_collection(IMAGE_DIM, TEXT_DIM)
        message = caught.value.message
        assert "python -m batch_index drop" in message and "batch_index index" in message
        assert "predicted_colour" in message and "photo_text_vector" in message
    finally:
        store.drop()
        store.close()


def test_schema_is_explicit(store):
    fields = {f["name"]: f for f in store._client.describe_collection("test")["fields"]}
    assert fields["id"]["is_primary"]
    for name in ("title", "category", "colour", "size", "gender", "price", "attributes",
                 "image_ref", "image_hash", "image_vector", "text_vector"):
        assert name in fields
    assert int(fields["image_vector"]["params"]["dim"]) == IMAGE_DIM


def test_search_batch_answers_each_row_like_search(store):
    image = _vectors(10, IMAGE_DIM, 1)
    store.upsert(_products(10), image, _vectors(10, TEXT_DIM, 2))
    batched = store.search_batch(image[[2, 5]], "image", k=3, exclude_ids=("p2",))
    assert len(batched) == 2 and batched[1][0].product.id == "p5"
    for row, query in zip(batched, image[[2, 5]], strict=True):
        single = store.search(query, "image", k=3, exclude_ids=("p2",))
        assert [h.product.id for h in row] == [h.product.id for h in single]


def test_attribute_counts_keep_predictions_apart_from_labels(store):
    """One scan counts the shop's own values and, apart, the stored predictions: most common
    first, capped, fields without any prediction left out."""
    guesses = ["Teal", "Teal", "Red", "", "Teal", "Red"]  # "" = no prediction
    products = [p.model_copy(update={"predicted": {"colour": Prediction(
                    value=g, confidence=0.7)} if g else {}})
                for p, g in zip(_products(6), guesses, strict=True)]
    store.upsert(products, _vectors(6, IMAGE_DIM, 1), _vectors(6, TEXT_DIM, 2),
                 predicted_by="h1")
    counts = store.attribute_counts()
    assert counts.predicted == {"colour": {"Teal": 3, "Red": 2}}
    assert list(counts.predicted["colour"]) == ["Teal", "Red"]  # most common first
    assert "Teal" not in counts.own["colour"] and counts.own["colour"]["Red"] == 1
    assert counts.own["material"] == {"cotton": 6}
    assert store.attribute_counts(max_values=1).predicted == {"colour": {"Teal": 3}}


def test_a_search_deeper_than_ef_raises_ef_to_its_depth(tmp_path):
    """An HNSW index's `ef` is the candidate list its search keeps; below k it returns only part
    of the true top k, and a Milvus server refuses it ("ef should be larger than k"). A search
    deeper than the configured ef (a 200-candidate re-ranking pool against ef 128) asks for
    ef = k; shallower ones, and other index types, keep the configured params."""
    def params(index_type: str, search_params: dict, k: int) -> dict:
        return ProductStore(MilvusSettings(uri=str(tmp_path / "x.db"), index_type=index_type,
                                           search_params=search_params))._search_params(k)

    assert params("HNSW_SQ", {"ef": 128}, 200) == {"ef": 200}
    assert params("HNSW", {"ef": 128}, 10) == {"ef": 128}
    assert params("IVF_FLAT", {"nprobe": 16}, 200) == {"nprobe": 16}

    settings = MilvusSettings(uri=str(tmp_path / "m.db"), collection="test", index_type="HNSW",
                              index_params={"M": 8, "efConstruction": 40},
                              search_params={"ef": 8})
    store = ProductStore(settings)
    store.ensure_collection(32, TEXT_DIM)
    vectors = _vectors(4000, 32, 1)
    store.upsert([Product(id=f"p{i}", title=f"Product {i}") for i in range(4000)], vectors,
                 _vectors(4000, TEXT_DIM, 2))
    store.flush()
    _wait_for_vector_index(store, "image_vector")
    queries = _vectors(10, 32, 3)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :100]
    found = [{int(h.product.id[1:]) for h in store.search(q, "image", 100)} for q in queries]
    recall = np.mean([len(f & set(e.tolist())) / 100 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.9, recall  # with ef 8 for a top 100: 0.46
    store.close()


def _wait_for_vector_index(store: ProductStore, field: str, timeout: float = 120) -> None:
    """Until Milvus Lite's background thread has built `field`'s index on every segment (it
    answers by brute force meanwhile, which would hide what the index does)."""
    import time

    collection = store._direct._collection(store.collection)
    deadline = time.monotonic() + timeout
    while not (segments := collection._segments_snapshot()) or not all(
            field in s.indexes for s in segments):
        assert time.monotonic() < deadline, "the vector index was not built"
        time.sleep(0.2)


def test_pool_products_are_what_pydantic_constructs():
    """A re-ranking pool's products, built without pydantic's per-field loop, are the products
    `model_construct` gives for the same fields, each with fresh mutable defaults."""
    from deployments.core.store import POOL_FIELDS, _pool_product

    fields = dict(zip(POOL_FIELDS, ("p1", "A red shirt", "Shirts", "Red", "r/1.jpg", "ab"),
                      strict=True))
    ours, theirs = _pool_product(fields), Product.model_construct(**fields)
    assert ours == theirs and ours.model_dump() == theirs.model_dump()
    assert ours.model_fields_set == theirs.model_fields_set == set(POOL_FIELDS)
    ours.attributes["size"] = "M"
    ours.predicted["colour"] = Prediction(value="Red", confidence=0.9)
    assert _pool_product(fields).attributes == {} and _pool_product(fields).predicted == {}
