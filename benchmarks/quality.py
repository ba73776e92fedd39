"""Search quality on a labelled catalogue folder (fashion-dev by default), raw vectors vs ranking.

Embeds the catalogue once with the project's own encoders (vectors cached under benchmarks/out/,
keyed by model and file list), then reports, for each method side by side:

  (a) photo queries, leave-one-out (the query's own id and every copy of its photo left out of
      the results and of any label inference): P@1 and P@10 for same article type, same colour,
      and both;
  (b) text queries built from attribute combinations ("black casual shoes for men") that exist at
      least `--min-support` times: share of the top 10 matching every named attribute;
  (c) ANN recall@10 of the configured index against exact (FLAT) search, on a temporary
      Milvus Lite collection through deployments.core.store.ProductStore.

    .venv/bin/python -m benchmarks.quality [--dataset DIR] [--skip-ann]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import DATASET, OUT, CatalogueEmbedder, read_catalogue

LABELS = ("article_type", "colour")


@dataclass
class Catalogue:
    """A labelled catalogue: products, photo paths and duplicate-photo groups."""

    products: list  # list[Product]
    paths: list[str]
    groups: np.ndarray  # int group per product: products sharing a photo share a group

    def labels(self, field: str) -> np.ndarray:
        """One attribute of every product, as an array of strings."""
        return np.array([getattr(p, field) for p in self.products], dtype=object)


def load_catalogue(dataset: Path) -> Catalogue:
    """Read `products.csv` with the project's reader; group identical photos by content hash
    (and by a `dup_group` column where the catalogue has one)."""
    products, paths = read_catalogue(dataset / "products.csv")
    keys: dict[str, int] = {}
    groups = np.zeros(len(products), dtype=np.int64)
    for i, (product, path) in enumerate(zip(products, paths, strict=True)):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        names = [f"sha:{digest}"]
        if product.attributes.get("dup_group"):
            names.append(f"dup:{product.attributes['dup_group']}")
        group = next((keys[n] for n in names if n in keys), i)
        for name in names:
            keys.setdefault(name, group)
        groups[i] = group
    return Catalogue(products, paths, groups)


def _cache_key(settings, catalogue: Catalogue) -> str:
    """Hash of the models and the file list (names, sizes, product texts)."""
    digest = hashlib.sha256()
    digest.update(settings.image_model.model_dump_json(exclude={"device", "cache_dir"}).encode())
    digest.update(settings.text_model.model_dump_json(exclude={"device"}).encode())
    for product, path in zip(catalogue.products, catalogue.paths, strict=True):
        line = f"{product.id}\t{Path(path).name}\t{os.path.getsize(path)}\t"
        digest.update((line + product.embedding_text() + "\n").encode())
    return digest.hexdigest()[:16]


def embed_catalogue(catalogue: Catalogue, batch: int = 32) -> dict[str, np.ndarray]:
    """Image vectors, text vectors and colour descriptors of every product, computed with the
    configured encoders (benchmarks.common.CatalogueEmbedder), cached in benchmarks/out/."""
    from deployments.core import colour as ranking_colour
    from deployments.core.settings import load_settings

    settings = load_settings()
    key = _cache_key(settings, catalogue)
    vectors_path = OUT / f"vectors-{key}.npz"
    colours_path = OUT / f"colours-{key}-{ranking_colour.COLOUR_VERSION}.npy"
    result: dict[str, np.ndarray] = {}
    if vectors_path.exists():
        with np.load(vectors_path) as cached:
            result.update(cached)
    if colours_path.exists():
        result["colour"] = np.load(colours_path)
    if len(result) == 3:
        print(f"vectors: cached ({vectors_path.name}, {colours_path.name})")
        return result
    start = time.perf_counter()
    need_vectors = "image" not in result
    embedder = CatalogueEmbedder(settings, threads=2, vectors=need_vectors)
    embedded = embedder.embed_files(catalogue.products, catalogue.paths, batch)
    OUT.mkdir(exist_ok=True)
    result["colour"] = embedded.colour
    np.save(colours_path, result["colour"])
    if need_vectors:
        result.update(image=embedded.image, text=embedded.text)
        np.savez(vectors_path, image=result["image"], text=result["text"])
    print(f"vectors: computed for {len(catalogue.paths)} products in "
          f"{time.perf_counter() - start:.0f} s")
    return result


# -- (a) photo queries ------------------------------------------------------------------------
def nearest(queries: np.ndarray, matrix: np.ndarray, k: int, banned) -> tuple:
    """Exact top-k rows of `matrix` by dot product for each query row; `banned(rows)` gives a
    boolean (len(rows), len(matrix)) mask of results to leave out. Returns (indices, scores)."""
    k = min(k, len(matrix))
    found, scores = [], []
    for start in range(0, len(queries), 512):
        block = queries[start: start + 512] @ matrix.T
        block[banned(np.arange(start, start + len(block)))] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(block, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        found.append(np.take_along_axis(top, order, 1))
        scores.append(np.take_along_axis(top_scores, order, 1))
    return np.concatenate(found), np.concatenate(scores)


@dataclass
class PhotoRun:
    """Per query of one catalogue (a set of members): its candidate pool (catalogue indices,
    search order) and their re-ranking signals, so any weights can be scored quickly."""

    queries: np.ndarray
    candidates: np.ndarray  # (queries, pool) product indices
    signals: np.ndarray  # (queries, pool, 4) in ranking.SIGNALS order


def photo_run(catalogue: Catalogue, vectors: dict, members: np.ndarray, pool: int) -> PhotoRun:
    """Leave-one-out photo queries within `members`: each member's photo searches the others,
    its own id and every copy of its photo (same group) left out of results and of the votes."""
    from deployments.core.ranking import Candidate, query_signals, signal_matrix

    image, colour = vectors["image"][members], vectors["colour"][members]
    groups = catalogue.groups[members]
    labels = [{f: getattr(catalogue.products[m], f) for f in LABELS} for m in members]
    pool = min(pool, len(members) - np.unique(groups, return_counts=True)[1].max())
    local, scores = nearest(image, image, pool,
                            lambda rows: groups[rows][:, None] == groups[None, :])
    signals = np.zeros((len(members), local.shape[1], 4))
    for q in range(len(members)):
        candidates = [Candidate(str(j), float(s), labels[j], colour[j])
                      for j, s in zip(local[q], scores[q], strict=True)]
        signals[q] = signal_matrix(candidates, query_signals(candidates, colour[q]))
    return PhotoRun(members, members[local], signals)


def photo_scores(catalogue: Catalogue, run: PhotoRun, weights) -> dict[str, float]:
    """P@1 and P@10 (same article type, same colour, both) of the runs ranked by `weights`."""
    from benchmarks.quality_metrics import mean, precision_at_k
    from deployments.core.ranking import SIGNALS

    w = np.array([getattr(weights, s) for s in SIGNALS])
    order = np.argsort(-(run.signals @ w), axis=1, kind="stable")[:, :10]
    ranked = np.take_along_axis(run.candidates, order, 1)
    types, colours = catalogue.labels("article_type"), catalogue.labels("colour")
    both = {i: (types[i], colours[i]) for i in range(len(types))}
    fields = {"type": dict(enumerate(types)), "colour": dict(enumerate(colours)), "both": both}
    result = {}
    for name, labels in fields.items():
        for k in (1, 10):
            result[f"{name}@{k}"] = mean([precision_at_k(list(r), labels, labels[q], k)
                                          for q, r in zip(run.queries, ranked, strict=True)])
    return result


def weight_grid():
    """The few weight settings tried on one half (visual similarity fixed at 1)."""
    from deployments.core.ranking import Weights

    for colour in (0.0, 0.25, 0.5, 1.0):
        for article_type in (0.0, 0.5, 1.0, 2.0):
            for colour_label in (0.0, 0.5, 1.0, 2.0):
                yield Weights(1.0, colour, article_type, colour_label)


def objective(scores: dict[str, float]) -> float:
    """What a weight setting is chosen by: the mean of the three P@10."""
    return (scores["type@10"] + scores["colour@10"] + scores["both@10"]) / 3


def photo_report(catalogue: Catalogue, vectors: dict, pool: int, seed: int) -> dict:
    """Raw vs ranked on the whole catalogue (with ablations), then a 50/50 split by photo group:
    weights chosen on one half are scored on the other half, each half its own catalogue."""
    from dataclasses import asdict

    from deployments.core.ranking import Weights

    methods = {"raw vectors": Weights(1.0, 0.0, 0.0, 0.0),
               "+ colour similarity only": Weights(1.0, 0.5, 0.0, 0.0),
               "+ type/colour votes only": Weights(1.0, 0.0, 1.0, 1.0),
               "ranking (default)": Weights()}
    start = time.perf_counter()
    full = photo_run(catalogue, vectors, np.arange(len(catalogue.products)), pool)
    report = {"pool": pool, "queries": len(full.queries),
              "full": {name: photo_scores(catalogue, full, w) for name, w in methods.items()}}
    report["signals_s_per_query"] = (time.perf_counter() - start) / len(full.queries)
    rng = np.random.default_rng(seed)
    unique = np.unique(catalogue.groups)
    half_a = set(unique[rng.permutation(len(unique))[: len(unique) // 2]].tolist())
    in_a = np.array([g in half_a for g in catalogue.groups])
    runs = {"A": photo_run(catalogue, vectors, np.flatnonzero(in_a), pool),
            "B": photo_run(catalogue, vectors, np.flatnonzero(~in_a), pool)}
    best = {h: max(weight_grid(), key=lambda w, h=h: objective(photo_scores(catalogue, runs[h], w)))
            for h in runs}
    report["halves"] = {}
    for half, other in (("A", "B"), ("B", "A")):
        report["halves"][half] = {
            "queries": len(runs[half].queries),
            "raw vectors": photo_scores(catalogue, runs[half], methods["raw vectors"]),
            "ranking (default)": photo_scores(catalogue, runs[half], Weights()),
            f"ranking (weights chosen on {other})": photo_scores(catalogue, runs[half],
                                                                  best[other]),
            f"weights chosen on {other}": asdict(best[other]),
        }
    return report


# -- (b) text queries -------------------------------------------------------------------------
GENDER_PHRASES = {"Men": "men", "Women": "women", "Boys": "boys", "Girls": "girls",
                  "Unisex": "unisex"}
TEMPLATES = (("colour", "article_type"), ("article_type", "gender"),
             ("colour", "article_type", "gender"), ("colour", "usage", "article_type", "gender"))


def phrase(wanted: dict[str, str], possessive: bool = False) -> str:
    """A shopper's wording of an attribute combination, in the catalogue's own words: "black
    casual shoes for men", or with `possessive` "men's black casual shoes"."""
    words = " ".join(wanted[f].lower() for f in ("colour", "usage", "article_type")
                     if f in wanted)
    gender = GENDER_PHRASES.get(wanted.get("gender", ""), "")
    if not gender:
        return words
    if gender == "unisex":
        return f"unisex {words}"
    owner = f"{gender}'" if gender.endswith("s") else f"{gender}'s"
    return f"{owner} {words}" if possessive else f"{words} for {gender}"


