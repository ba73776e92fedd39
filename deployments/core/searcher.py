"""Search logic over one catalogue: the store plus ranking, text-query parsing, duplicate handling,
the attribute vocabulary and flush batching. Ray-free: the ProductSearch deployment wraps one
`Searcher`, and unit tests drive it with a small store.

Every method is synchronous and may block on Milvus; callers in an event loop run it in a thread.
Errors: `NotFound` for unknown ids, `InvalidInput` for bad filters, `BackendUnavailable` when
Milvus fails (from the store).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.core.colour import LAYOUT_SIDE, grey_layout, layout_similarity
from deployments.core.encoders import ImageFeatures
from deployments.core.errors import InvalidInput, NotFound
from deployments.core.filters import Filters
from deployments.core.heads import Heads
from deployments.core.images import decode_image
from deployments.core.learned import mix_attributes, rank_words_and_photos, with_known_labels
from deployments.core.media import MediaStore
from deployments.core.products import PREDICTED_FIELDS, STRING_FIELDS, Product
from deployments.core.query import AttributeVocabulary, attribute_evidence, text_score
from deployments.core.ranking import Candidate, Weights, query_signals, rerank
from deployments.core.settings import HeadSettings, RankingSettings
from deployments.core.store import (
    Hit,
    ProductStore,
    VectorField,
    filter_expression,
    literal,
    recognised_expression,
)
from deployments.core.writes import write_products

log = logging.getLogger(__name__)
FLUSH_EVERY_ROWS = 1000  # Milvus Lite searches unflushed rows by brute force (store.flush)
MAX_VALUES = 1000  # values per field kept in the vocabulary (most common first)
GREY_CANDIDATES = 50  # a photo without colour: candidates whose stored photos are compared in grey


@dataclass(frozen=True)
class VocabularySnapshot:
    """The catalogue's attribute values at one moment: counts per field of the shop's own values
    (typed fields and JSON attributes) and, apart, of the fitted heads' stored predictions
    (PREDICTED_FIELDS field -> value -> count); the text-query parser and each field's
    lower-cased value -> catalogue spelling (for filters), both built from the shop's own
    values only: a value only ever predicted is no attribute word and no spelling of the
    shop's fields; `predicted_spelling` (for `predicted.<field>` filters) adds the predicted
    values, so `predicted.colour=mauve` finds a "Mauve" no product is labelled with."""

    counts: dict[str, dict[str, int]]
    parser: AttributeVocabulary
    spelling: dict[str, dict[str, str]]
    predicted: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    predicted_spelling: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, counts: dict[str, dict[str, int]],
           predicted: dict[str, dict[str, int]] | None = None) -> VocabularySnapshot:
        """Build from value counts: the shop's own (`counts`) and the predicted ones."""
        predicted = predicted or {}
        spelling = {name: _spelling(values) for name, values in counts.items()}
        guessed = {name: {**spelling.get(name, {}), **_spelling(predicted.get(name, {}))}
                   for name in {*spelling, *predicted}}
        return cls(counts, AttributeVocabulary(counts), spelling, predicted, guessed)


def _spelling(values: dict[str, int]) -> dict[str, str]:
    """Lower-cased value -> the catalogue's spelling."""
    return {str(v).lower(): v for v in values if isinstance(v, str)}


