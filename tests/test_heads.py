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
    Heads,
    IncompatibleHeads,
    current_version,
    label_votes,
    load_heads,
    neighbour_weights,
)
from deployments.core.heads_fit import (
    FitOptions,
    fit_heads,
    standardisation,
    validation_split,
)
from deployments.core.images import decode_image
from deployments.core.learned import (
    found_by,
    fuse,
    mix_attributes,
    photo_query,
    rank_words_and_photos,
    with_known_labels,
    words_photo_scores,
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


@pytest.fixture(scope="module")
def heads_with_words(demo, text_encoder) -> Heads:
    """Heads fitted as `batch_index fit` does: the text encoder embeds label sentences."""
    labels = {f: [getattr(p, f) for p in demo["products"][FIT]] for f in FitOptions().fields}
    return fit_heads(demo["image"][FIT], demo["text"][FIT], demo["colour"][FIT], labels,
                     np.ones(160, bool), *IDS, FitOptions(min_field_products=20),
                     text_encoder.embed)


def test_words_find_unseen_photos_by_colour_and_type(demo, heads_with_words, text_encoder):
    """"{colour} {type}" over the 80 unseen products, from pixels only: the projection learnt
    from label sentences, and with the predicted attributes as evidence, find the right ones
    far above chance (about 1 product in 80 per pair)."""
    heads = heads_with_words
    products = demo["products"][HELD]
    assert heads.validation["alignment"]["label_sentences"] > 8  # the templates took part
    photos = heads.project(demo["image"][HELD])
    probs = heads.probabilities(demo["image"][HELD], demo["colour"][HELD])
    pairs = sorted({(p.colour, p.article_type) for p in products})
    queries = text_encoder.embed([f"{c.lower()} {t.lower()}" for c, t in pairs])
    plain, evidence = [], []
    for (colour, article_type), query in zip(pairs, queries, strict=True):
        wanted = [p.colour == colour and p.article_type == article_type for p in products]
        similarity = photos @ query
        named = [probs[f][:, heads.attributes[f].labels.index(v)]
                 if v in heads.attributes[f].labels else np.zeros(len(products))
                 for f, v in (("colour", colour), ("article_type", article_type))]
        for scores, out in ((similarity, plain), (words_photo_scores(similarity, named), evidence)):
            top = np.argsort(-scores)[: min(3, sum(wanted))]
            out.append(np.mean([wanted[i] for i in top]))
    assert np.mean(plain) >= 0.3, np.mean(plain)  # chance: about 0.02
    assert np.mean(evidence) >= np.mean(plain) and np.mean(evidence) >= 0.5, np.mean(evidence)


def test_words_photo_scores_count_the_named_attributes():
    similarity = np.array([0.50, 0.45, 0.40])
    colour = np.array([0.0, 0.9, 1.0])  # the most similar photo is surely not the colour named
    scores = words_photo_scores(similarity, [colour], weight=0.1)
    assert list(np.argsort(-scores)) == [1, 2, 0]  # it sinks below both that likely are
    np.testing.assert_allclose(words_photo_scores(similarity, []), similarity)
    with pytest.raises(ValueError, match="shape"):
        words_photo_scores(similarity, [np.ones(2)])


def test_colour_neighbours_vote_beside_the_head_when_the_held_out_split_says_so(tmp_path):
    """Colour is in the descriptor, not in the (noise) image vector: the fit gives the
    neighbours' vote a share, and unseen photos get their colour right."""
    rng = np.random.default_rng(0)
    n, names = 400, ["Red", "Blue", "Green", "Black"]
    centres = np.eye(4, 54, dtype=np.float32)
    y = rng.integers(0, 4, n)
    colour = centres[y] + 0.3 * rng.random((n, 54), dtype=np.float32)
    colour /= np.linalg.norm(colour, axis=1, keepdims=True)
    image = rng.standard_normal((n, 32)).astype(np.float32)
    labels = {"colour": [names[i] for i in y]}
    heads = fit_heads(image[:300], np.zeros((300, 8), np.float32), colour[:300],
                      {"colour": labels["colour"][:300]}, np.zeros(300, bool), *IDS,
                      FitOptions(fields=("colour",)))
    assert heads.attributes["colour"].share > 0 and heads.neighbours is not None
    predicted = heads.predict(image[300:], colour[300:])
    accuracy = np.mean([next(iter(p["colour"])) == names[t] for p, t in zip(predicted, y[300:],
                                                                            strict=True)])
    assert accuracy >= 0.9, accuracy  # chance 0.25
    heads.save(tmp_path)
    loaded = load_heads(tmp_path, IDS[0], IDS[1], 32, 8)
    assert loaded.predict(image[300:], colour[300:]) == predicted
    # A photo without colour information (zero descriptor) gets the head alone, no vote.
    blind = heads.probabilities(image[:2], np.zeros((2, 54), np.float32))["colour"]
    heads.attributes["colour"].share = 0.0
    alone = heads.probabilities(image[:2], np.zeros((2, 54), np.float32))["colour"]
    np.testing.assert_allclose(blind, alone)


def test_refit_learns_a_value_from_the_held_out_products_too():
    """A colour labelled on exactly `min_class_products` products, some of them in the fit's
    held-out split: the first fit (which the artifact's figures describe) cannot predict it;
    the refit on every labelled product does, for unseen photos of that colour."""
    rng = np.random.default_rng(1)
    names = ["Red", "Blue", "Green", "Black", "Teal"]
    counts = [80, 80, 80, 80, 20]  # Teal: 20 labelled products, the class minimum below

    def draw(per_class: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(len(names)), per_class)
        image = np.eye(len(names), 32, dtype=np.float32)[y] + 0.1 * rng.standard_normal(
            (len(y), 32)).astype(np.float32)
        colour = rng.random((len(y), 54)).astype(np.float32)
        return y, image, colour / np.linalg.norm(colour, axis=1, keepdims=True)

    y, image, colour = draw(counts)
    labels = {"colour": [names[i] for i in y]}
    fitted = {refit: fit_heads(image, np.zeros((len(y), 8), np.float32), colour, labels,
                               np.zeros(len(y), bool), *IDS,
                               FitOptions(fields=("colour",), min_class_products=20,
                                          refit=refit))
              for refit in (False, True)}
    first, refitted = fitted[False].attributes["colour"], fitted[True].attributes["colour"]
    assert "Teal" not in first.labels  # premise: some Teal products were held out
    assert refitted.labels == sorted(names)
    validation = fitted[True].validation
    assert validation["refit"] and validation["colour"]["classes"] == 4  # the first fit's
    assert validation["colour"]["refit_classes"] == 5
    assert validation["colour"]["refit_products"] == len(y)
    _, teal_image, teal_colour = draw([0, 0, 0, 0, 10])  # unseen Teal photos
    for refit, floor in ((False, 0.0), (True, 0.8)):
        predicted = fitted[refit].predict(teal_image, teal_colour)
        share = np.mean([next(iter(p["colour"])) == "Teal" for p in predicted])
        assert share >= floor if refit else share == 0.0, (refit, share)


def test_the_validation_split_keeps_products_sharing_a_photo_together():
    options = FitOptions(validation_share=0.2, seed=3)
    groups = [f"photo{i // 3}" for i in range(300)]  # 100 photos, 3 products each
    held = validation_split(300, options, groups)
    for g in set(groups):
        sides = {bool(h) for h, k in zip(held, groups, strict=True) if k == g}
        assert len(sides) == 1, g
    assert held.sum() == 60  # 20 of the 100 photos
    by_product = validation_split(300, options)
    assert by_product.sum() == 60 and (by_product == validation_split(300, options)).all()
    one_photo = validation_split(300, options, ["same"] * 300)  # nothing to split by
    assert (one_photo == by_product).all()
    # A placeholder photo shared by 900 of 1,000 products is never drawn into the 20%.
    for seed in range(8):
        placeholder = validation_split(1000, FitOptions(seed=seed),
                                       ["none"] * 900 + [f"s{i}" for i in range(100)])
        assert 90 <= placeholder.sum() <= 100 and not placeholder[:900].any(), seed
    with pytest.raises(ValueError, match="groups has 299 keys for 300 products"):
        validation_split(300, options, groups[:-1])


def test_held_out_figures_do_not_count_copies_of_fitted_photos():
    """Every photo is in the catalogue twice (two products, one label); the labels carry no
    signal. Split by product, a held-out product's copy is among the fitted ones and its colour
    neighbour votes the right label: the artifact would claim a skill it does not have. Split by
    photo, its held-out colour accuracy is near chance."""
    rng = np.random.default_rng(4)
    photos = 300
    image = rng.standard_normal((photos, 32)).astype(np.float32)
    colour = rng.random((photos, 54)).astype(np.float32)
    colour /= np.linalg.norm(colour, axis=1, keepdims=True)
    names = np.array(["Red", "Blue", "Green", "Black"])[rng.integers(0, 4, photos)]
    twice = np.repeat(np.arange(photos), 2)
    options = FitOptions(fields=("colour",), min_class_products=5, refit=False)
    accuracy = {}
    for split, groups in (("product", None), ("photo", [f"h{i}" for i in twice])):
        heads = fit_heads(image[twice], np.zeros((len(twice), 8), np.float32), colour[twice],
                          {"colour": list(names[twice])}, np.zeros(len(twice), bool), *IDS,
                          options, groups=groups)
        accuracy[split] = heads.validation["colour"]["accuracy"]
    assert accuracy["product"] > 0.6 and accuracy["photo"] < 0.4, accuracy


def test_a_feature_constant_on_the_fitted_products_is_centred_not_blown_up():
    """An unused colour-histogram bin (0 on every fitted product) must not turn a photo that
    does use it into a feature of ~1e6 (std floored at 1e-6 did, and swung predictions)."""
    fitted = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]], np.float32)
    mean, std = standardisation(fitted)
    np.testing.assert_allclose(mean, [3.0, 0.0])
    np.testing.assert_allclose(std, [np.std([1.0, 3.0, 5.0]), 1.0], rtol=1e-6)
    assert np.abs((np.array([2.0, 0.4], np.float32) - mean) / std).max() < 1


