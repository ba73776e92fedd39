"""Attribute-aware ranking: pure numpy + PIL, no Ray, no Milvus.

ImageNet features see shape far better than colour, so a photo query is answered in two steps:
the vector search returns a pool of candidates (200 by default) with their labels and colour
descriptors, then `rerank` orders the pool by a weighted sum of four signals:

  visual        cosine of the image vectors (from the search),
  colour        similarity of colour descriptors (`colour_descriptor`: a histogram of the product's
                own pixels, the background left out),
  article_type  P(query's article type == candidate's), by a similarity-weighted vote of the
                query's nearest candidates by image vector (`infer_attributes`),
  colour_label  P(query's colour == candidate's), by a vote of the candidates nearest in colour.

The votes use the catalogue's own labels, so nothing is trained: a new catalogue (or new products)
needs only its colour descriptors. For text queries, `parse_query_attributes` finds attribute words
of the catalogue's vocabulary ("black casual shoes for men") and returns them as filters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

COLOUR_VERSION = "hsv54-v2"  # change when the descriptor changes: stored descriptors go stale
GREY_BINS = 6  # achromatic pixels, by brightness
HUE_BINS = 12  # chromatic pixels: hue (soft-assigned) x saturation (2) x brightness (2)
COLOUR_DIMS = GREY_BINS + HUE_BINS * 2 * 2
BACKGROUND_TOLERANCE = 24  # max channel difference from the border colour that is background
MIN_FOREGROUND = 0.01  # below this share of foreground pixels, use the whole photo
SAMPLE_SIDE = 112  # the histogram reads about this many pixels a side (every 2nd of 224)
CANDIDATES = 200  # pool the vector search returns for re-ranking


# -- colour -------------------------------------------------------------------------------
def foreground_mask(pixels: np.ndarray, tolerance: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """Pixels that differ from the border colour (median of the outer 2-pixel frame) by more
    than `tolerance` in some channel; the whole photo when almost nothing does."""
    frame = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                            pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(frame, axis=0).astype(np.int16)
    mask = np.abs(pixels.astype(np.int16) - background).max(axis=2) > tolerance
    return mask if mask.mean() >= MIN_FOREGROUND else np.ones(mask.shape, dtype=bool)


def colour_histogram(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Counts of the masked pixels in COLOUR_DIMS HSV bins: greys by brightness, colours by hue
    (split linearly between the two nearest hue bins), saturation and brightness."""
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float32)[mask] / 255.0
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    chromatic = (sat >= 0.15) & (val >= 0.2)
    hist = np.bincount(np.minimum((val[~chromatic] * GREY_BINS).astype(int), GREY_BINS - 1),
                       minlength=COLOUR_DIMS).astype(np.float64)
    hue, sat, val = hue[chromatic], sat[chromatic], val[chromatic]
    cell = (sat >= 0.5).astype(int) * 2 + (val >= 0.55).astype(int)
    position = hue * HUE_BINS - 0.5
    lower = np.floor(position).astype(int)
    upper_share = position - lower
    for bins, share in ((lower % HUE_BINS, 1.0 - upper_share),
                        ((lower + 1) % HUE_BINS, upper_share)):
        hist += np.bincount(GREY_BINS + bins * 4 + cell, weights=share, minlength=COLOUR_DIMS)
    return hist


def colour_descriptor(pixels: np.ndarray) -> np.ndarray:
    """COLOUR_DIMS-d colour signature of the product in a uint8 HxWx3 photo (the encoder's
    `model_pixels`): square root of the foreground's normalised HSV histogram, so it has unit
    length and the dot product of two descriptors is their Bhattacharyya coefficient (0..1)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("pixels must be a uint8 HxWx3 array")
    step = max(1, min(pixels.shape[:2]) // SAMPLE_SIDE)
    pixels = np.ascontiguousarray(pixels[::step, ::step])  # 4x cheaper, same figures
    hist = colour_histogram(pixels, foreground_mask(pixels))
    total = hist.sum()
    if total <= 0:
        return np.zeros(COLOUR_DIMS, dtype=np.float32)
    root = np.sqrt(hist / total)
    return (root / np.linalg.norm(root)).astype(np.float32)


def colour_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Bhattacharyya coefficient of two descriptors (0: no colour in common, 1: the same);
    0.0 when either is missing."""
    if a is None or b is None:
        return 0.0
    return float(np.clip(np.dot(a, b), 0.0, 1.0))


