"""The cached Milvus Lite search path (deployments.core.lite_search) answers exactly as the
engine's own: same hits, same order, same scores, through upserts, deletes, flushes and filters."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core import lite_search
from deployments.core.filters import Filters
from deployments.core.products import Product
from deployments.core.settings import MilvusSettings
from deployments.core.store import ProductStore, filter_expression

IMAGE_DIM, TEXT_DIM = 16, 8


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _products(ids: range, tag: str = "") -> list[Product]:
    return [Product(id=f"p{i}", title=f"Product {i}{tag}", article_type=("Shirt", "Shoe")[i % 2])
            for i in ids]


@pytest.fixture
def store(tmp_path):
    # FLAT: exact either way, so both paths must agree whenever Milvus Lite's background thread
    # attaches a segment's index (an HNSW built between the two searches changes the answers).
    s = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="test",
                                    index_type="FLAT", index_params={}))
    s.ensure_collection(IMAGE_DIM, TEXT_DIM)
    yield s
    lite_search.install()
    s.close()


def _answers(store: ProductStore, queries: np.ndarray, **kwargs) -> list:
    return [[(h.product.id, h.product.title, round(h.score, 6))
             for h in store.search(q, "image", 12, **kwargs)] for q in queries]


def _both(store: ProductStore, queries: np.ndarray, **kwargs) -> list:
    """Answers of the cached path, after checking the engine's own path gives the same."""
    from milvus_lite.engine import collection, projection

    assert lite_search.install()
    assert collection.execute_search_with_index is lite_search.execute_search
    assert projection._is_primary is lite_search.is_primary
    cached = _answers(store, queries, **kwargs)
    lite_search.uninstall()
    engine = _answers(store, queries, **kwargs)
    lite_search.install()
    assert cached == engine
    return cached


def test_same_answers_through_upserts_deletes_and_flushes(store):
    queries = _vectors(15, IMAGE_DIM, 99)
    store.upsert(_products(range(300)), _vectors(300, IMAGE_DIM, 1), _vectors(300, TEXT_DIM, 2))
    store.flush()  # segment 1
    _both(store, queries)
    # Segment 2 replaces 50 products of segment 1 (new titles, new vectors).
    moved = _vectors(200, IMAGE_DIM, 3)
    store.upsert(_products(range(250, 450), " v2"), moved, _vectors(200, TEXT_DIM, 4))
    store.flush()
    store.delete([f"p{i}" for i in range(0, 20)])  # deleted after the flush
    store.flush()
    # Unflushed: new versions of products in both segments, and deletes of flushed ones.
    recent = _vectors(30, IMAGE_DIM, 5)
    store.upsert(_products(range(280, 310), " v3"), recent, _vectors(30, TEXT_DIM, 6))
    store.delete([f"p{i}" for i in range(20, 30)] + ["p400"])
    answers = _both(store, np.vstack([queries, moved[:5], recent[:5]]))
    found = [pid for row in answers for pid, _, _ in row]
    gone = {f"p{i}" for i in range(30)} | {"p400"}
    assert not gone & set(found), "a deleted product came back"
    for row in answers:
        assert len({pid for pid, _, _ in row}) == len(row), "a product listed twice"
    titles = {pid: title for row in answers for pid, title, _ in row}
    assert all(titles[f"p{i}"].endswith(" v3") for i in range(280, 310) if f"p{i}" in titles)
    # Each of the newest vectors finds its own product first.
    assert [row[0][0] for row in answers[-5:]] == [f"p{i}" for i in range(280, 285)]
    assert [row[0][0] for row in answers[-10:-5]] == [f"p{i}" for i in range(250, 255)]


def test_same_answers_with_filters_and_exclusions(store):
    store.upsert(_products(range(200)), _vectors(200, IMAGE_DIM, 1), _vectors(200, TEXT_DIM, 2))
    store.flush()
    store.upsert(_products(range(150, 220), " v2"), _vectors(70, IMAGE_DIM, 3),
                 _vectors(70, TEXT_DIM, 4))
    queries = _vectors(10, IMAGE_DIM, 7)
    shirts = filter_expression(Filters(article_type=["Shirt"]))
    answers = _both(store, queries, filter=shirts, exclude_ids=["p150", "p152"])
    ids = [int(pid[1:]) for row in answers for pid, _, _ in row]
    assert ids and all(i % 2 == 0 for i in ids) and not {150, 152} & set(ids)


