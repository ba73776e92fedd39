"""The Ray-free Searcher on a real (temporary) Milvus Lite store, with small synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core import searcher as searcher_module
from deployments.core.colour import COLOUR_DIMS
from deployments.core.encoders import ImageFeatures
from deployments.core.errors import NotFound
from deployments.core.filters import Filters
from deployments.core.heads import AttributeHead, Heads
from deployments.core.learned import annotate_store
from deployments.core.media import MediaStore
from deployments.core.products import STRING_FIELDS, Prediction, Product
from deployments.core.searcher import Searcher
from deployments.core.settings import MilvusSettings
from deployments.core.store import ProductStore

IMAGE_DIM, TEXT_DIM = 8, 4
# id, colour, article type; p0 and p1 share a photo (same bytes, same image hash).
CATALOGUE = [("p0", "Red", "Tshirts"), ("p1", "Red", "Tshirts"), ("p2", "Blue", "Tshirts"),
             ("p3", "Blue", "Casual Shoes"), ("p4", "Blue", "Casual Shoes"),
             ("p5", "Green", "Casual Shoes")]


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32, L2-normalised rows."""
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def products(rows=CATALOGUE) -> list[Product]:
    return [Product(id=i, title=f"{c} {t} {i}", colour=c, article_type=t, gender="Men")
            for i, c, t in rows]


def photo(product_id: str) -> bytes:
    return b"photo of p0" if product_id in ("p0", "p1") else f"photo of {product_id}".encode()


def write(searcher: Searcher, items: list[Product], seed: int = 0) -> list[Product]:
    n = len(items)
    return searcher.upsert(items, [photo(p.id) for p in items], unit(n, IMAGE_DIM, seed),
                           unit(n, TEXT_DIM, seed + 1), unit(n, COLOUR_DIMS, seed + 2))


@pytest.fixture
def store(tmp_path):
    s = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="t",
                                    index_type="FLAT", index_params={}))
    yield s
    s.close()


@pytest.fixture
def searcher(store, tmp_path):
    s = Searcher(store, MediaStore(tmp_path / "media"))
    s.start(IMAGE_DIM, TEXT_DIM)
    write(s, products())
    s.vocabulary.refresh()
    return s


def ids(hits) -> list[str]:
    return [h.product.id for h in hits]


def test_recognised_words_narrow_then_top_up(searcher):
    query = unit(1, TEXT_DIM, 99)[0]
    hits = searcher.by_text(query, "red", k=4)
    assert len(hits) == 4 and len(set(ids(hits))) == 4
    assert [h.product.colour for h in hits[:2]] == ["Red", "Red"]  # the narrowed search first
    assert {h.product.colour for h in hits[2:]} <= {"Blue", "Green"}  # topped up, no duplicates


def test_enough_narrowed_hits_need_no_top_up(searcher):
    hits = searcher.by_text(unit(1, TEXT_DIM, 7)[0], "blue", k=3)
    assert sorted(ids(hits)) == ["p2", "p3", "p4"]