# -- attribute inference ------------------------------------------------------------------
def infer_attributes(
    neighbour_labels: Sequence[Mapping[str, str]], neighbour_scores: Sequence[float],
    fields: Iterable[str] = ("article_type", "colour"), k: int = 10, temperature: float = 0.05,
) -> dict[str, dict[str, float]]:
    """P(query's value) per field, by a vote of its k most similar neighbours (the caller leaves
    out the query itself and copies of its photo). A neighbour's vote weighs
    exp((score - best score) / temperature), so near ties count alike and far ones fade.
    Empty labels do not vote."""
    order = np.argsort(-np.asarray(neighbour_scores, dtype=np.float64), kind="stable")[:k]
    if len(order) == 0:
        return {f: {} for f in fields}
    scores = np.asarray(neighbour_scores, dtype=np.float64)[order]
    weights = np.exp((scores - scores[0]) / temperature)
    result: dict[str, dict[str, float]] = {}
    for name in fields:
        votes: dict[str, float] = {}
        for index, weight in zip(order, weights, strict=True):
            value = neighbour_labels[index].get(name, "")
            if value:
                votes[value] = votes.get(value, 0.0) + float(weight)
        total = sum(votes.values())
        result[name] = {v: w / total for v, w in sorted(votes.items(), key=lambda x: -x[1])}
    return result


@dataclass
class Candidate:
    """A product from the vector search: its similarity, labels, colour descriptor and whatever
    the caller wants back (e.g. the store's Hit)."""

    id: str
    visual: float
    labels: Mapping[str, str]
    colour: np.ndarray | None = None
    item: Any = None


@dataclass
class QuerySignals:
    """What is known of the query photo: its colour descriptor and inferred attributes."""

    colour: np.ndarray | None
    attributes: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Weights:
    """Weights of the signals in the re-ranking score. Visual and colour similarity order the
    products within an inferred (type, colour) class; the class probabilities, worth up to 1
    each, decide which class comes first."""

    visual: float = 1.0
    colour: float = 0.5
    article_type: float = 1.0
    colour_label: float = 1.0


def colour_scores(colour: np.ndarray | None, candidates: Sequence[Candidate]) -> np.ndarray:
    """`colour_similarity` of the query to every candidate, in one matrix product."""
    scores = np.zeros(len(candidates))
    present = [i for i, c in enumerate(candidates) if c.colour is not None]
    if colour is not None and present:
        matrix = np.stack([candidates[i].colour for i in present]).astype(np.float64)
        scores[present] = np.clip(matrix @ colour, 0.0, 1.0)
    return scores


def query_signals(
    candidates: Sequence[Candidate], colour: np.ndarray | None, k: int = 10,
    temperature: float = 0.05,
) -> QuerySignals:
    """Infer the query's article type from the candidates nearest by image vector and its
    colour from the candidates nearest by colour descriptor (the caller has left the query's
    own product and copies of its photo out of the candidates)."""
    labels = [c.labels for c in candidates]
    attributes = infer_attributes(labels, [c.visual for c in candidates], ("article_type",),
                                  k, temperature)
    if colour is not None:
        attributes.update(infer_attributes(labels, colour_scores(colour, candidates),
                                           ("colour",), k, temperature))
    return QuerySignals(colour, attributes)


def signal_matrix(candidates: Sequence[Candidate], query: QuerySignals) -> np.ndarray:
    """One row per candidate: visual, colour, article_type, colour_label (the Weights order)."""
    types = query.attributes.get("article_type", {})
    colours = query.attributes.get("colour", {})
    matrix = np.zeros((len(candidates), 4))
    matrix[:, 0] = [c.visual for c in candidates]
    matrix[:, 1] = colour_scores(query.colour, candidates)
    matrix[:, 2] = [types.get(c.labels.get("article_type", ""), 0.0) for c in candidates]
    matrix[:, 3] = [colours.get(c.labels.get("colour", ""), 0.0) for c in candidates]
    return matrix


SIGNALS = ("visual", "colour", "article_type", "colour_label")


def rerank(
    candidates: Sequence[Candidate], query: QuerySignals, weights: Weights = Weights(),
) -> list[tuple[Candidate, dict[str, float]]]:
    """Candidates best first, each with its per-signal scores and their weighted `score`
    (for `explain=true`). Ties keep the search order."""
    signals = signal_matrix(candidates, query)
    totals = signals @ np.array([getattr(weights, s) for s in SIGNALS])
    order = np.argsort(-totals, kind="stable")
    return [(candidates[i], {**dict(zip(SIGNALS, map(float, signals[i]), strict=True)),
                             "score": float(totals[i])}) for i in order]


# -- text queries ---------------------------------------------------------------------------
TEXT_FIELDS = ("colour", "article_type", "gender", "usage", "season", "subcategory", "category")
# Plain-English words that name a catalogue value differently (looked up after the catalogue's
# own values; a target the catalogue does not have is ignored).
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {"navy": ("Navy Blue",), "gray": ("Grey",), "offwhite": ("Off White",),
               "golden": ("Gold",), "violet": ("Purple",), "crimson": ("Red",)},
    "gender": {"man": ("Men",), "mens": ("Men",), "male": ("Men",), "gent": ("Men",),
               "woman": ("Women",), "womens": ("Women",), "female": ("Women",),
               "lady": ("Women",), "ladies": ("Women",), "boy": ("Boys",), "girl": ("Girls",),
               "kid": ("Boys", "Girls"), "children": ("Boys", "Girls")},
    "usage": {"sport": ("Sports",), "sporty": ("Sports",), "office": ("Formal",)},
    "article_type": {"tee": ("Tshirts",), "t shirt": ("Tshirts",), "tee shirt": ("Tshirts",)},
}
IGNORED_VALUES = {"na", "n/a", "none", "other", "others", "unknown"}  # not attribute words
FILLER = {"for", "and", "with", "in", "the", "a", "an", "of", "s"}
_TOKEN = re.compile(r"[a-z0-9]+")


