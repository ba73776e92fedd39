"""Reads straight from the embedded Milvus Lite engine (deployments.core.lite_reads) answer
exactly as reads through its gRPC server do: same hits, order, scores and product fields, JSON
attributes, predictions and vectors, with filters and through writes; engine errors stay 503s."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core.errors import BackendUnavailable
from deployments.core.filters import Filters
from deployments.core.products import Prediction, Product
from deployments.core.settings import MilvusSettings
from deployments.core.store import Hit, ProductStore, filter_expression

IMAGE_DIM, TEXT_DIM = 16, 8


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _products(n: int) -> list[Product]:
    colours = ("Red", "Navy Blue", "")
    return [Product(
        id=f"p{i}", title=f"Prodüct {i} \"quoted\"", article_type=("Shirt", "Shoe")[i % 2],
        colour=colours[i % 3], price=None if i % 4 == 0 else 10.5 + i,
        attributes={"pattern": ("Solid", "Striped")[i % 2], "sizes": ["S", "M"], "n": i,
                    "nested": {"fit": "slim"}} if i % 5 else {},
        image_ref=f"ref-{i}", image_hash=f"h{i}",
        predicted={"colour": Prediction(value="Black", confidence=0.75)} if i % 3 == 2 else {},
    ) for i in range(n)]


@pytest.fixture
def stores(tmp_path):
    """One embedded store read two ways: `direct` (the engine) and `client` (gRPC)."""
    settings = MilvusSettings(uri=str(tmp_path / "m.db"), collection="reads",
                              index_type="FLAT", index_params={})
    direct = ProductStore(settings)
    direct.ensure_collection(IMAGE_DIM, TEXT_DIM)
    assert direct._direct is not None and direct._direct.available()
    client = direct.for_collection("reads")
    client._direct = None
    products = _products(60)
    colours = np.abs(_vectors(60, 54, 3))
    direct.upsert(products[:40], _vectors(60, IMAGE_DIM, 1)[:40], _vectors(60, TEXT_DIM, 2)[:40],
                  colour_vectors=colours[:40], predicted_by="v1")
    direct.flush()  # some rows in a sealed segment, the rest in the memtable
    direct.upsert(products[40:], _vectors(60, IMAGE_DIM, 1)[40:], _vectors(60, TEXT_DIM, 2)[40:],
                  colour_vectors=colours[40:], predicted_by="v1")
    yield direct, client
    direct.close()


def _dump(hits: list[Hit]) -> list:
    return [(h.product.model_dump(), round(h.score, 6),
             None if h.colour is None else np.round(h.colour, 6).tolist()) for h in hits]


FILTERS = ["", filter_expression(Filters(colour=["Red"])),
           filter_expression(Filters(price_max=30.0)), 'attributes["pattern"] == "Striped"']


@pytest.mark.parametrize("expr", FILTERS)
def test_searches_answer_as_through_grpc(stores, expr):
    direct, client = stores
    queries = _vectors(4, IMAGE_DIM, 9)
    for q in queries:
        for kwargs in ({}, {"with_colour": True}, {"exclude_ids": ["p1", "p2"]}):
            assert _dump(direct.search(q, "image", 12, expr, **kwargs)) == \
                _dump(client.search(q, "image", 12, expr, **kwargs))
        pool = direct.search_pool(q, "image", 50, expr)
        assert _dump(pool) == _dump(client.search_pool(q, "image", 50, expr))
        assert pool and _dump(direct.complete(pool[:10])) == _dump(client.complete(pool[:10]))
    texts = _vectors(3, TEXT_DIM, 10)
    assert [_dump(r) for r in direct.search_batch(texts, "text", 7, expr)] == \
        [_dump(r) for r in client.search_batch(texts, "text", 7, expr)]


def test_reads_by_id_answer_as_through_grpc(stores):
    direct, client = stores
    ids = ["p5", "missing", "p0", "p44", "p2"]
    got = direct.get(ids)
    assert [p.id for p in got] == ["p5", "p0", "p44", "p2"]
    assert got[0].attributes == {} and got[2].attributes["nested"] == {"fit": "slim"}
    assert got[3].predicted["colour"].confidence == 0.75
    assert [p.model_dump() for p in got] == [p.model_dump() for p in client.get(ids)]
    for pid in ("p3", "p50", "missing"):
        a, b = direct.get_vectors(pid), client.get_vectors(pid)
        assert (a is None) == (b is None)
        if a is not None:
            assert all(np.array_equal(a[k], b[k]) for k in a)
    a, b = direct.image_features(ids), client.image_features(ids)
    assert a.keys() == b.keys() == {"p5", "p0", "p44", "p2"}
    assert all(np.array_equal(a[i][0], b[i][0]) and np.array_equal(a[i][1], b[i][1]) for i in a)


def test_reads_by_id_give_the_engines_own_records(stores):
    """Reading only the requested columns gives exactly the records of the engine's `get`
    (fields in order, values and types, vectors), through upserts across segments, the
    memtable, flushed and unflushed deletes, missing and repeated keys."""
    from deployments.core.lite_reads import get_rows

    direct, _ = stores
    direct.flush()  # p0..p39 in one segment, p40..p59 in another
    direct.upsert([p.model_copy(update={"title": f"{p.title} v2"}) for p in _products(50)[30:50]],
                  _vectors(20, IMAGE_DIM, 4), _vectors(20, TEXT_DIM, 5))  # newer, in memtable
    direct.delete(["p3", "p45"])
    direct.flush()
    direct.delete(["p7", "p33"])  # unflushed tombstones, one of a row also in the memtable
    col = direct._direct._collection(direct.collection)
    ids = ["p1", "p3", "missing", "p31", "p33", "p7", "p41", "p45", "p52", "p1", "p8"]
    fields = [["id", "title", "attributes", "price"], ["title", "image_vector", "colour_vector"],
              ["price", "id", "predicted_colour", "predicted_colour_p", "title"],
              ["id"], []]
    for output_fields in fields:
        ours = get_rows(col, ids, output_fields)
        engine = col.get(ids, output_fields=output_fields)
        assert [list(r.items()) for r in ours] == [list(r.items()) for r in engine], \
            output_fields
        assert [type(v) for r in ours for v in r.values()] == \
            [type(v) for r in engine for v in r.values()]
    twice = get_rows(col, ["p1", "p1"], ["image_vector"])
    twice[0]["image_vector"].append(9.0)  # the two records of one key share nothing
    assert len(twice[1]["image_vector"]) == IMAGE_DIM
    assert [r["title"] for r in get_rows(col, ids, ["title"])] == [
        "Prodüct 1 \"quoted\"", "Prodüct 31 \"quoted\" v2", "Prodüct 41 \"quoted\" v2",
        "Prodüct 52 \"quoted\"", "Prodüct 1 \"quoted\"", "Prodüct 8 \"quoted\""]


def test_writes_are_read_at_once_and_deletes_are_gone(stores):
    direct, _ = stores
    q = _vectors(1, IMAGE_DIM, 11)[0]
    direct.upsert([Product(id="new", title="Just written")], q[None], _vectors(1, TEXT_DIM, 12))
    assert direct.search(q, "image", 1)[0].product.title == "Just written"
    assert direct.get(["new"])[0].title == "Just written"
    direct.delete(["new", "p0"])
    assert direct.get(["new", "p0"]) == []
    assert "new" not in {h.product.id for h in direct.search_pool(q, "image", 60)}


def test_an_alias_is_read_through(stores):
    direct, _ = stores
    direct._client.create_alias("reads", "shop")
    via_alias = direct.for_collection("shop")
    assert [p.id for p in via_alias.get(["p1", "p2"])] == ["p1", "p2"]


def test_a_released_collection_is_loaded_again(stores):
    direct, _ = stores
    direct._client.release_collection("reads")
    assert [p.id for p in direct.get(["p1"])] == ["p1"]
    assert direct.search(_vectors(1, IMAGE_DIM, 4)[0], "image", 3)


def test_engine_errors_are_backend_unavailable(stores):
    direct, _ = stores
    with pytest.raises(BackendUnavailable):
        direct.for_collection("no_such_collection").get(["p1"])
    with pytest.raises(BackendUnavailable):
        direct.search(_vectors(1, IMAGE_DIM, 4)[0], "image", 3, "no_such_field == 1")


def test_switched_off_or_a_server_uri_reads_through_the_client(tmp_path, monkeypatch):
    settings = MilvusSettings(uri=str(tmp_path / "m.db"), collection="t", index_type="FLAT",
                              index_params={}, lite_direct_reads=False)
    store = ProductStore(settings)
    assert store._direct is None
    store.close()
    monkeypatch.setattr(ProductStore, "_connect", lambda self: object())  # no server here
    assert ProductStore(MilvusSettings(uri="http://127.0.0.1:1"))._direct is None


def _fused(hits: list[Hit]) -> list:
    return [(h.product.model_dump(), round(h.score, 6),
             {k: round(v, 5) for k, v in (h.signals or {}).items()}) for h in hits]


@pytest.mark.parametrize("expr", FILTERS)
def test_hybrid_searches_answer_as_through_grpc(stores, expr):
    direct, client = stores
    images, texts = _vectors(3, IMAGE_DIM, 13), _vectors(3, TEXT_DIM, 14)
    for image, text in zip(images, texts, strict=True):
        for kwargs in ({}, {"similarities": True}, {"ranker": "weighted", "image_weight": 0.3}):
            a = direct.hybrid_search(image, text, 8, expr, candidates=20, **kwargs)
            assert a and _fused(a) == _fused(client.hybrid_search(image, text, 8, expr,
                                                                  candidates=20, **kwargs))
        for kwargs in ({}, {"fields": ["colour", "article_type"]}, {"exclude_ids": ["p2"]}):
            a = direct.text_and_photo_search(text, 5, expr, candidates=15, **kwargs)
            b = client.text_and_photo_search(text, 5, expr, candidates=15, **kwargs)
            assert a and _fused(a) == _fused(b)
