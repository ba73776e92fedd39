"""Heads fitted on the demo catalogue (deployments.core.heads): real encoders, no Ray.

The demo catalogue (deployments.core.demo, 240 drawn products: 8 types x 10 colours) is embedded
with the project's encoders; heads are fitted on its first 160 products and scored on the other
80, which the fit never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deployments.core.catalog import read_csv_catalog
from deployments.core.demo import generate_demo_catalog
from deployments.core.heads import (
    FitOptions,
    Heads,
    IncompatibleHeads,
    current_version,
    fit_heads,
    load_heads,
)
from deployments.core.images import decode_image
from deployments.core.learned import (
    found_by,
    fuse,
    mix_attributes,
    photo_query,
    rank_words_and_photos,
    with_known_labels,
)
from deployments.core.products import Prediction, Product
from deployments.core.store import Hit

FIT, HELD = slice(0, 160), slice(160, 240)
IDS = ("tf_efficientnet_lite0:package", "bundled:all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, image_encoder, text_encoder) -> dict:
    """The 240-product demo catalogue's products, image/text vectors and colour descriptors."""
    from deployments.core.colour import colour_descriptor

    csv = generate_demo_catalog(tmp_path_factory.mktemp("demo240"), n=240)
    rows, rejects = read_csv_catalog(csv)
    assert not rejects
    products = [Product.model_validate_json(r.product_json) for r in rows]
    pixels = np.stack([image_encoder.preprocessor.model_pixels(
        decode_image(Path(r.image_path).read_bytes())) for r in rows])
    return {"products": products, "image": image_encoder.embed_pixels(pixels),
            "text": text_encoder.embed([p.embedding_text() for p in products]),
            "colour": np.stack([colour_descriptor(p) for p in pixels]).astype(np.float32)}


@pytest.fixture(scope="module")
def heads(demo) -> Heads:
    labels = {f: [getattr(p, f) for p in demo["products"][FIT]] for f in FitOptions().fields}
    return fit_heads(demo["image"][FIT], demo["text"][FIT], demo["colour"][FIT], labels,
                     np.ones(160, bool), *IDS, FitOptions(min_field_products=20))


def test_attribute_heads_beat_chance_on_unseen_products(demo, heads):
    predicted = heads.predict(demo["image"][HELD], demo["colour"][HELD])
    products = demo["products"][HELD]
    for field, floor in (("article_type", 0.9), ("colour", 0.6)):
        accuracy = np.mean([next(iter(p[field])) == getattr(q, field)
                            for p, q in zip(predicted, products, strict=True)])
        classes = len({getattr(q, field) for q in demo["products"]})
        assert accuracy >= floor, (field, accuracy)
        assert accuracy > 4 / classes, (field, accuracy)  # chance is 1/classes
    assert {"article_type", "colour", "category", "gender"} <= set(heads.attributes)
    for p in predicted:  # calibrated probabilities: in (0, 1], most likely first
        values = list(p["colour"].values())
        assert values == sorted(values, reverse=True) and 0 < values[0] <= 1
    assert heads.validation["article_type"]["accuracy"] > 0.5
    assert "temperature" in heads.validation["colour"]


def test_alignment_finds_unseen_photos_by_words(demo, heads, text_encoder):
    """Words -> photos, from pixels only: "{colour} {type}" over the 80 unseen products."""
    products = demo["products"][HELD]
    photos = heads.project(demo["image"][HELD])
    types = sorted({p.article_type for p in products})
    queries = text_encoder.embed([f"a photo of {t.lower()}" for t in types])
    precision = []
    for article_type, query in zip(types, queries, strict=True):
        top = np.argsort(-(photos @ query))[:5]
        precision.append(np.mean([products[i].article_type == article_type for i in top]))
    assert np.mean(precision) >= 0.6, precision  # chance: about 1/8
    # Searching the image index with the words mapped into image space ranks alike.
    image_space = photo_query(heads, queries[0])
    assert image_space.shape == (demo["image"].shape[1],)
    assert abs(np.linalg.norm(image_space) - 1) < 1e-5