def test_json_attribute_filters_read_only_their_columns_and_answer_the_same(store):
    """`attr.<name>` filters run the engine's row-wise evaluator; handed only the columns the
    expression reads, it keeps the same rows, in flushed segments and unflushed rows, for
    searches and for queries (count)."""
    from milvus_lite.search.filter import eval as filter_eval

    def tagged(ids: range, tag: str = "") -> list[Product]:
        return [p.model_copy(update={"attributes": {"material": ("silk", "wool", "cotton")[
            int(p.id[1:]) % 3], "split": "a" if int(p.id[1:]) % 2 else "b"}})
                for p in _products(ids, tag)]

    store.upsert(tagged(range(240)), _vectors(240, IMAGE_DIM, 1), _vectors(240, TEXT_DIM, 2))
    store.flush()
    store.upsert(tagged(range(200, 260), " v2"), _vectors(60, IMAGE_DIM, 3),
                 _vectors(60, TEXT_DIM, 4))  # unflushed
    expr = filter_expression(Filters(article_type=["Shirt"],
                                     attributes={"material": ["silk", "cotton"]}))
    assert lite_search.install() and filter_eval.evaluate_python is lite_search.evaluate_python
    answers = _both(store, _vectors(10, IMAGE_DIM, 7), filter=expr)
    ids = [int(pid[1:]) for row in answers for pid, _, _ in row]
    assert ids and all(i % 2 == 0 and i % 3 != 1 for i in ids)
    counted = store.count(expr)
    lite_search.uninstall()
    assert store.count(expr) == counted == sum(1 for i in range(260) if i % 6 in (0, 2))
    lite_search.install()


def test_cache_follows_a_flush(store):
    """A cached snapshot is not reused once a flush changes the segments."""
    store.upsert(_products(range(100)), _vectors(100, IMAGE_DIM, 1), _vectors(100, TEXT_DIM, 2))
    store.flush()
    query = _vectors(1, IMAGE_DIM, 8)
    first = _both(store, query)[0][0][0]
    store.delete([first])
    store.flush()
    assert first not in [pid for pid, _, _ in _both(store, query)[0]]


def test_same_entities_when_only_some_fields_are_read(store):
    """Hits read only the requested columns of a segment (not the whole row, vectors included)
    and still carry exactly what the engine returns: scalars, JSON, vectors, a re-ranking pool."""
    from milvus_lite.engine import collection

    products = [p.model_copy(update={"attributes": {"size": ["S", "M"][i % 2]}, "price": i + 0.5})
                for i, p in enumerate(_products(range(120)))]
    store.upsert(products[:60], _vectors(60, IMAGE_DIM, 1), _vectors(60, TEXT_DIM, 2))
    store.flush()
    store.upsert(products[60:], _vectors(60, IMAGE_DIM, 5), _vectors(60, TEXT_DIM, 6))
    store.flush()  # two segments: their hits are read side by side
    store.upsert(_products(range(100, 130), " v2"), _vectors(30, IMAGE_DIM, 3),
                 _vectors(30, TEXT_DIM, 4))  # some hits from the memtable
    query = _vectors(3, IMAGE_DIM, 9)
    fields = [["id", "title", "colour_vector"], ["attributes", "price", "text_vector"],
              ["price", "id", "article_type", "title"], None]

    def raw(output_fields):
        return store._client.search(store.collection, data=query.tolist(),
                                    anns_field="image_vector", limit=60,
                                    output_fields=output_fields)

    def engine_hits(output_fields):  # the engine's own records, before any client shapes them
        col = store._direct._collection(store.collection)
        return col.search(query.tolist(), top_k=60, metric_type="COSINE",
                          output_fields=output_fields, anns_field="image_vector")

    for output_fields in fields:
        assert lite_search.install()
        cached_hits = engine_hits(output_fields)
        cached = raw(output_fields)
        pool = [(h.product.id, h.product.title, h.score, h.colour) for h in
                store.search_pool(query[0], "image", 60)]
        lite_search.uninstall()
        assert _comparable(engine_hits(output_fields)) == _comparable(cached_hits), output_fields
        engine = raw(output_fields)
        engine_pool = [(h.product.id, h.product.title, h.score, h.colour) for h in
                       store.search_pool(query[0], "image", 60)]
        lite_search.install()
        assert collection.execute_search_with_index is lite_search.execute_search
        assert [list(r) for r in cached] == [list(r) for r in engine], output_fields
        assert [(i, t, s) for i, t, s, _ in pool] == [(i, t, s) for i, t, s, _ in engine_pool]
        assert all((a is None and b is None) or np.array_equal(a, b)
                   for (*_, a), (*_, b) in zip(pool, engine_pool, strict=True))


def _comparable(hits: list[list[dict]]) -> list[list[tuple]]:
    """Engine hits as (id, distance, entity's fields in order, values; vectors as lists)."""
    def value(v):
        return np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v
    return [[(h["id"], h["distance"], [(k, value(v)) for k, v in h["entity"].items()])
             for h in row] for row in hits]