class Vocabulary:
    """Attribute values of the catalogue, kept current without scanning on a request: a full
    scan at start and in `refresh` (the deployment runs it in the background after writes), and
    new values (labels and predictions) added at once on every write so a just-written colour
    is searchable and listed."""

    def __init__(self, store: ProductStore) -> None:
        self.store = store
        self.stale = False
        self._lock = threading.Lock()
        self.snapshot = VocabularySnapshot.of({})

    def refresh(self) -> None:
        """Recount every value, own and predicted, with one scan of the collection."""
        with self._lock:
            self.stale = False
        found = self.store.attribute_counts(MAX_VALUES)
        self.snapshot = VocabularySnapshot.of(found.own, found.predicted)

    def add(self, products: Sequence[Product]) -> None:
        """Count the values of written products now; exact counts follow on `refresh`."""
        with self._lock:
            counts = _copy(self.snapshot.counts)
            predicted = _copy(self.snapshot.predicted)
            for product in products:
                for name, value in _values(product):
                    _count(counts, name, value)
                for name, prediction in product.predicted.items():
                    if prediction.value:
                        _count(predicted, name, prediction.value)
            self.snapshot = VocabularySnapshot.of(counts, predicted)
            self.stale = True

    def mark_stale(self) -> None:
        """Products were removed, or their predictions rewritten: counts are due a refresh."""
        self.stale = True


