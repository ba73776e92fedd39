"""What fitted heads (deployments.core.heads) buy, measured on a split of a labelled catalogue.

Split protocol (by photo group, so no photo is on both sides; seeded):

    catalogue  70% of the products: the shop's catalogue, with its labels;
      titled     half of it: the only products the heads are fitted on (their own validation
                 split held out inside the fit, figures in the artifact);
      untitled   the other half: treated as indexed without title or labels (text/attributes
                 come from pixels only);
    queries    30%: shoppers' photos, not in the catalogue.

  (a) photo queries -> catalogue: P@10 same article type / colour / both, for raw vectors, the
      default ranking (neighbour votes) and the ranking with the heads' predictions beside the
      votes (Searcher.by_image with heads);
  (b) text -> photo over the untitled products, from pixels only: "{colour} {article type}" and
      "{article type}" queries; P@10 matching (denominator min(10, matching products)); as
      served (Searcher.by_text with the heads on an embedded Milvus Lite store of the catalogue,
      filtered to the untitled products) and, for reference, the projection's cosine alone and
      the projection with the heads' predicted attributes as log-probability evidence over every
      untitled product (learned.words_photo_scores over all of them: the scoring the service
      applies to the products its 100-deep lists find);
  (c) attribute prediction accuracy of the untitled products per field (chance: the most common
      value of the titled part);
  plus the time to fit the whole catalogue.

    python -m benchmarks.heads_quality [--dataset DIR | --demo] [--seed 0] [--no-fit-time]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import DATASET, OUT
from benchmarks.quality import LABELS, embed_catalogue, embed_texts, load_catalogue, nearest


def split(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (titled catalogue, untitled catalogue, queries) by photo group."""
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    unique = unique[rng.permutation(len(unique))]
    cut1, cut2 = int(len(unique) * 0.35), int(len(unique) * 0.70)
    side = {g: (0 if i < cut1 else 1 if i < cut2 else 2) for i, g in enumerate(unique)}
    sides = np.array([side[g] for g in groups])
    return tuple(np.flatnonzero(sides == s) for s in range(3))


def fit(catalogue, vectors: dict, members: np.ndarray):
    """Heads fitted on `members` only (their labels and text vectors; label sentences embedded
    by the configured text encoder, and the validation split drawn by photo group, as
    `batch_index fit` does)."""
    from deployments.core.heads_fit import FitOptions, fit_heads

    options = FitOptions()
    labels = {f: [getattr(catalogue.products[i], f) for i in members] for f in options.fields}
    return fit_heads(vectors["image"][members], vectors["text"][members],
                     vectors["colour"][members], labels, np.ones(len(members), bool),
                     "benchmark", "benchmark", options, embed_texts,
                     groups=catalogue.groups[members].tolist())


def photo_report(catalogue, vectors: dict, heads, members: np.ndarray, queries: np.ndarray,
                 pool: int = 200) -> dict:
    """(a) P@10 of photo queries from outside the catalogue, three ways."""
    from deployments.core.learned import mix_attributes
    from deployments.core.ranking import SIGNALS, Candidate, Weights, query_signals, signal_matrix
    from deployments.core.settings import load_settings

    prediction_weight = load_settings().heads.prediction_weight

    labels = [{f: getattr(catalogue.products[m], f) for f in LABELS} for m in members]
    found, scores = nearest(vectors["image"][queries], vectors["image"][members], pool,
                            lambda rows: np.zeros((len(rows), len(members)), bool))
    predicted = heads.predict(vectors["image"][queries], vectors["colour"][queries])
    weights = np.array([getattr(Weights(), s) for s in SIGNALS])
    methods = {"raw vectors": [], "ranking (votes)": [], "ranking (votes + heads)": []}
    for q, (row, sims) in enumerate(zip(found, scores, strict=True)):
        candidates = [Candidate(str(j), float(s), labels[j], vectors["colour"][members[j]])
                      for j, s in zip(row, sims, strict=True)]
        query = query_signals(candidates, vectors["colour"][queries[q]])
        methods["raw vectors"].append(row[:10])
        methods["ranking (votes)"].append(row[np.argsort(
            -(signal_matrix(candidates, query) @ weights), kind="stable")[:10]])
        query.attributes = mix_attributes(query.attributes, predicted[q], prediction_weight)
        methods["ranking (votes + heads)"].append(row[np.argsort(
            -(signal_matrix(candidates, query) @ weights), kind="stable")[:10]])
    report = {"queries": int(len(queries)), "catalogue": int(len(members))}
    for name, ranked in methods.items():
        figures = {}
        for field in ("article_type", "colour", "both"):
            hits = []
            for q, top in zip(queries, ranked, strict=True):
                want = [labels[j] for j in top]
                mine = catalogue.products[q]
                hits.append(np.mean([all(w[f] == getattr(mine, f) for f in LABELS)
                                     if field == "both" else w[field] == getattr(mine, field)
                                     for w in want]))
            figures[f"{field}@10"] = round(float(np.mean(hits)), 4)
        report[name] = figures
    return report