def text_queries(catalogue: Catalogue, min_support: int, per_template: int, seed: int) -> list:
    """(text, wanted attributes, how many products match) for attribute combinations that
    exist at least `min_support` times, at most `per_template` per template (seeded sample)."""
    from collections import Counter

    from deployments.core.query import IGNORED_VALUES

    rng = np.random.default_rng(seed)
    queries = []
    for fields in TEMPLATES:
        counts = Counter(tuple(getattr(p, f) for f in fields) for p in catalogue.products)
        combos = sorted(c for c, n in counts.items() if n >= min_support and all(
            v and v.lower() not in IGNORED_VALUES for v in c))
        if "usage" in fields:  # "casual casual shoes" says nothing new
            combos = [c for c in combos if c[1].lower() not in c[2].lower()]
        picked = rng.permutation(len(combos))[:per_template]
        for i in sorted(picked):
            wanted = dict(zip(fields, combos[i], strict=True))
            text = phrase(wanted, possessive=len(queries) % 2 == 1)
            queries.append((text, wanted, counts[combos[i]]))
    return queries


def embed_texts(texts: list[str]) -> np.ndarray:
    """Query vectors from the configured text encoder (cached by text list and model)."""
    from deployments.core.encoders import TextEncoder
    from deployments.core.settings import load_settings

    settings = load_settings()
    digest = hashlib.sha256(settings.text_model.model_dump_json(exclude={"device"}).encode())
    digest.update("\n".join(texts).encode())
    path = OUT / f"text-queries-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    vectors = TextEncoder(settings.text_model, num_threads=2).embed(texts)
    OUT.mkdir(exist_ok=True)
    np.save(path, vectors)
    return vectors