def _copy(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {name: dict(values) for name, values in counts.items()}


def _count(counts: dict[str, dict[str, Any]], name: str, value: Any) -> None:
    field = counts.setdefault(name, {})
    field[value] = field.get(value, 0) + 1


def _values(product: Product) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [(f, getattr(product, f)) for f in STRING_FIELDS
                                    if getattr(product, f)]
    pairs += [(k, v) for k, v in product.attributes.items()
              if isinstance(v, str | int | float | bool)]
    return pairs


class Searcher:
    """Vector search, re-ranking and product CRUD over one store and photo store."""

    def __init__(self, store: ProductStore, media: MediaStore,
                 ranking: RankingSettings | None = None) -> None:
        self.store = store
        self.media = media
        self.ranking = ranking or RankingSettings()
        self.weights = Weights(colour=self.ranking.colour_weight,
                               article_type=self.ranking.article_type_weight,
                               colour_label=self.ranking.colour_label_weight)
        self.vocabulary = Vocabulary(store)
        # Fitted heads (deployments.core.heads) in use, or None: search as without them.
        # Replaced whole by the deployment when a new fit appears; each search reads it once.
        self.heads: Heads | None = None
        # How heads weigh in ranking (HeadSettings: prediction_weight, evidence_weight,
        # words_candidates); the deployment sets the configured ones.
        self.head_settings = HeadSettings()
        self._unflushed = 0
        self._flush_lock = threading.Lock()

    def start(self, image_dim: int, text_dim: int) -> None:
        """Open (or create) the collection for these vector dims, seal rows an earlier run left
        unflushed, and read the vocabulary once."""
        self.store.ensure_collection(image_dim, text_dim)
        self.store.flush()
        self.vocabulary.refresh()

    # -- searches ------------------------------------------------------------------------
    def nearest(self, field: VectorField, vector: np.ndarray, k: int,
                filters: Filters | None = None, exclude_ids: Sequence[str] = (),
                extra_filter: str = "") -> list[Hit]:
        """Top-k products by raw cosine of the `field` vector ((dim,) float32, L2-normalised),
        best first, within the filters."""
        return self.store.search(vector, field, k, self.expression(filters, extra_filter),
                                 exclude_ids)

    def by_image(self, features: ImageFeatures, k: int, filters: Filters | None = None,
                 exclude_ids: Sequence[str] = (), extra_filter: str = "",
                 explain: bool = False, known: Product | None = None) -> list[Hit]:
        """Products that look like a photo: the nearest `ranking.candidates` by image vector,
        re-ranked by colour similarity and the article type and colour inferred from them (a
        photo without colour information, e.g. a greyscale file, votes on type only). The
        labels of a catalogue product are used instead when they are known: `known` ("more
        like this") or the product whose stored photo the query photo is (`same_photo`)."""
        if not self.ranking.enabled:
            return self.nearest("image", features.vector, k, filters, exclude_ids, extra_filter)
        heads = self.heads
        # The pool carries only what re-ranking reads; the k kept are read in full (store.py).
        pool = self.store.search_pool(features.vector, "image",
                                      max(k, self.ranking.candidates),
                                      self.expression(filters, extra_filter), exclude_ids)
        known = known or self.same_photo(pool)
        prior = None
        weight = self.head_settings.prediction_weight
        if heads is not None and heads.attributes and weight > 0:
            colour = features.colour if features.colour is not None else np.zeros(
                heads.colour_dim, np.float32)
            prior = (with_known_labels(heads.predict(features.vector[None], colour[None])[0],
                                       known), weight)
        labels = _labels(known) if known is not None else None
        if features.has_colour:
            ranked = rerank_hits(pool, features.colour, k, self.weights, explain, prior=prior,
                                 known=labels)
        else:
            ranked = rerank_hits(pool, None, k, self.weights, explain,
                                 self.grey_appearance(pool, features.layout), prior, labels)
        return _stamp(self.store.complete(ranked), heads)

    def same_photo(self, pool: Sequence[Hit]) -> Product | None:
        """The stored product whose photo the query photo is (the nearest, when its image
        cosine is at least `ranking.same_photo_similarity`), or None."""
        if pool and pool[0].score >= self.ranking.same_photo_similarity:
            return pool[0].product
        return None

    def grey_appearance(self, pool: Sequence[Hit], layout: np.ndarray | None) -> np.ndarray:
        """For a query photo without colour: how alike each of the GREY_CANDIDATES nearest
        candidates' stored photos looks to it in grey (colour.layout_similarity; 0 for the
        rest), read from the photo store (JPEGs decoded at reduced size)."""
        scores = np.zeros(len(pool))
        if layout is None:
            return scores
        for i, hit in enumerate(pool[:GREY_CANDIDATES]):
            try:
                data, _ = self.media.get(hit.product.image_ref)
                photo = decode_image(data, draft=(4 * LAYOUT_SIDE, 4 * LAYOUT_SIDE))
            except (NotFound, InvalidInput):
                continue
            scores[i] = layout_similarity(layout, grey_layout(photo))
        return scores

    def by_text(self, vector: np.ndarray, text: str, k: int, filters: Filters | None = None,
                explain: bool = False) -> list[Hit]:
        """Products that match a description (`vector`: its (dim,) float32 text embedding).
        Attribute words of the catalogue's own vocabulary ("black", "casual shoes", "men")
        become filters unless the shopper set that field; if they leave fewer than k products,
        the rest come from the search without them. With fitted heads (an alignment head),
        titles and stored projected photos are searched together (`by_words_and_photos`)."""
        heads = self.heads
        if heads is not None and heads.projection is not None:
            return _stamp(self.by_words_and_photos(vector, text, k, heads, filters, explain),
                          heads)
        return self._by_text(vector, text, k, filters, explain)

    def by_words_and_photos(self, vector: np.ndarray, text: str, k: int, heads: Heads,
                            filters: Filters | None = None, explain: bool = False) -> list[Hit]:
        """With fitted heads: titles and projected photos searched together (one Milvus hybrid
        search, each list max(k, heads.words_candidates) deep), so an untitled product is found
        by its pixels. Attribute words the query names leave out products labelled otherwise
        and, of a field the heads do not predict, unlabelled ones whose stored prediction is
        not a named value (topped up with them when fewer than k remain); a product without a
        label of a field the heads predict counts the probability its photo shows a named
        value (the heads' full prediction from its stored vectors, not only its stored most
        likely value).
        learned.rank_words_and_photos orders the result. `heads`: the fit read once by the
        caller, so a fit loaded mid-search cannot score with one version and stamp another."""
        filters = filters or Filters()
        recognised = self.recognised(text, filters)
        depth = max(k, self.head_settings.words_candidates)
        # Any product without a label may show a value of a field the heads weigh
        # (named_probabilities); of any other field, only one whose stored prediction names it.
        weighed = {f: v for f, v in recognised.items() if f in heads.attributes}
        rest = {f: v for f, v in recognised.items() if f not in weighed}
        narrowed = self.expression(filters, " and ".join(c for c in (
            recognised_expression(weighed, predicted=False), recognised_expression(rest)) if c))
        # Ranking reads only the named fields; the k kept are read in full (`complete`).
        fields = list(recognised)
        hits = self.store.text_and_photo_search(vector, k, narrowed, depth, fields=fields)
        if recognised and len(hits) < k:  # top up from the search without the named values
            seen = tuple(h.product.id for h in hits)
            hits += self.store.text_and_photo_search(vector, k - len(hits),
                                                     self.expression(filters), depth, seen,
                                                     fields=fields)
        ranked = rank_words_and_photos(hits, recognised, k, explain,
                                       self.named_probabilities(hits, recognised, heads),
                                       self.head_settings.evidence_weight)
        return self.store.complete(ranked)

    def named_probabilities(self, hits: Sequence[Hit], recognised: dict[str, list[str]],
                            heads: Heads | None) -> list[dict[str, dict[str, float]]] | None:
        """Per hit lacking a label of some recognised field the heads predict, for each such
        field {value: probability} (every value of the head) from its stored image vector and
        colour descriptor (read only for those products); {} for any other hit (labelled, or
        deleted since the search); None without heads or named fields they predict."""
        fields = [f for f in recognised if heads is not None and f in heads.attributes]
        if not fields:
            return None
        unlabelled = [h.product.id for h in hits
                      if any(not getattr(h.product, f) for f in fields)]
        features = self.store.image_features(unlabelled)
        ids = [i for i in unlabelled if i in features]
        if not ids:
            return [{} for _ in hits]
        probs = heads.probabilities(np.stack([features[i][0] for i in ids]),
                                    np.stack([features[i][1] for i in ids]), fields)
        row = {product_id: j for j, product_id in enumerate(ids)}
        return [{f: dict(zip(heads.attributes[f].labels, map(float, probs[f][row[h.product.id]]),
                             strict=True)) for f in fields} if h.product.id in row else {}
                for h in hits]

    def _by_text(self, vector: np.ndarray, text: str, k: int, filters: Filters | None = None,
                 explain: bool = False) -> list[Hit]:
        filters = filters or Filters()
        extra = self.recognised(text, filters)
        if not extra:  # ranked by the text cosine: that is the score
            return _explain_text(self.nearest("text", vector, k, filters), {}, explain)
        hits = self.nearest("text", vector, k, filters.model_copy(update=extra))
        if len(hits) < k:  # top up from the search without the recognised words
            seen = tuple(h.product.id for h in hits)
            hits += self.nearest("text", vector, k - len(hits), filters, seen)
        return _explain_text(hits, extra, explain)

    def recognised(self, text: str, filters: Filters) -> dict[str, list[str]]:
        """Attribute values of the catalogue's vocabulary named in `text`, for the fields the
        shopper did not filter by themselves (field -> values)."""
        parsed = (self.vocabulary.snapshot.parser.parse(text)
                  if self.ranking.text_attributes else None)
        return {f: v for f, v in (parsed.filters if parsed else {}).items()
                if not getattr(filters, f)}

    def hybrid(self, features: ImageFeatures, text_vector: np.ndarray, k: int,
               filters: Filters | None = None, ranker: str = "rrf",
               image_weight: float = 0.5, explain: bool = False) -> list[Hit]:
        """Top-k products by photo and text similarity fused by Milvus hybrid search (RRF or
        weighted): the one fusion of photo + description, for the API and the page. `score` is
        the fused score the list is ordered by; with `explain`, the `visual` and `text` cosines
        beside it. Each list is max(k, ranking.hybrid_depth) deep: fusing much deeper lists
        lets products middling at both outrank the best match of either (on the demo
        catalogue, at depth 50 a photo's own product left the top 12 for "dress"), while k = 5
        deep leaves too few products found by both for "black dress" (tests/test_service.py)."""
        hits = self.store.hybrid_search(features.vector, text_vector, k,
                                        self.expression(filters), ranker, image_weight,
                                        candidates=max(k, self.ranking.hybrid_depth),
                                        similarities=explain)
        for hit in hits if explain else ():
            hit.signals = {**(hit.signals or {}), "score": hit.score, "fused_by": ranker}
        return hits

    def similar(self, product_id: str, k: int, filters: Filters | None = None,
                explain: bool = False) -> list[Hit]:
        """Products that look like a stored one (its stored vectors, no re-embedding); itself
        and copies of its photo (same image hash) left out."""
        product = self.get(product_id)
        vectors = self.store.get_vectors(product_id)
        if vectors is None:
            raise NotFound(f"no product with id {product_id!r}")
        duplicates = f"image_hash != {literal(product.image_hash)}" if product.image_hash else ""
        colour = vectors["colour"] if vectors["colour"].any() else None
        return self.by_image(ImageFeatures(vectors["image"], colour), k, filters,
                             (product_id,), duplicates, explain, product)

    def expression(self, filters: Filters | None, extra: str = "") -> str:
        """The Milvus filter for `filters` (values in the catalogue's spelling, escaped) and an
        extra clause of our own."""
        clauses = [extra] if extra else []
        if filters is not None and not filters.is_empty():
            snapshot = self.vocabulary.snapshot
            clauses.append(filter_expression(filters, snapshot.spelling,
                                             snapshot.predicted_spelling))
        return " and ".join(f"({c})" for c in clauses)

    # -- catalogue -----------------------------------------------------------------------
    def attributes(self) -> dict[str, dict[str, int]]:
        """Each filter's values with counts (at the last vocabulary refresh the MAX_VALUES
        most common per field, plus values written since), keyed by the name a query string
        filters by: every typed field (STRING_FIELDS, even when empty) by its name, JSON
        attributes as `attr.<name>`, then the fitted heads' stored predictions as
        `predicted.<field>` (PREDICTED_FIELDS order), only fields some product has a
        prediction for (unlike typed fields, an empty one is left out)."""
        snapshot = self.vocabulary.snapshot
        counts, predicted = snapshot.counts, snapshot.predicted
        return {**{name: counts.get(name, {}) for name in STRING_FIELDS},
                **{f"attr.{name}": values for name, values in counts.items()
                   if name not in STRING_FIELDS},
                **{f"predicted.{name}": predicted[name] for name in PREDICTED_FIELDS
                   if predicted.get(name)}}

    def get(self, product_id: str) -> Product:
        """One product; NotFound if absent."""
        found = self.store.get([product_id])
        if not found:
            raise NotFound(f"no product with id {product_id!r}")
        return found[0]

    def browse(self, limit: int, offset: int) -> tuple[list[Product], int]:
        """A page of products (storage order) and the catalogue size."""
        return self.store.list(limit, offset), self.store.count()

    def image(self, product_id: str) -> tuple[bytes, str]:
        """The stored photo of a product and its MIME type; NotFound if absent."""
        return self.media.get(self.get(product_id).image_ref)

    def upsert(self, products: Sequence[Product], images: Sequence[bytes],
               image_vectors: np.ndarray, text_vectors: np.ndarray,
               colour_vectors: np.ndarray | None = None) -> list[Product]:
        """Insert-or-replace products by id with their photos and vectors ((n, dim) float32,
        L2-normalised; colour (n, COLOUR_DIMS) float32). Seals the segment every
        FLUSH_EVERY_ROWS rows. With heads in use, each also gets its projected photo and
        predicted attributes. Returns the products as stored."""
        stored = write_products(self.store, self.media, products, images, image_vectors,
                                text_vectors, colour_vectors, heads=self.heads)
        self.vocabulary.add(stored)
        with self._flush_lock:
            self._unflushed += len(stored)
            due = self._unflushed >= FLUSH_EVERY_ROWS
        if due:
            self.flush()
        return stored

    def flush(self) -> None:
        """Seal written rows into indexed segments (bulk writers call this when done)."""
        with self._flush_lock:
            self._unflushed = 0
        self.store.flush()

    def delete(self, product_id: str) -> None:
        """Delete one product; NotFound if absent."""
        if not self.store.delete([product_id]):
            raise NotFound(f"no product with id {product_id!r}")
        self.vocabulary.mark_stale()


def _explain_text(hits: list[Hit], recognised: dict[str, list[str]],
                  explain: bool) -> list[Hit]:
    """Text hits scored and ordered by `query.text_score` (the text cosine and the evidence of
    the values the query named; the cosine alone when it named none), best first; with
    `explain`, `text` (the cosine), `recognised` (the named values a product's own labels
    match), `evidence` per field and `score`."""
    scored = []
    for hit in hits:
        evidence = attribute_evidence(hit.product.model_dump(include=set(recognised)),
                                      recognised)
        score = text_score(hit.score, evidence) if recognised else hit.score
        signals = None
        if explain:
            signals = {"text": hit.score, "recognised": {
                f: v for f, v in recognised.items() if getattr(hit.product, f) in v},
                "evidence": evidence, "score": score}
        scored.append(dataclasses.replace(hit, score=score, signals=signals))
    return sorted(scored, key=lambda h: -h.score)


def _stamp(hits: list[Hit], heads: Heads | None) -> list[Hit]:
    """Mark hits with the heads artifact that ranked them."""
    if heads is not None:
        for hit in hits:
            hit.heads_version = heads.version
    return hits


def _labels(product: Product) -> dict[str, str]:
    """The labels re-ranking votes on, as a product of the catalogue carries them."""
    return {"article_type": product.article_type, "colour": product.colour}


def rerank_hits(pool: list[Hit], colour: np.ndarray | None, k: int, weights: Weights,
                explain: bool, appearance: np.ndarray | None = None,
                prior: tuple[dict[str, dict[str, float]], float] | None = None,
                known: dict[str, str] | None = None) -> list[Hit]:
    """The k best of a pool of vector hits by the ranking signals (deployments.core.ranking).
    Each hit's `score` is the score the list is ordered by: the weighted signals over the sum
    of the weights (0..1, descending down the list); with `explain`, the per-signal scores
    (`visual`: the image cosine, `colour`, `article_type`, `colour_label`: the attribute
    evidence). `appearance` (a query photo without colour): per hit, its grey likeness, in
    colour's place. `prior` (fitted heads): the query's predicted attributes and their weight
    beside the neighbour votes. `known`: the query is a catalogue product's photo ("more like
    this", or a copy of its photo): its own labels replace what would be inferred."""
    candidates = [Candidate(h.product.id, h.score, _labels(h.product), h.colour, h)
                  for h in pool]
    query = query_signals(candidates, colour)
    query.appearance = appearance
    if prior is not None:  # the query photo's predicted attributes beside the neighbour votes
        query.attributes = mix_attributes(query.attributes, *prior)
    query.attributes.update({f: {v: 1.0} for f, v in (known or {}).items() if v})
    hits = []
    total = sum(weights.__dict__.values()) or 1.0
    for candidate, signals in rerank(candidates, query, weights, k):
        score = min(signals["score"] / total, 1.0)  # a cosine may round above 1
        hit = Hit(candidate.item.product, score)
        if explain:
            hit.signals = {**signals, "score": score, "inferred": {
                field: max(probs, key=probs.get) for field, probs in query.attributes.items()
                if probs}}
            if prior is not None:
                hit.signals["predicted"] = {f: next(iter(p.items())) for f, p in prior[0].items()
                                            if f in ("article_type", "colour")}
            if known:
                hit.signals["known_labels"] = dict(known)
            if appearance is not None:  # the photo has no colour: `colour` is grey likeness
                hit.signals["photo_has_colour"] = False
        hits.append(hit)
    return hits