def served_store(catalogue, vectors: dict, heads, titled: np.ndarray, untitled: np.ndarray,
                 folder: Path):
    """A Searcher over an embedded Milvus Lite store holding the catalogue as the service would:
    titled products with their titles and labels, untitled ones with neither (title = id, as a
    shop's file name), each product's attribute `split` saying which; written through the
    service's write path with the heads in use, so each carries its projected photo and
    predicted attributes."""
    from deployments.core.media import MediaStore
    from deployments.core.products import Product
    from deployments.core.searcher import Searcher
    from deployments.core.settings import MilvusSettings
    from deployments.core.store import ProductStore

    # The service's index settings; a generous read timeout (this measures quality; the
    # latency of each search is reported beside it).
    store = ProductStore(MilvusSettings(uri=str(folder / "milvus.db"), collection="bench",
                                        read_timeout_s=60))
    searcher = Searcher(store, MediaStore(folder / "media"))
    searcher.start(vectors["image"].shape[1], vectors["text"].shape[1])
    searcher.heads = heads
    members = np.concatenate([titled, untitled])
    names = [f"p{i}" for i in untitled]
    is_titled = set(titled.tolist())
    text = vectors["text"].copy()
    text[untitled] = embed_texts(names)  # what the service embeds for an untitled product
    for start in range(0, len(members), 500):
        batch = members[start: start + 500]
        products = [catalogue.products[i].model_copy(update={
                        "id": f"p{i}", "attributes": {"split": "titled"}}) if i in is_titled
                    else Product(id=f"p{i}", title=f"p{i}", attributes={"split": "untitled"})
                    for i in batch]
        searcher.upsert(products, [f"photo {i}".encode() for i in batch],
                        vectors["image"][batch], text[batch], vectors["colour"][batch])
    searcher.flush()
    searcher.vocabulary.refresh()
    return searcher


def text_report(catalogue, vectors: dict, heads, titled: np.ndarray, untitled: np.ndarray,
                min_support: int = 3) -> dict:
    """(b) words -> untitled photos, from pixels only. "served": exactly what the service
    runs (Searcher.by_text with the heads: titles and stored projected photos searched
    together by Milvus hybrid search, attribute words weighed by labels or, for products
    without, by the heads' probabilities; learned.rank_words_and_photos), on an embedded Milvus
    Lite store of the whole catalogue, each query filtered to the untitled products;
    "projection": the projected photos ranked by cosine alone, without narrowing (a reference);
    "projection + predicted attributes": learned.words_photo_scores over every untitled
    product (what the served lists approximate)."""
    from benchmarks.quality_metrics import match_all_at_k
    from deployments.core.filters import Filters
    from deployments.core.learned import words_photo_scores
    from deployments.core.settings import load_settings

    weight = load_settings().heads.evidence_weight
    probs = heads.probabilities(vectors["image"][untitled], vectors["colour"][untitled])
    records = {int(i): {f: getattr(catalogue.products[i], f) for f in LABELS} for i in untitled}
    projected = heads.project(vectors["image"][untitled])
    report = {"products": int(len(untitled))}
    with tempfile.TemporaryDirectory(prefix="heads-quality-") as folder:
        searcher = served_store(catalogue, vectors, heads, titled, untitled, Path(folder))
        only_untitled = Filters(attributes={"split": ["untitled"]})
        try:
            for template in (("colour", "article_type"), ("article_type",)):
                counts = Counter(tuple(records[int(i)][f] for f in template) for i in untitled)
                combos = sorted(c for c, n in counts.items() if n >= min_support and all(c))
                texts = [" ".join(v.lower() for v in c) for c in combos]
                if not texts:
                    continue
                queries = embed_texts(texts)
                served, took = [], []
                for q, t in zip(queries, texts, strict=True):
                    start = time.perf_counter()
                    hits = searcher.by_text(q, t, 10, only_untitled)
                    took.append((time.perf_counter() - start) * 1000)
                    served.append([int(h.product.id[1:]) for h in hits])
                similarity = queries @ projected.T
                exact = [[int(untitled[j]) for j in np.argsort(-row)[:10]] for row in similarity]
                with_evidence = [
                    [int(untitled[j]) for j in np.argsort(-words_photo_scores(row, [
                        _probability(heads, probs, f, v)
                        for f, v in zip(template, combo, strict=True)], weight))[:10]]
                    for combo, row in zip(combos, similarity, strict=True)]
                figures = {}
                for name, tops in (("served", served), ("projection", exact),
                                   ("projection + predicted attributes", with_evidence)):
                    figures[name] = round(float(np.mean([
                        match_all_at_k(top, records, dict(zip(template, combo, strict=True)),
                                       10, counts[combo])
                        for combo, top in zip(combos, tops, strict=True)])), 4)
                key = "{" + "} {".join(template) + "}"
                report[key] = {"queries": len(texts), "P@10": figures,
                               "served_ms_p50": round(float(np.median(took)), 1)}
        finally:
            searcher.store.close()
    return report