def test_explain_names_recognised_values(searcher):
    hits = searcher.by_text(unit(1, TEXT_DIM, 99)[0], "red t-shirts", k=3, explain=True)
    recognised = {h.product.id: h.signals["recognised"] for h in hits}
    assert recognised["p0"] == recognised["p1"] == {"colour": ["Red"], "article_type": ["Tshirts"]}
    (other,) = set(recognised) - {"p0", "p1"}  # topped up: whichever values it matches
    tshirt = searcher.get(other).article_type == "Tshirts"
    expected = {"article_type": ["Tshirts"]} if tshirt else {}
    assert recognised[other] == expected
    # `score` is what the list is ranked by: the named values each product's labels show and
    # its text cosine, averaged; descending down the list.
    for h in hits:
        matched = len(h.signals["recognised"])
        assert sum(h.signals["evidence"].values()) == matched
        assert h.score == pytest.approx((matched + max(h.signals["text"], 0)) / 3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_a_field_set_by_the_shopper_wins_over_a_recognised_word(searcher):
    hits = searcher.by_text(unit(1, TEXT_DIM, 3)[0], "red", k=6, filters=Filters(colour=["Blue"]))
    assert sorted(ids(hits)) == ["p2", "p3", "p4"]


def test_similar_leaves_out_the_product_and_copies_of_its_photo(searcher):
    found = ids(searcher.similar("p0", k=6))
    assert "p0" not in found and "p1" not in found
    assert sorted(found) == ["p2", "p3", "p4", "p5"]
    assert "p1" not in ids(searcher.similar("p0", k=6, explain=True))
    assert "p0" in ids(searcher.similar("p2", k=6))  # other products keep them


def test_a_written_value_is_usable_at_once_without_a_scan(searcher, monkeypatch):
    scans = []
    counts = searcher.store.attribute_counts
    monkeypatch.setattr(searcher.store, "attribute_counts",
                        lambda *a, **k: scans.append(1) or counts(*a, **k))
    teal = Product(id="p9", title="Teal scarf", colour="Teal", article_type="Scarves")
    write(searcher, [teal], seed=40)
    assert searcher.attributes()["colour"]["Teal"] == 1
    # A filter in any case finds the catalogue's spelling.
    query = unit(1, IMAGE_DIM, 5)[0]
    assert ids(searcher.nearest("image", query, 5, Filters(colour=["teal"]))) == ["p9"]
    # The text parser knows the new value too.
    hits = searcher.by_text(unit(1, TEXT_DIM, 5)[0], "TEAL", k=1, explain=True)
    assert ids(hits) == ["p9"] and hits[0].signals["recognised"] == {"colour": ["Teal"]}
    assert scans == []


def test_refresh_recounts_after_delete(searcher):
    assert searcher.attributes()["colour"]["Green"] == 1
    searcher.delete("p5")
    assert searcher.vocabulary.stale
    searcher.vocabulary.refresh()
    assert "Green" not in searcher.attributes()["colour"]
    assert searcher.attributes()["colour"]["Blue"] == 3 and not searcher.vocabulary.stale


def test_writes_are_flushed_every_n_rows(searcher, monkeypatch):
    monkeypatch.setattr(searcher_module, "FLUSH_EVERY_ROWS", 3)
    flushes = []
    flush = searcher.store.flush
    monkeypatch.setattr(searcher.store, "flush", lambda: flushes.append(1) or flush())
    searcher.flush()
    flushes.clear()
    more = [Product(id=f"n{i}", title=f"New {i}", colour="Red") for i in range(5)]
    write(searcher, more[:2], seed=50)
    assert flushes == []
    write(searcher, more[2:4], seed=60)  # 4 rows since the last flush
    assert flushes == [1]
    write(searcher, more[4:], seed=70)  # the count started again
    assert flushes == [1]


def test_upsert_stamps_and_stores_the_photo(searcher):
    stored = searcher.get("p0")
    assert stored.image_hash == searcher.get("p1").image_hash != searcher.get("p2").image_hash
    assert stored.fingerprint and searcher.image("p3")[0] == b"photo of p3"


@pytest.mark.parametrize("call", ["get", "similar", "delete", "image"])
def test_unknown_ids_are_not_found(searcher, call):
    method = getattr(searcher, call)
    with pytest.raises(NotFound):
        method("nope", 3) if call == "similar" else method("nope")


def test_by_image_reranks_within_filters(searcher):
    vectors = searcher.store.get_vectors("p3")
    features = ImageFeatures(vectors["image"], vectors["colour"])
    hits = searcher.by_image(features, 3, Filters(article_type=["Casual Shoes"]), explain=True)
    assert ids(hits)[0] == "p3" and set(ids(hits)) <= {"p3", "p4", "p5"}
    scores = [h.score for h in hits]  # what the list is ranked by, 0..1, descending
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert hits[0].signals["visual"] == pytest.approx(1.0, abs=1e-5) and scores[0] > scores[1]


def test_attributes_are_keyed_by_filter_name(searcher):
    write(searcher, [Product(id="m1", title="Mug", attributes={"material": "ceramic"})], seed=80)
    names = list(searcher.attributes())
    assert names[: len(STRING_FIELDS)] == list(STRING_FIELDS)  # every one, even when empty
    assert searcher.attributes()["attr.material"] == {"ceramic": 1} and "material" not in names


def sure_heads(value: str, version: str = "h4") -> Heads:
    """Heads whose colour head predicts `value` for every photo (p ~ 0.98): known outcomes."""
    features = IMAGE_DIM + COLOUR_DIMS
    colour = AttributeHead([value, "Red"], np.zeros((features, 2), np.float32),
                           np.array([4.0, 0.0], np.float32))
    return Heads("img", "txt", IMAGE_DIM, TEXT_DIM, COLOUR_DIMS, None,
                 np.zeros(features, np.float32), np.ones(features, np.float32),
                 {"colour": colour}, version=version)


def test_attributes_list_predictions_which_the_text_parser_does_not_read(searcher, monkeypatch):
    """Stored predictions are listed as `predicted.<field>` (the filter's name) with counts from
    the scan, a just-written one at once; a value only ever predicted (no product's label) is
    no attribute word of text queries, and the shop's spelling of its labels stays theirs."""
    guessed = [Product(id=f"g{i}", title=f"Guess {i}", colour="Blue" if i == 2 else "",
                       predicted={"colour": Prediction(value=v, confidence=0.8)})
               for i, v in enumerate(["Teal", "Teal", "Red"])]
    searcher.store.upsert(guessed, unit(3, IMAGE_DIM, 20), unit(3, TEXT_DIM, 21),
                          predicted_by="h0")
    searcher.vocabulary.refresh()
    attributes = searcher.attributes()
    assert attributes["predicted.colour"] == {"Teal": 2, "Red": 1}
    assert "predicted.article_type" not in attributes and "article_type" in attributes
    assert "Teal" not in attributes["colour"] and attributes["colour"]["Blue"] == 4
    # Filtering by a listed value finds exactly the products predicted so.
    query = unit(1, IMAGE_DIM, 22)[0]
    found = searcher.nearest("image", query, 10, Filters(predicted={"colour": ["Teal"]}))
    assert sorted(ids(found)) == ["g0", "g1"]
    # "teal" is no colour word: a text search is not narrowed by it; "red" (a label) is.
    assert searcher.recognised("teal", Filters()) == {}
    assert searcher.recognised("red", Filters()) == {"colour": ["Red"]}
    assert "teal" not in searcher.vocabulary.snapshot.spelling["colour"]

    scans = []
    counts = searcher.store.attribute_counts
    monkeypatch.setattr(searcher.store, "attribute_counts",
                        lambda *a, **k: scans.append(1) or counts(*a, **k))
    searcher.heads = sure_heads("Mauve")
    stored = write(searcher, [Product(id="u3", title="u3")], seed=95)
    assert stored[0].predicted["colour"].value == "Mauve"
    assert searcher.attributes()["predicted.colour"] == {"Teal": 2, "Red": 1, "Mauve": 1}
    assert scans == []  # listed before any refresh
    assert searcher.recognised("mauve", Filters()) == {}
    searcher.vocabulary.refresh()
    assert searcher.attributes()["predicted.colour"] == {"Teal": 2, "Red": 1, "Mauve": 1}
    # A predicted-value filter in any case finds the predicted spelling, though no product
    # is labelled with it (and a label's spelling still works for predictions).
    mauve = searcher.nearest("image", query, 10, Filters(predicted={"colour": ["mauve"]}))
    assert ids(mauve) == ["u3"]
    assert sorted(ids(searcher.nearest("image", query, 10,
                                       Filters(predicted={"colour": ["TEAL"]})))) == ["g0", "g1"]


def test_hybrid_fuses_photo_and_text_within_filters(searcher):
    vectors = searcher.store.get_vectors("p3")
    features = ImageFeatures(vectors["image"], vectors["colour"])
    hits = searcher.hybrid(features, vectors["text"], 3)
    assert ids(hits)[0] == "p3" and len(hits) == 3
    explained = searcher.hybrid(features, vectors["text"], 3, explain=True)
    assert ids(explained) == ids(hits) and [h.score for h in explained] == [h.score for h in hits]
    assert explained[0].signals["visual"] == pytest.approx(1.0, abs=1e-5)
    assert explained[0].signals["text"] == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    blue = searcher.hybrid(features, vectors["text"], 6, Filters(colour=["blue"]), "weighted")
    assert sorted(ids(blue)) == ["p2", "p3", "p4"]


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("colour", [True, False])
def test_lean_pool_ranks_exactly_like_the_full_one(searcher, explain, colour):
    """by_image fetches only what re-ranking reads for the pool, then the k kept in full: the
    same products, order, scores, signals and fields as re-ranking a pool of full products."""
    vectors = searcher.store.get_vectors("p3")
    features = ImageFeatures(vectors["image"], vectors["colour"], has_colour=colour)
    full = searcher.store.search(features.vector, "image", searcher.ranking.candidates,
                                 with_colour=True)
    # The query is p3's own photo (image cosine 1.0): its labels are known (same_photo).
    expected = searcher_module.rerank_hits(
        full, features.colour if colour else None, 4, searcher.weights, explain,
        None if colour else searcher.grey_appearance(full, features.layout),
        known={"article_type": "Casual Shoes", "colour": "Blue"})
    hits = searcher.by_image(features, 4, explain=explain)
    assert [(h.product, h.score, h.signals) for h in hits] == \
        [(h.product, h.score, h.signals) for h in expected]
    assert all(h.product.title and h.product.gender == "Men" for h in hits)  # full products


def _near(vector: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at exactly `cosine` to the unit `vector`."""
    noise = np.random.default_rng(seed).normal(size=vector.shape)
    noise -= noise @ vector * vector
    noise /= np.linalg.norm(noise)
    return (cosine * vector + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


def test_a_copy_of_a_stored_photo_finds_its_product_first(searcher):
    """A white T-shirt whose near neighbours (by photo and colour) are all labelled Grey: the
    neighbours' colour vote says Grey, yet a copy of its own photo must bring it back first,
    because the photo is that product's and its labels are known."""
    white = unit(1, IMAGE_DIM, 90)[0]
    colour = unit(1, COLOUR_DIMS, 91)[0]
    items = [Product(id="w", title="White tee", colour="White", article_type="Tshirts")]
    items += [Product(id=f"g{i}", title="Grey tee", colour="Grey", article_type="Tshirts")
              for i in range(6)]
    image = np.stack([white] + [_near(white, 0.96, i) for i in range(6)])
    colours = np.stack([colour] + [_near(colour, 0.97, 10 + i) for i in range(6)])
    searcher.upsert(items, [f"photo of {p.id}".encode() for p in items], image,
                    unit(7, TEXT_DIM, 92), colours)
    searcher.flush()
    hits = searcher.by_image(ImageFeatures(white, colour), 3, explain=True)
    assert ids(hits)[0] == "w" and hits[0].score > hits[1].score
    assert hits[0].signals["known_labels"] == {"article_type": "Tshirts", "colour": "White"}
    assert hits[0].signals["colour_label"] == 1.0
    # A photo that is only like it (image cosine 0.97 < same_photo_similarity) is not taken
    # for it: the neighbours' votes decide, as for any shopper's photo.
    like = searcher.by_image(ImageFeatures(_near(white, 0.97, 50), colour), 3, explain=True)
    assert all("known_labels" not in h.signals for h in like)
    assert like[0].signals["inferred"]["colour"] == "Grey"


# -- fitted heads' predictions and projections, stored per product ---------------------------
def small_heads(version: str = "h1") -> Heads:
    """A tiny heads artifact for these 8-d / 4-d vectors (random weights: plumbing only; the
    real fit is tested on the demo catalogue in test_heads.py and test_service_heads.py)."""
    rng = np.random.default_rng(5)
    features = IMAGE_DIM + COLOUR_DIMS
    colour = AttributeHead(["Red", "Blue", "Green"],
                           rng.normal(size=(features, 3)).astype(np.float32),
                           np.zeros(3, np.float32))
    return Heads("img", "txt", IMAGE_DIM, TEXT_DIM, COLOUR_DIMS,
                 rng.normal(size=(IMAGE_DIM, TEXT_DIM)).astype(np.float32),
                 np.zeros(features, np.float32), np.ones(features, np.float32),
                 {"colour": colour}, version=version)


def test_fit_backfill_stores_predictions_apart_from_labels_and_they_filter(searcher):
    heads = small_heads()
    assert annotate_store(searcher.store, heads) == len(CATALOGUE)
    stored = searcher.store.get([i for i, _, _ in CATALOGUE])
    for product, (_, colour, article_type) in zip(stored, CATALOGUE, strict=True):
        assert product.colour == colour and product.article_type == article_type  # untouched
        assert set(product.predicted) == {"colour"}
        assert 1 / 3 <= product.predicted["colour"].confidence <= 1  # most likely of three
    value = stored[0].predicted["colour"].value
    expected = {p.id for p in stored if p.predicted["colour"].value == value}
    query = unit(1, IMAGE_DIM, 11)[0]
    found = searcher.nearest("image", query, 6, Filters(predicted={"colour": [value.lower()]}))
    assert set(ids(found)) == expected
    sure = min(p.predicted["colour"].confidence for p in stored if p.id in expected)
    fewer = searcher.nearest("image", query, 6, Filters(predicted={"colour": [value]},
                                                        predicted_confidence_min=sure + 1e-3))
    assert set(ids(fewer)) < expected


def test_upsert_with_heads_in_use_predicts_at_once(searcher):
    searcher.heads = small_heads("h2")
    stored = write(searcher, [Product(id="u1", title="u1")], seed=90)  # no labels at all
    assert stored[0].predicted["colour"].value in {"Red", "Blue", "Green"}
    again = searcher.get("u1")
    assert again.colour == "" and again.predicted == stored[0].predicted
    searcher.heads = None
    write(searcher, [Product(id="u2", title="u2")], seed=91)
    assert searcher.get("u2").predicted == {}  # without heads: nothing predicted


def test_words_find_an_untitled_product_through_its_stored_projected_photo(searcher):
    """With heads, a text query searches titles and projected photos together (Milvus hybrid
    search): a product whose title says nothing is found by its photo, and scores descend."""
    heads = small_heads("h3")
    annotate_store(searcher.store, heads)
    searcher.heads = heads
    write(searcher, [Product(id=f"x{i}", title=f"Extra {i}") for i in range(30)], seed=300)
    untitled = Product(id="u7", title="u7")
    image = unit(1, IMAGE_DIM, 123)
    query = heads.project(image)[0]  # words that match its projected photo exactly
    searcher.upsert([untitled], [b"photo of u7"], image, -query[None],  # and not its title
                    unit(1, COLOUR_DIMS, 125))
    hits = searcher.by_text(query, "nothing the vocabulary knows", 10, explain=True)
    mine = hits[ids(hits).index("u7")]  # among 37 products, its photo the best, its title last
    assert mine.found_by == mine.signals["found_by"] == "photo"
    assert mine.signals["photo"] == pytest.approx(1.0, abs=1e-5) and mine.signals["text"] < 0
    assert mine.heads_version == "h3"
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    searcher.heads = None  # without heads: titles only, as before
    assert "u7" not in ids(searcher.by_text(query, "nothing the vocabulary knows", 10))


def test_a_named_field_the_heads_do_not_predict_narrows_by_stored_values(searcher):
    """Heads predicting colour only: "red shoes" must not narrow to products merely lacking an
    article type label (nothing weighs their chance of being shoes: evidence 0, as for one
    labelled otherwise), or asking for fewer results returns another first product."""
    heads = small_heads("h5")
    annotate_store(searcher.store, heads)
    searcher.heads = heads
    write(searcher, [Product(id=f"x{i}", title=f"Extra {i}") for i in range(5)], seed=300)
    query = unit(1, TEXT_DIM, 7)[0]
    many = searcher.by_text(query, "red shoes", 10, explain=True)
    assert ids(searcher.by_text(query, "red shoes", 1)) == ids(many)[:1]
