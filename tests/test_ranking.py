"""Attribute-aware ranking on small synthetic data (no models, no dataset, no Milvus)."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.core.colour import (
    COLOUR_DIMS,
    colour_descriptor,
    colour_similarity,
    foreground_mask,
)
from deployments.core.query import (
    AttributeVocabulary,
    attribute_match,
    parse_query_attributes,
    singular,
)
from deployments.core.ranking import (
    Candidate,
    QuerySignals,
    Weights,
    infer_attributes,
    query_signals,
    rerank,
)

WHITE, RED, BLUE, DARK_RED = (250, 250, 250), (200, 30, 30), (30, 60, 200), (150, 20, 25)
VOCABULARY = {
    "colour": ["Black", "Navy Blue", "Blue", "Red", "Grey", "Grey Melange", "White"],
    "article_type": ["Casual Shoes", "Sports Shoes", "Formal Shoes", "Tshirts", "Shirts",
                     "Watches", "Jeans", "Heels"],
    "gender": ["Men", "Women", "Boys", "Girls", "Unisex"],
    "usage": ["Casual", "Formal", "Sports", "NA"],
    "subcategory": ["Shoes", "Topwear", "Watches", "Bags"],
}


def photo(product: tuple[int, int, int], background=WHITE, box=(60, 40, 170, 190),
          size=224) -> np.ndarray:
    """A product-shaped block of one colour on a plain background, with mild noise."""
    pixels = np.empty((size, size, 3), dtype=np.int16)
    pixels[:] = background
    top, left, bottom, right = box
    pixels[top:bottom, left:right] = product
    noise = np.random.default_rng(0).integers(-4, 5, pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


# -- colour ---------------------------------------------------------------------------------
def test_descriptor_is_a_unit_vector_of_fixed_size():
    d = colour_descriptor(photo(RED))
    assert d.shape == (COLOUR_DIMS,) and d.dtype == np.float32
    assert np.linalg.norm(d) == pytest.approx(1.0, abs=1e-5)


def test_descriptor_tells_red_from_blue_on_the_same_background():
    red, blue = colour_descriptor(photo(RED)), colour_descriptor(photo(BLUE))
    other_red = colour_descriptor(photo(DARK_RED, box=(30, 80, 200, 150)))  # other shape
    assert colour_similarity(red, other_red) > 0.6
    assert colour_similarity(red, blue) < 0.1
    assert colour_similarity(red, other_red) > colour_similarity(red, blue) + 0.5


def test_descriptor_ignores_the_background():
    on_white = colour_descriptor(photo(RED, background=WHITE))
    on_grey = colour_descriptor(photo(RED, background=(128, 128, 128)))
    small = colour_descriptor(photo(RED, box=(90, 90, 130, 130)))  # mostly background
    assert colour_similarity(on_white, on_grey) > 0.95
    assert colour_similarity(on_white, small) > 0.95


def test_foreground_mask_marks_the_product_only():
    mask = foreground_mask(photo(RED))
    assert mask[100, 100] and not mask[5, 5]
    assert mask.mean() == pytest.approx(110 * 150 / 224**2, abs=0.01)


def test_plain_photo_falls_back_to_every_pixel():
    mask = foreground_mask(photo(WHITE))
    assert mask.all()
    assert np.isfinite(colour_descriptor(photo(WHITE))).all()


def test_descriptor_rejects_bad_arrays():
    with pytest.raises(ValueError):
        colour_descriptor(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        colour_descriptor(np.zeros((10, 10, 3), dtype=np.float32))


def test_missing_descriptor_means_no_similarity():
    assert colour_similarity(None, colour_descriptor(photo(RED))) == 0.0


# -- attribute inference --------------------------------------------------------------------
def test_knn_vote_picks_the_majority_label():
    labels = [{"article_type": t} for t in ("Shirts", "Tshirts", "Tshirts", "Tshirts")]
    inferred = infer_attributes(labels, [0.90, 0.89, 0.88, 0.88], ("article_type",))
    assert max(inferred["article_type"], key=inferred["article_type"].get) == "Tshirts"
    assert sum(inferred["article_type"].values()) == pytest.approx(1.0)


def test_knn_vote_weighs_near_neighbours_more():
    labels = [{"colour": "Red"}, {"colour": "Blue"}, {"colour": "Blue"}]
    inferred = infer_attributes(labels, [0.95, 0.60, 0.60], ("colour",), temperature=0.05)
    assert inferred["colour"]["Red"] > 0.99


def test_knn_vote_uses_only_k_neighbours_and_skips_empty_labels():
    labels = [{"colour": "Red"}, {"colour": ""}, {"colour": "Blue"}, {"colour": "Blue"}]
    inferred = infer_attributes(labels, [0.9, 0.9, 0.9, 0.9], ("colour",), k=2)
    assert inferred["colour"] == {"Red": 1.0}
    assert infer_attributes([], [], ("colour",)) == {"colour": {}}


# -- re-ranking -----------------------------------------------------------------------------
def candidate(cid: str, visual: float, article_type: str, colour: tuple, name: str) -> Candidate:
    return Candidate(cid, visual, {"article_type": article_type, "colour": name},
                     colour_descriptor(photo(colour)))


def test_same_colour_same_type_ranks_above_other_colour_at_equal_visual_score():
    candidates = [
        candidate("blue-shirt", 0.8, "Shirts", BLUE, "Blue"),
        candidate("red-tshirt", 0.8, "Tshirts", RED, "Red"),
        candidate("red-shirt", 0.8, "Shirts", RED, "Red"),
        candidate("blue-tshirt", 0.8, "Tshirts", BLUE, "Blue"),
    ]
    query = QuerySignals(colour_descriptor(photo(RED)),
                         {"article_type": {"Shirts": 0.8, "Tshirts": 0.2},
                          "colour": {"Red": 0.9, "Blue": 0.1}})
    ranked = rerank(candidates, query)
    assert [c.id for c, _ in ranked][0] == "red-shirt"
    assert [c.id for c, _ in ranked][-1] == "blue-tshirt"
    assert ranked[0][1]["colour"] > 0.9 and ranked[-1][1]["colour"] < 0.1
    assert rerank(candidates, query, limit=2) == ranked[:2]  # the best two, explained alike


def test_rerank_explains_each_signal():
    candidates = [candidate("a", 0.7, "Shirts", RED, "Red")]
    query = QuerySignals(colour_descriptor(photo(RED)), {"article_type": {"Shirts": 1.0}})
    weights = Weights(visual=1.0, colour=0.5, article_type=1.0, colour_label=1.0)
    (_, signals), = rerank(candidates, query, weights)
    assert set(signals) == {"visual", "colour", "article_type", "colour_label", "score"}
    assert signals["colour_label"] == 0.0  # no colour was inferred
    expected = signals["visual"] + 0.5 * signals["colour"] + signals["article_type"]
    assert signals["score"] == pytest.approx(expected)


def test_raw_weights_keep_the_search_order():
    candidates = [candidate(str(i), 0.9 - i / 100, "Shirts", c, n)
                  for i, (c, n) in enumerate([(BLUE, "Blue"), (RED, "Red"), (RED, "Red")])]
    query = query_signals(candidates, colour_descriptor(photo(RED)))
    ranked = rerank(candidates, query, Weights(1.0, 0.0, 0.0, 0.0))
    assert [c.id for c, _ in ranked] == ["0", "1", "2"]
    assert [c.id for c, _ in rerank(candidates, query)][0] == "1"  # red wins by default


def test_query_signals_infer_type_by_vector_and_colour_by_descriptor():
    candidates = [candidate("1", 0.95, "Jeans", BLUE, "Blue"),
                  candidate("2", 0.94, "Jeans", BLUE, "Blue"),
                  candidate("3", 0.60, "Tshirts", RED, "Red")]
    signals = query_signals(candidates, colour_descriptor(photo(RED)))
    assert max(signals.attributes["article_type"], key=signals.attributes["article_type"].get) \
        == "Jeans"
    assert max(signals.attributes["colour"], key=signals.attributes["colour"].get) == "Red"


def test_rerank_accepts_candidates_without_descriptors():
    candidates = [Candidate("x", 0.5, {"article_type": "Shirts"}),
                  Candidate("y", 0.6, {"article_type": "Shirts"})]
    ranked = rerank(candidates, query_signals(candidates, None))
    assert [c.id for c, _ in ranked] == ["y", "x"]


# -- text queries ---------------------------------------------------------------------------
def test_parser_recognises_black_casual_shoes_for_men():
    parsed = parse_query_attributes("black casual shoes for men", VOCABULARY)
    assert parsed.filters == {"colour": ["Black"], "article_type": ["Casual Shoes"],
                              "gender": ["Men"]}
    assert parsed.remaining == ""


@pytest.mark.parametrize(("text", "expected", "remaining"), [
    ("Men's navy t-shirt", {"gender": ["Men"], "colour": ["Navy Blue"],
                            "article_type": ["Tshirts"]}, ""),
    ("grey melange tshirts for women", {"colour": ["Grey Melange"],
                                        "article_type": ["Tshirts"], "gender": ["Women"]}, ""),
    ("formal shirts", {"usage": ["Formal"], "article_type": ["Shirts"]}, ""),
    ("gray slim fit jeans", {"colour": ["Grey"], "article_type": ["Jeans"]}, "slim fit"),
    ("shoes for kids", {"subcategory": ["Shoes"], "gender": ["Boys", "Girls"]}, ""),
    ("ladies watch", {"gender": ["Women"], "article_type": ["Watches"]}, ""),
    ("something nice", {}, "something nice"),
    ("na", {}, "na"),
])
def test_parser_handles_plurals_synonyms_and_leftovers(text, expected, remaining):
    parsed = parse_query_attributes(text, VOCABULARY)
    assert parsed.filters == expected
    assert parsed.remaining == remaining


def test_bare_head_word_means_every_type_ending_in_it():
    vocabulary = {"article_type": ["Casual Shoes", "Sports Shoes", "Tshirts"]}
    parsed = parse_query_attributes("red shoes", vocabulary)
    assert parsed.filters == {"article_type": ["Casual Shoes", "Sports Shoes"]}
    assert parsed.remaining == "red"  # no colours in this vocabulary


def test_synonyms_apply_only_to_values_the_catalogue_has():
    parsed = parse_query_attributes("navy shirts", {"article_type": ["Shirts"]})
    assert parsed.filters == {"article_type": ["Shirts"]} and parsed.remaining == "navy"


def test_vocabulary_is_reusable():
    vocabulary = AttributeVocabulary(VOCABULARY)
    assert vocabulary.parse("red heels").filters == {"colour": ["Red"],
                                                     "article_type": ["Heels"]}
    assert vocabulary.parse("blue").filters == {"colour": ["Blue"]}


def test_singular():
    assert [singular(w) for w in ("shoes", "watches", "dresses", "accessories", "jeans", "tops",
                                  "bra", "dress", "men")] == \
        ["shoe", "watch", "dress", "accessory", "jean", "top", "bra", "dress", "men"]


def test_attribute_match_share():
    labels = {"colour": "Black", "gender": "Men"}
    assert attribute_match(labels, {"colour": ["Black"], "gender": ["Women"]}) == 0.5
    assert attribute_match(labels, {"colour": ["Black", "Blue"]}) == 1.0
    assert attribute_match(labels, {}) == 1.0