def singular(word: str) -> str:
    """Crude English singular of a lower-case word (shoes->shoe, watches->watch, tops->top)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us")):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    """Lower-case words; hyphens and apostrophes inside a word join it (t-shirt -> tshirt)."""
    return _TOKEN.findall(re.sub(r"(?<=\w)[-'’](?=\w)", "", text.lower()))


def _tokens(text: str) -> list[str]:
    """The words, singular: what phrases are matched on."""
    return [singular(w) for w in _words(text)]


@dataclass
class ParsedQuery:
    """Attribute values recognised in a text query, and the words left over."""

    filters: dict[str, list[str]]
    matched: list[tuple[str, str]]  # (words in the query, field)
    remaining: str


class AttributeVocabulary:
    """Phrases of the catalogue's attribute values (e.g. from `GET /attributes` counts) mapped
    to (field, values); build once per catalogue refresh, `parse` per query."""

    def __init__(self, vocabulary: Mapping[str, Iterable[str]]) -> None:
        self.phrases: dict[tuple[str, ...], dict[str, set[str]]] = {}
        self.heads: dict[str, dict[str, set[str]]] = {}
        for name in TEXT_FIELDS:
            values = [str(v) for v in vocabulary.get(name, ())
                      if str(v).strip() and str(v).strip().lower() not in IGNORED_VALUES]
            for value in values:
                words = tuple(_tokens(value))
                if words:
                    self._add(self.phrases, words, name, value)
                    if name == "article_type" and len(words) > 1:
                        self._add(self.heads, words[-1], name, value)  # "shoes"
            known = set(values)
            for word, targets in SYNONYMS.get(name, {}).items():
                for target in (t for t in targets if t in known):
                    self._add(self.phrases, tuple(_tokens(word)), name, target)
        self.longest = max((len(p) for p in self.phrases), default=1)

    @staticmethod
    def _add(table: dict, key: Any, name: str, value: str) -> None:
        table.setdefault(key, {}).setdefault(name, set()).add(value)

    def _field_of(self, options: dict[str, set[str]], found: dict[str, list[str]]) -> str | None:
        """The first field (in TEXT_FIELDS order) this phrase can fill that is still free;
        a type word fills subcategory / category only when no article type was named."""
        for name in TEXT_FIELDS:
            if name in options and name not in found:
                return name
        return None

    def parse(self, text: str) -> ParsedQuery:
        """Longest phrases first, left to right; a word that matches nothing stays in
        `remaining`. A bare head word ("shoes") means every type ending in it."""
        raw = _words(text)
        words = [singular(w) for w in raw]
        found: dict[str, list[str]] = {}
        matched: list[tuple[str, str]] = []
        rest: list[str] = []
        i = 0
        while i < len(words):
            for size in range(min(self.longest, len(words) - i), 0, -1):
                options = self.phrases.get(tuple(words[i: i + size]))
                if size == 1 and options is None:
                    options = self.heads.get(words[i])
                name = self._field_of(options, found) if options else None
                if name is not None:
                    found[name] = sorted(options[name])
                    matched.append((" ".join(raw[i: i + size]), name))
                    i += size
                    break
            else:
                rest.append(raw[i])
                i += 1
        self._drop_redundant(found)
        remaining = " ".join(w for w in rest if w not in FILLER)
        return ParsedQuery(found, matched, remaining)

    @staticmethod
    def _drop_redundant(found: dict[str, list[str]]) -> None:
        """An article type says more than a subcategory or category: keep only the finest."""
        if "article_type" in found:
            found.pop("subcategory", None)
            found.pop("category", None)
        elif "subcategory" in found:
            found.pop("category", None)


def parse_query_attributes(
    text: str, vocabulary: Mapping[str, Iterable[str]] | AttributeVocabulary,
) -> ParsedQuery:
    """Attribute filters named in a text query ("black casual shoes for men" -> colour Black,
    article_type Casual Shoes, gender Men) and the words left over."""
    if not isinstance(vocabulary, AttributeVocabulary):
        vocabulary = AttributeVocabulary(vocabulary)
    return vocabulary.parse(text)


def attribute_match(labels: Mapping[str, str], filters: Mapping[str, Sequence[str]]) -> float:
    """Share of the recognised fields a product matches (1.0 when none were recognised)."""
    if not filters:
        return 1.0
    return sum(labels.get(name, "") in values for name, values in filters.items()) / len(filters)