def test_neighbour_votes_sum_to_one_over_the_k_nearest():
    neighbours = np.eye(5, 3, dtype=np.float32)[[0, 0, 1, 2, 1]]
    votes = neighbour_weights(np.array([[1, 0, 0]], np.float32), neighbours, k=3,
                              temperature=0.05)
    assert votes.shape == (1, 5) and abs(votes.sum() - 1) < 1e-5
    assert (votes > 0).sum() == 3 and votes[0, 0] > 0.45 and votes[0, 1] > 0.45
    assert not neighbour_weights(np.zeros((1, 3), np.float32), neighbours, 3, 0.05).any()
    shares = label_votes(votes, np.array([0, 0, 1, -1, 1]), 2)
    assert shares[0, 0] > 0.99
    assert np.allclose(label_votes(np.zeros((1, 5)), np.zeros(5, int), 4), 0.25)


def test_words_and_photos_rank_by_best_similarity_and_named_values():
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
    # `score` reads exp(best similarity + 0.1 x log-evidence - 1): the titled red product
    # matches by its title (0.7) with a certain label.
    assert ranked[0].score == pytest.approx(np.exp(0.7 - 1.0))
    assert ranked[1].signals["photo_score"] == pytest.approx(0.6 + 0.1 * np.log(0.6))


