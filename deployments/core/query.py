"""Text query parsing: attribute words of the catalogue's own vocabulary ("black casual shoes for
men") recognised in what a shopper typed, so the search can filter by them. Pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def attribute_evidence(labels: Mapping[str, str], filters: Mapping[str, Sequence[str]],
                       predicted: Mapping[str, tuple[str, float]] | None = None,
                       ) -> dict[str, float]:
    """Per recognised field, how much a product shows the value a query named, 0..1: 1 when
    its own label is one of the values; when it has no label of that field, the confidence of
    its stored predicted value (`predicted`: field -> (value, probability)) if that is one of
    them; else 0. A label of its own always wins over a prediction."""
    evidence = {}
    for name, values in filters.items():
        own = labels.get(name, "")
        value, confidence = (predicted or {}).get(name, ("", 0.0))
        if own:
            evidence[name] = 1.0 if own in values else 0.0
        else:
            evidence[name] = float(confidence) if value and value in values else 0.0
    return evidence


def text_score(similarity: float, evidence: Mapping[str, float]) -> float:
    """The score a text search ranks by, 0..1: the attribute evidence of each recognised field
    and the similarity (clipped to 0..1), averaged. A product matching every named value ranks
    above any matching fewer (on the same footing otherwise), then by similarity."""
    return (sum(evidence.values()) + min(max(similarity, 0.0), 1.0)) / (len(evidence) + 1)