def text_report(catalogue: Catalogue, vectors: dict, args: argparse.Namespace) -> dict:
    """Share of the top 10 matching every named attribute: raw text vectors, recognised
    attributes as filters (relaxed when fewer than 10 match), and as boosts."""
    from collections import Counter

    from benchmarks.quality_metrics import match_all_at_k, mean
    from deployments.core.query import TEXT_FIELDS, AttributeVocabulary, attribute_match

    queries = text_queries(catalogue, args.min_support, args.text_queries, args.seed)
    if not queries:
        return {"queries": 0}
    records = {i: p.model_dump() for i, p in enumerate(catalogue.products)}
    columns = {f: catalogue.labels(f) for f in TEXT_FIELDS}
    vocabulary = AttributeVocabulary({f: Counter(columns[f]) for f in TEXT_FIELDS})
    query_vectors = embed_texts([q[0] for q in queries])
    scores = query_vectors @ vectors["text"].T
    results: dict[str, list[float]] = {"raw vectors": [], "attributes as filters": [],
                                       "attributes as boosts": []}
    exact_parse = []
    start = time.perf_counter()
    for (text, wanted, support), row in zip(queries, scores, strict=True):
        parsed = vocabulary.parse(text)
        exact_parse.append(parsed.filters == {f: [v] for f, v in wanted.items()})
        match = np.ones(len(row), dtype=bool)
        for name, values in parsed.filters.items():
            match &= np.isin(columns[name], values)
        order = np.argsort(-row, kind="stable")
        # Filters, relaxed: the matching products first, then the rest in vector order.
        filtered = np.concatenate([order[match[order]], order[~match[order]]])
        # Boosts: the vector search's pool, + 1 for matching every recognised attribute.
        pool = order[: args.candidates]
        share = np.array([attribute_match(records[i], parsed.filters) for i in pool])
        boosted = pool[np.argsort(-(row[pool] + share), kind="stable")]
        for name, ranked in (("raw vectors", order), ("attributes as filters", filtered),
                             ("attributes as boosts", boosted)):
            results[name].append(match_all_at_k(ranked[:10].tolist(), records, wanted, 10,
                                                support))
    by_template: dict[str, dict[str, float]] = {}
    for fields in TEMPLATES:
        rows = [i for i, q in enumerate(queries) if tuple(q[1]) == fields]
        by_template["+".join(fields)] = {name: mean([v[i] for i in rows])
                                         for name, v in results.items()}
    return {"queries": len(queries), "min_support": args.min_support,
            "examples": [q[0] for q in queries[:: max(1, len(queries) // 8)]],
            "parsed_exactly": mean([float(x) for x in exact_parse]),
            "match_all@10": {name: mean(v) for name, v in results.items()},
            "by_template": by_template,
            "ranking_s_per_query": (time.perf_counter() - start) / len(queries)}


# -- (c) ANN recall ---------------------------------------------------------------------------
def _search_many(store, vectors: np.ndarray, field: str, k: int) -> list[list[str]]:
    """Top-k ids per query vector, in one batched call (ProductStore.search_batch, with the
    store's own search parameters)."""
    return [[h.product.id for h in row] for row in store.search_batch(vectors, field, k)]


def _filled_store(settings, catalogue: Catalogue, vectors: dict):
    """A ProductStore collection holding the catalogue's vectors, flushed so that Milvus seals
    the rows and builds the index on them (until then it searches growing segments
    exhaustively, whatever the index)."""
    from deployments.core.store import ProductStore

    store = ProductStore(settings)
    store.ensure_collection(vectors["image"].shape[1], vectors["text"].shape[1])
    for i in range(0, len(catalogue.products), 1000):
        store.upsert(catalogue.products[i: i + 1000], vectors["image"][i: i + 1000],
                     vectors["text"][i: i + 1000])
    store.flush()
    return store


def ann_report(catalogue: Catalogue, vectors: dict, text_vectors: np.ndarray, n: int,
               seed: int, settle_s: float = 60.0) -> dict:
    """Recall@10 of the configured index (HNSW_SQ by default) against FLAT on the same vectors,
    each in a collection of a temporary Milvus Lite database filled through ProductStore.upsert.
    Photo queries are catalogue photos (their own id dropped); text queries are (b)'s.

    Milvus swaps the exhaustively searched growing segments for the indexed sealed ones a few
    seconds after the flush, and says nothing when. So a deliberately weak HNSW (M=4, ef=10),
    filled last, is measured until its recall drops below 1: from then on the figures come from
    the indexes (`index_in_use` says whether that happened within `settle_s`)."""
    from benchmarks.quality_metrics import mean, recall_at_k
    from deployments.core.settings import load_settings

    configured = load_settings().milvus
    work = Path(tempfile.mkdtemp(prefix="quality-ann-"))
    common = {"uri": str(work / "milvus.db"), "consistency_level": "Strong", "timeout_s": 120}
    if "read_timeout_s" in type(configured).model_fields:
        common["read_timeout_s"] = 120
    indexes = {
        "exact": {"collection": "exact", "index_type": "FLAT", "index_params": {},
                  "search_params": {}},
        "configured": {"collection": "configured"},
        "control": {"collection": "control", "index_type": "HNSW",
                    "index_params": {"M": 4, "efConstruction": 8}, "search_params": {"ef": 10}},
    }
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.permutation(len(catalogue.products))[:n])
    ids = [catalogue.products[i].id for i in picked]
    start = time.perf_counter()
    stores = {name: _filled_store(configured.model_copy(update={**common, **update}),
                                  catalogue, vectors) for name, update in indexes.items()}

    def search(name: str) -> dict[str, list[list[str]]]:
        photo = _search_many(stores[name], vectors["image"][picked], "image", 11)
        return {"image": [[h for h in row if h != own][:10]
                          for row, own in zip(photo, ids, strict=True)],
                "text": _search_many(stores[name], text_vectors, "text", 10)
                if len(text_vectors) else []}

    def recall(found: dict, field: str) -> float:
        pairs = zip(found[field], exact[field], strict=True)
        return mean([recall_at_k(a, e, 10) for a, e in pairs])

    exact = search("exact")
    if len(catalogue.products) < 1024:  # Milvus leaves segments this small unindexed
        settle_s = 0.0
    settle = time.monotonic() + settle_s
    while recall(control := search("control"), "image") >= 1.0 and time.monotonic() < settle:
        time.sleep(2)
    found = {"configured": search("configured"), "control": control}
    one = [h.product.id for h in stores["configured"].search(
        vectors["image"][picked[0]], "image", 10, exclude_ids=(ids[0],))]
    assert one == found["configured"]["image"][0], "batched and single searches differ"
    for store in stores.values():
        store.close()
    shutil.rmtree(work, ignore_errors=True)
    result = {"index": configured.index_type, "index_params": configured.index_params,
              "search_params": configured.search_params, "rows": len(catalogue.products),
              "index_in_use": recall(control, "image") < 1.0,
              "wall_s": time.perf_counter() - start}
    for name in ("configured", "control"):
        for field in ("image", "text"):
            if exact[field]:
                result[f"{name} recall@10 {field}"] = recall(found[name], field)
                result[f"{field} queries"] = len(exact[field])
    return result


# -- report -----------------------------------------------------------------------------------
def print_report(report: dict) -> None:
    """The figures as small tables."""
    photo = report["photo"]
    head = f"{'':<38}{'type@1':>8}{'col@1':>8}{'both@1':>8}{'type@10':>9}{'col@10':>8}" \
           f"{'both@10':>9}"

    def line(name: str, s: dict) -> str:
        return (f"{name:<38}{s['type@1']:>8.3f}{s['colour@1']:>8.3f}{s['both@1']:>8.3f}"
                f"{s['type@10']:>9.3f}{s['colour@10']:>8.3f}{s['both@10']:>9.3f}")

    print(f"\n(a) photo queries, leave-one-out, {photo['queries']} queries, pool "
          f"{photo['pool']}\n{head}")
    for name, s in photo["full"].items():
        print(line(name, s))
    for half, rows in photo["halves"].items():
        print(f"half {half} ({rows['queries']} products, its own catalogue)")
        for name, s in rows.items():
            if name.startswith("weights"):
                print(f"  {name}: {s}")
            elif isinstance(s, dict):
                print(line("  " + name, s))
    text = report["text"]
    if text.get("queries"):
        print(f"\n(b) text queries: {text['queries']} attribute combinations (>= "
              f"{text['min_support']} products each), parsed exactly: "
              f"{text['parsed_exactly']:.3f}")
        names = list(text["match_all@10"])
        print(f"{'match every named attribute, top 10':<38}" + "".join(f"{n:>24}" for n in names))
        print(f"{'all':<38}" + "".join(f"{text['match_all@10'][n]:>24.3f}" for n in names))
        for template, s in text["by_template"].items():
            print(f"{'  ' + template:<38}" + "".join(f"{s[n]:>24.3f}" for n in names))
    if "ann" in report:
        a = report["ann"]
        print(f"\n(c) ANN recall@10 vs FLAT, {a['rows']} rows, "
              f"{a.get('image queries', 0)} photo / {a.get('text queries', 0)} text queries")
        for name, label in (("configured", f"{a['index']} {a['index_params']} "
                                           f"{a['search_params']}"),
                            ("control", "control: HNSW M=4 efConstruction=8 ef=10")):
            figures = "   ".join(f"{f} {a[f'{name} recall@10 {f}']:.3f}"
                                 for f in ("image", "text") if f"{name} recall@10 {f}" in a)
            print(f"  {label:<60}{figures}")
        if not a["index_in_use"]:
            print("  WARNING: the control index never lost recall: Milvus may still have been "
                  "searching unindexed segments (always so below 1024 rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--candidates", type=int, default=200, help="re-ranking pool")
    parser.add_argument("--min-support", type=int, default=3)
    parser.add_argument("--text-queries", type=int, default=200, help="per template")
    parser.add_argument("--ann-queries", type=int, default=500)
    parser.add_argument("--skip-ann", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.dataset / "products.csv").exists():
        print(f"skipped: {args.dataset / 'products.csv'} not found")
        return
    catalogue = load_catalogue(args.dataset)
    vectors = embed_catalogue(catalogue)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dataset": str(args.dataset),
              "products": len(catalogue.products)}
    report["photo"] = photo_report(catalogue, vectors, args.candidates, args.seed)
    report["text"] = text_report(catalogue, vectors, args)
    if not args.skip_ann:
        queries = text_queries(catalogue, args.min_support, args.text_queries, args.seed)
        text_vectors = embed_texts([q[0] for q in queries]) if queries else np.zeros((0, 1))
        report["ann"] = ann_report(catalogue, vectors, text_vectors, args.ann_queries, args.seed)
    print_report(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "quality.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten {OUT / 'quality.json'}")


if __name__ == "__main__":
    main()