def test_words_and_photos_weigh_every_value_the_heads_think_possible():
    """Two unlabelled products whose stored (most likely) colour is Blue: the heads'
    full prediction says one is probably Red too (0.45) and the other not (0.01), so for
    "red" the first ranks above the second although its photo is a little less like the
    words; a product's own label counts as certain (probabilities given for it are ignored)."""
    def hit(i: str, photo: float, **labels) -> Hit:
        return Hit(Product(id=i, title=i, predicted={"colour": Prediction(
            value="Blue", confidence=0.5)}, **labels), 0.0, signals={"text": 0.0,
                                                                   "photo": photo})

    hits = [hit("unlikely", 0.62), hit("maybe", 0.6), hit("labelled", 0.58, colour="Red")]
    probs = [{"colour": {"Blue": 0.5, "Red": 0.01}}, {"colour": {"Blue": 0.5, "Red": 0.45}},
             {"colour": {"Blue": 0.9, "Red": 0.05}}]  # ignored: it has a label
    ranked = rank_words_and_photos(hits, {"colour": ["Red"]}, 3, True, probs)
    assert [h.product.id for h in ranked] == ["labelled", "maybe", "unlikely"]
    assert [h.signals["evidence"]["colour"] for h in ranked] == [1.0, 0.45, 0.01]
    # Without the full prediction only the stored most likely value counts: neither is Red.
    stored = rank_words_and_photos(hits, {"colour": ["Red"]}, 3, True)
    assert [h.signals["evidence"]["colour"] for h in stored] == [1.0, 0.0, 0.0]
    assert [h.product.id for h in stored] == ["labelled", "unlikely", "maybe"]