def _probability(heads, probs: dict, field: str, value: str) -> np.ndarray:
    """(n,) predicted probability of `value` for `field` (0 where the heads do not know it)."""
    labels = heads.attributes[field].labels if field in heads.attributes else []
    if value not in labels:
        return np.zeros(len(next(iter(probs.values()))))
    return probs[field][:, labels.index(value)]


def attribute_report(catalogue, vectors: dict, heads, titled: np.ndarray,
                     untitled: np.ndarray) -> dict:
    """(c) predicted attributes of the untitled products against their hidden labels."""
    probs = heads.probabilities(vectors["image"][untitled], vectors["colour"][untitled])
    report = {}
    for field, p in probs.items():
        labels = heads.attributes[field].labels
        truth = np.array([getattr(catalogue.products[i], field) for i in untitled])
        known = truth != ""
        guess = np.array(labels)[p.argmax(axis=1)]
        common = Counter(getattr(catalogue.products[i], field) for i in titled).most_common(1)
        report[field] = {"accuracy": round(float(np.mean(guess[known] == truth[known])), 4),
                         "chance": round(float(np.mean(truth[known] == common[0][0])), 4),
                         "classes": len(labels)}
    return report


def fit_time(catalogue, vectors: dict) -> dict:
    """Seconds to fit heads on the whole catalogue (every product with its text)."""
    start, cpu = time.perf_counter(), time.process_time()
    heads = fit(catalogue, vectors, np.arange(len(catalogue.products)))
    return {"products": len(catalogue.products), "fit_s": round(time.perf_counter() - start, 1),
            # CPU seconds of this process (2 threads): wall time depends on what else runs.
            "fit_cpu_s": round(time.process_time() - cpu, 1),
            "load_average": round(os.getloadavg()[0], 1),
            "validation": heads.validation}


def run(dataset: Path, seed: int, fit_whole: bool = True) -> dict:
    """The whole report for one labelled catalogue folder."""
    catalogue = load_catalogue(dataset)
    vectors = embed_catalogue(catalogue)
    titled, untitled, queries = split(catalogue.groups, seed)
    heads = fit(catalogue, vectors, titled)
    members = np.concatenate([titled, untitled])
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "dataset": str(dataset),
            "products": len(catalogue.products), "seed": seed,
            "split": {"titled": len(titled), "untitled": len(untitled), "queries": len(queries)},
            "heads_validation": heads.validation,
            "photo": photo_report(catalogue, vectors, heads, members, queries),
            "text": text_report(catalogue, vectors, heads, titled, untitled),
            "attributes": attribute_report(catalogue, vectors, heads, titled, untitled),
            "fit_whole_catalogue": fit_time(catalogue, vectors) if fit_whole else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--demo", action="store_true", help="the 240-product demo catalogue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fit-time", action="store_true",
                        help="skip timing the fit of the whole catalogue")
    args = parser.parse_args()
    if args.demo:
        from deployments.core.demo import generate_demo_catalog

        folder = Path(tempfile.mkdtemp(prefix="demo-"))
        generate_demo_catalog(folder, n=240)
        args.dataset = folder
    if not (args.dataset / "products.csv").exists():
        print(f"skipped: {args.dataset / 'products.csv'} not found")
        return
    report = run(args.dataset, args.seed, not args.no_fit_time)
    print(json.dumps({k: v for k, v in report.items() if k != "heads_validation"}, indent=2))
    OUT.mkdir(exist_ok=True)
    name = f"heads_quality{'_demo' if args.demo else ''}_seed{args.seed}.json"
    (OUT / name).write_text(json.dumps(report, indent=2))
    print(f"\nwritten {OUT / name}")


if __name__ == "__main__":
    main()