@pytest.mark.parametrize("index_type", ["HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8"])
@pytest.mark.parametrize("metric", ["COSINE", "IP", "L2"])
def test_masked_index_search_selects_the_rows_the_engine_does(index_type, metric):
    """A filtered search (or one after deletes) hands the segment index a mask: ours passes it
    to faiss as a bitmap, the engine's as a set of row ids built per search; the same index
    gives the same rows and distances either way, for every faiss index type and metric."""
    from milvus_lite.index.factory import build_index_from_spec
    from milvus_lite.index.spec import IndexSpec

    vectors = _vectors(3000, 32, 11) * np.random.default_rng(12).uniform(0.5, 2, (3000, 1))
    queries = _vectors(20, 32, 13).astype(np.float32)
    spec = IndexSpec(field_name="image_vector", index_type=index_type, metric_type=metric,
                     build_params={"M": 8, "efConstruction": 40} if "HNSW" in index_type
                     else {"nlist": 16})
    index = build_index_from_spec(spec, vectors.astype(np.float32))
    params = {"ef": 48} if "HNSW" in index_type else {"nprobe": 4}
    assert lite_search._faiss_parameters(index, params) is not None  # the bitmap path is taken
    rng = np.random.default_rng(14)
    for share in (0.9, 0.3, 0.01):  # most rows live (deletes), a filter, a narrow filter
        mask = rng.random(3000) < share
        ids, dists = lite_search.index_search(index, queries, 25, mask, params)
        assert ids.dtype == np.int64 and dists.dtype == np.float32
        assert mask[ids[ids >= 0]].all() and (ids >= 0).sum() > 0
        if "HNSW" in index_type and share == 0.01:  # knowhere's rule: scan the allowed rows
            assert hasattr(index._index, "hnsw")
            assert lite_search._exhaustive(index._index.ntotal, int(mask.sum()), 25)
            exact_ids, exact_dists = _exact(vectors, queries, mask, 25, metric)
            if index_type == "HNSW":  # the stored float vectors: the exact answer
                assert np.array_equal(ids, exact_ids)
                np.testing.assert_allclose(dists, exact_dists, rtol=1e-4, atol=1e-4)
            else:  # 8-bit codes: the exact answer up to quantisation
                assert _recall(ids, exact_ids) >= 0.95
            continue
        engine_ids, engine_dists = index.search(queries, 25, valid_mask=mask, params=params)
        assert np.array_equal(ids, engine_ids)
        assert np.array_equal(dists, engine_dists)
    nothing = lite_search.index_search(index, queries, 5, np.zeros(3000, bool), params)
    assert (nothing[0] == -1).all() and np.isinf(nothing[1]).all()
    with pytest.raises(ValueError, match="valid_mask length"):
        lite_search.index_search(index, queries, 5, np.ones(10, bool), params)