def test_artifact_round_trips(tmp_path, demo, heads):
    path = heads.save(tmp_path)
    assert current_version(tmp_path) == heads.version
    meta = json.loads(path.read_text())
    assert meta["image_model"] == IDS[0] and meta["image_dim"] == 1280 and meta["text_dim"] == 384
    assert set(meta["fields"]["colour"]["labels"]) >= {"Red", "Blue"}
    assert meta["validation"]["article_type"]["held_out"] > 0 and meta["fitted_at"]
    loaded = load_heads(tmp_path, *IDS, 1280, 384)
    assert loaded.version == heads.version
    np.testing.assert_allclose(loaded.project(demo["image"][:5]), heads.project(demo["image"][:5]))
    assert loaded.predict(demo["image"][:5], demo["colour"][:5]) == heads.predict(
        demo["image"][:5], demo["colour"][:5])


def test_mismatched_artifact_is_refused_with_a_clear_error(tmp_path, heads):
    heads.save(tmp_path)
    with pytest.raises(IncompatibleHeads, match=r"image_dim 1280 .*this service: 768.*refit"):
        load_heads(tmp_path, *IDS, 768, 384)
    with pytest.raises(IncompatibleHeads, match=r"text_model .*other-model"):
        load_heads(tmp_path, IDS[0], "other-model", 1280, 384)
    assert load_heads(tmp_path / "nothing-fitted", *IDS, 1280, 384) is None


def _hit(i: str, score: float) -> Hit:
    return Hit(Product(id=i, title=i), score)


def test_fuse_marks_what_found_each_product_and_scores_descend():
    fused = fuse([_hit("a", 0.9), _hit("b", 0.8)], [_hit("c", 0.5), _hit("a", 0.4)], 3,
                 explain=True)
    assert [h.product.id for h in fused] == ["a", "c", "b"]
    assert [h.found_by for h in fused] == ["both", "photo", "text"]
    assert [h.signals["found_by"] for h in fused] == ["both", "photo", "text"]
    assert fused[0].signals["text_similarity"] == 0.9
    scores = [h.score for h in fused]
    assert scores == sorted(scores, reverse=True)


def test_predictions_are_mixed_beside_votes():
    votes = {"article_type": {"Tshirts": 1.0}, "colour": {}}
    mixed = mix_attributes(votes, {"article_type": {"Shirts": 0.8, "Tshirts": 0.2}}, 0.5)
    assert mixed["article_type"] == {"Tshirts": 0.6, "Shirts": 0.4}
    assert mixed["colour"] == {}  # no colour vote (a photo without colour): nothing predicted


def test_more_like_this_uses_the_products_own_labels():
    predicted = {"article_type": {"Shirts": 0.7, "Tshirts": 0.3}, "colour": {"Red": 0.9}}
    product = Product(id="p", title="p", article_type="Tshirts")
    assert with_known_labels(predicted, product) == {"article_type": {"Tshirts": 1.0},
                                                     "colour": {"Red": 0.9}}
    assert with_known_labels(predicted, None) == predicted


def test_words_and_photos_rank_by_fused_score_and_named_values():
    """A product's own label counts for a named value; without one, its prediction's
    confidence; found_by says which similarity ranks it among the k best."""
    def hit(i: str, fused: float, text: float, photo: float, **labels) -> Hit:
        predicted = {f: Prediction(value=v, confidence=0.6) for f, v in labels.pop(
            "predicted", {}).items()}
        return Hit(Product(id=i, title=i, predicted=predicted, **labels), fused,
                   signals={"text": text, "photo": photo})

    hits = [hit("titled", 0.032, 0.7, 0.2, colour="Red"),
            hit("untitled", 0.031, 0.05, 0.6, predicted={"colour": "Red"}),
            hit("blue", 0.030, 0.6, 0.3, colour="Blue")]
    ranked = rank_words_and_photos(hits, {"colour": ["Red"]}, 2, explain=True)
    assert [h.product.id for h in ranked] == ["titled", "untitled"]
    assert [h.found_by for h in ranked] == ["text", "photo"]
    assert ranked[1].signals["evidence"] == {"colour": 0.6}
    assert ranked[1].signals["predicted_used"] == {"colour": ["Red", 0.6]}
    assert ranked[0].score > ranked[1].score and 0 < ranked[1].score <= 1
    assert found_by(hits, 3) == ["both", "both", "both"]  # all three are in both top 3