def _exact(vectors: np.ndarray, queries: np.ndarray, mask: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest allowed rows and their distances in the engine's terms (COSINE 1 - cos,
    IP -dot, L2 Euclidean), by numpy over every allowed row."""
    rows = np.flatnonzero(mask)
    v, q = vectors[rows].astype(np.float64), queries.astype(np.float64)
    if metric == "COSINE":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = {"COSINE": lambda: 1 - q @ v.T, "IP": lambda: -(q @ v.T),
         "L2": lambda: np.sqrt(np.maximum(((q[:, None, :] - v[None]) ** 2).sum(-1), 0))}[metric]()
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return rows[order], np.take_along_axis(d, order, axis=1)


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


def test_a_narrow_filter_finds_the_nearest_allowed_products():
    """With 0.5% of an HNSW segment's rows allowed (a narrow attribute filter on a big
    catalogue), the graph walk stops before it finds most of them; the search scans the
    allowed rows instead, as a Milvus server does, and returns the true nearest."""
    from milvus_lite.index.factory import build_index_from_spec
    from milvus_lite.index.spec import IndexSpec

    vectors = _vectors(20000, 32, 21)
    queries = _vectors(30, 32, 22)
    spec = IndexSpec(field_name="image_vector", index_type="HNSW_SQ", metric_type="COSINE",
                     build_params={"M": 16, "efConstruction": 100})
    index = build_index_from_spec(spec, vectors)
    mask = np.random.default_rng(23).random(20000) < 0.005
    truth, _ = _exact(vectors, queries, mask, 10, "COSINE")
    ids, _ = lite_search.index_search(index, queries, 10, mask, {"ef": 64})
    engine_ids, _ = index.search(queries, 10, valid_mask=mask, params={"ef": 64})
    assert _recall(ids, truth) >= 0.95, _recall(ids, truth)  # 0.99 here
    assert _recall(engine_ids, truth) < 0.8, _recall(engine_ids, truth)  # before: 0.39 here
    # 5% allowed, ef 16: the walk returns all 10 hits, the wrong ones (so the fallback for a
    # short walk cannot help); the scan rule alone finds the nearest.
    mask = np.random.default_rng(23).random(20000) < 0.05
    truth, _ = _exact(vectors, queries, mask, 10, "COSINE")
    ids, _ = lite_search.index_search(index, queries, 10, mask, {"ef": 16})
    engine_ids, _ = index.search(queries, 10, valid_mask=mask, params={"ef": 16})
    assert ((engine_ids >= 0).sum(axis=1) == 10).all()
    assert _recall(ids, truth) >= 0.95, _recall(ids, truth)
    assert _recall(engine_ids, truth) < 0.8, _recall(engine_ids, truth)  # 0.41 here


@pytest.mark.parametrize("index_type", ["HNSW", "HNSW_SQ"])
def test_a_graph_walk_that_comes_back_short_is_answered_from_a_scan(index_type):
    """7% of the rows allowed (just under the scan rule) and k 50: the graph walk returns as
    few as 5-9 hits though 141 rows are allowed; the search answers with 50, the nearest."""
    from milvus_lite.index.factory import build_index_from_spec
    from milvus_lite.index.spec import IndexSpec

    vectors, queries = _vectors(2000, 16, 31), _vectors(20, 16, 32)
    spec = IndexSpec(field_name="image_vector", index_type=index_type, metric_type="COSINE",
                     build_params={"M": 8, "efConstruction": 40})
    index = build_index_from_spec(spec, vectors)
    mask = np.zeros(2000, bool)
    mask[np.random.default_rng(33).choice(2000, 141, replace=False)] = True
    assert hasattr(index._index, "hnsw")
    assert not lite_search._exhaustive(index._index.ntotal, 141, 50)  # the walk is tried first
    engine_ids, _ = index.search(queries, 50, valid_mask=mask, params={"ef": 16})
    assert (engine_ids >= 0).sum(axis=1).min() < 50  # premise: the walk comes back short
    ids, _ = lite_search.index_search(index, queries, 50, mask, {"ef": 16})
    assert ((ids >= 0).sum(axis=1) == 50).all() and mask[ids].all()
    exact_ids, _ = _exact(vectors, queries, mask, 50, "COSINE")
    assert _recall(ids, exact_ids) >= (1.0 if index_type == "HNSW" else 0.95)


def test_primary_key_terms_answer_as_the_engine_does(store):
    """`id in`, `id not in` and `not (id in ...)` terms (alone, with other clauses, nested in
    an AND) are answered from the snapshot's keys and keep exactly the engine's rows, with
    products updated across segments, deleted, and still unflushed."""
    store.upsert(_products(range(200)), _vectors(200, IMAGE_DIM, 1), _vectors(200, TEXT_DIM, 2))
    store.flush()
    store.upsert(_products(range(100, 160), " v2"), _vectors(60, IMAGE_DIM, 3),
                 _vectors(60, TEXT_DIM, 4))
    store.flush()  # p100-p159 now in both segments, the newer one live
    store.delete(["p101", "p3"])
    store.upsert(_products(range(150, 170), " v3"), _vectors(20, IMAGE_DIM, 5),
                 _vectors(20, TEXT_DIM, 6))  # unflushed
    queries = _vectors(8, IMAGE_DIM, 7)
    listed = '["p2", "p3", "p100", "p101", "p120", "p155", "p190", "nope"]'
    shirts = filter_expression(Filters(article_type=["Shirt"]))
    cases = {
        f"id in {listed}": {"p2", "p100", "p120", "p155", "p190"},
        f"id not in {listed}": None,
        f"not (id in {listed}) and {shirts}": None,
        f"({shirts}) and (id in {listed} and id not in [\"p120\"])": {"p2", "p100", "p190"},
    }
    for expr, only in cases.items():
        terms, rest = lite_search.key_terms(_compiled(store, expr), "id")
        assert terms, expr  # the terms are taken off the expression
        answers = _both(store, queries, filter=expr)
        found = {pid for row in answers for pid, _, _ in row}
        assert found and not found & {"p3", "p101", "nope"}, expr
        if only is not None:
            assert found == only, expr
        else:
            assert not found & {"p2", "p100", "p120", "p155", "p190"}, expr
    answers = _both(store, queries, exclude_ids=["p120", "p155"])  # "more like this"
    assert not {pid for row in answers for pid, _, _ in row} & {"p120", "p155"}



def _compiled(store: ProductStore, expr: str):
    """The parsed expression in the engine's compiled form (fields unchecked)."""
    from milvus_lite.search.filter import CompiledExpr, parse_expr

    return CompiledExpr(ast=parse_expr(expr), fields={}, backend="arrow", source=expr)
