"""How search latency, ANN recall and memory grow with catalogue size on the embedded store.

Vectors have the real dimensions and a realistic spread: real photo and text embeddings of a
catalogue (fashion-dev when present, else the demo catalogue) are the seeds, and larger sets are
made of seeds blended with a random other seed plus noise, then L2-normalised. Each size gets a
fresh Milvus Lite store with the configured index (configs/config.yaml), filled through
ProductStore.upsert; queries are held-out blends; recall@10 is against exact (numpy) search,
kept as a running top 10 per query while the batches are written, so the benchmark holds no
copy of the catalogue. Each size is built in its own process, one after the other; all stay up,
and their latencies are then timed in alternating rounds, so every size is measured under the
same load of this shared machine (a ratio of latencies measured minutes apart is not one).
Each round also times the same queries through Milvus Lite's gRPC server (the reads before
deployments.core.lite_reads), on the same engine, and, on the direct reads, filtered to one
category of four, excluding one product, and narrowed to a price band holding 0.5% of the
products, with its recall@10 against exact search among those (the searches that hand the
indexes a row mask).
Memory is the RSS of each size's process once built, which runs the embedded store: Python,
numpy, pymilvus, the Milvus Lite engine (segments' columns, vector indexes, memtable) and the
7,036 seed vectors; no encoder models are loaded.

    .venv/bin/python -m benchmarks.scale --sizes 10000,100000[,300000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import DATASET, OUT, CatalogueEmbedder, read_catalogue
from deployments.core import lite_search
from deployments.core.demo import generate_demo_catalog
from deployments.core.errors import BackendUnavailable
from deployments.core.filters import Filters
from deployments.core.memory import release_free_memory
from deployments.core.products import Product
from deployments.core.settings import load_settings
from deployments.core.store import ProductStore, filter_expression

# Products are spread over four categories; the filtered searches keep one (a quarter of them).
CATEGORIES = ("Apparel", "Footwear", "Accessories", "Personal Care")
ONE_CATEGORY = filter_expression(Filters(category=[CATEGORIES[0]]))
# Prices 0.00-199.99, each cent once per 20,000 products; the narrow filter keeps 0.5% of them.
NARROW = filter_expression(Filters(price_min=10.0, price_max=10.99))
VARIANTS = ("filtered", "excluding", "narrow", "filtered_engine", "excluding_engine",
            "narrow_engine")


def price(i: int) -> float:
    """Product i's price: (i x 7919) mod 20000 cents, a permutation of each 20,000 ids."""
    return (i * 7919) % 20000 / 100


def seed_vectors(limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Real image and text embeddings of up to `limit` catalogue products (cached)."""
    cache = OUT / f"scale-seeds-{limit}.npz"
    if cache.exists():
        data = np.load(cache)
        return data["image"], data["text"]
    if (DATASET / "products.csv").exists():
        products, paths = read_catalogue(DATASET / "products.csv")
    else:
        products, paths = read_catalogue(generate_demo_catalog(Path(tempfile.mkdtemp()), 240))
    embedded = CatalogueEmbedder(threads=2).embed_files(products[:limit], paths[:limit], 64)
    image, text = embedded.image, embedded.text
    OUT.mkdir(exist_ok=True)
    np.savez(cache, image=image, text=text)
    return image, text


def blend(seeds: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """n vectors near the seeds' manifold: a seed, a little of another seed, and noise."""
    a = rng.integers(0, len(seeds), n)
    b = rng.integers(0, len(seeds), n)
    w = rng.uniform(0.6, 1.0, (n, 1)).astype(np.float32)
    out = seeds[a] * w + seeds[b] * (1 - w)
    out += rng.normal(0, noise, out.shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def engine_segments() -> tuple[int, int]:
    """(segments, segments still without every vector index) of the embedded engine in this
    process. Milvus Lite builds indexes in a background thread after each flush and compaction
    and reports every row as indexed meanwhile, so this reads its internals (benchmark only)."""
    from milvus_lite.server_manager import server_manager_instance

    segments = waiting = 0
    for _, db, _ in list(server_manager_instance._servers.values()):
        for collection in list(db._collections.values()):
            fields = [spec.field_name for spec in collection._index_specs.values()]
            for segment in collection._segments_snapshot():
                segments += 1
                waiting += any(f not in segment.indexes for f in fields)
    return segments, waiting


def tree_rss_mb() -> float:
    """RSS of this process and its children (Milvus Lite may run as a child process), MB."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def running_top(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, first: int,
                k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Merge a batch's scores ((q, n) float32, rows first..first+n) into the best k so far
    ((q, k) scores, (q, k) int64 row numbers), highest first."""
    ids = np.broadcast_to(np.arange(first, first + scores.shape[1]), scores.shape)
    all_scores = np.concatenate([best[0], scores], axis=1)
    all_ids = np.concatenate([best[1], ids], axis=1)
    top = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, top, 1), np.take_along_axis(all_ids, top, 1)


def build(size: int, image_seeds: np.ndarray, text_seeds: np.ndarray, queries: int,
          batch: int = 5000, engine_search: bool = False
          ) -> tuple[ProductStore, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Fill a fresh store with `size` products and wait until every segment is indexed
    (`engine_search`: Milvus Lite's own per-row search path, for comparison). Returns the store,
    the (queries, 1280) probe vectors, their exact top 10 row numbers overall and among the
    products NARROW keeps, and the build figures."""
    rng = np.random.default_rng(size)
    settings = load_settings()
    # A long read timeout: this measures latency; during an index build searches take seconds.
    work = tempfile.mkdtemp(prefix="scale-")
    milvus = settings.milvus.model_copy(update={"uri": work + "/scale.db",
                                                "read_timeout_s": 60, "timeout_s": 600,
                                                "lite_search_cache": not engine_search})
    store = ProductStore(milvus)
    store.ensure_collection(image_seeds.shape[1], text_seeds.shape[1])
    probe = blend(image_seeds, queries, np.random.default_rng(size + 1))
    exact = (np.full((queries, 10), -np.inf, np.float32), np.zeros((queries, 10), np.int64))
    exact_narrow = exact
    start = time.perf_counter()
    for lo in range(0, size, batch):
        n = min(batch, size - lo)
        image = blend(image_seeds, n, rng)
        scores = probe @ image.T
        exact = running_top(exact, scores, lo)
        kept = np.array([10.0 <= price(lo + i) <= 10.99 for i in range(n)])
        exact_narrow = running_top(exact_narrow, np.where(kept, scores, -np.inf), lo)
        products = [Product(id=f"p{lo + i}", title=f"Product {lo + i}", price=price(lo + i),
                            category=CATEGORIES[(lo + i) % len(CATEGORIES)]) for i in range(n)]
        store.upsert(products, image, blend(text_seeds, n, rng))
    del image, scores
    store.flush()
    insert_s = time.perf_counter() - start
    start = time.perf_counter()
    seen = None
    while time.perf_counter() - start < 1800:  # until every segment is indexed and stays so
        t = time.perf_counter()
        try:
            store.search(probe[0], "image", 10)
        except BackendUnavailable:  # past the read timeout while Lite builds an index
            seen = None
            continue
        state = engine_segments()
        if time.perf_counter() - t < 0.2 and state == seen and state[1] == 0:
            break
        seen = state
        time.sleep(5)
    settle_s = time.perf_counter() - start
    rss = tree_rss_mb()
    release_ms = release_free_memory()  # what the search deployment does after writes
    figures = {"size": size, "insert_s": insert_s, "index_settle_s": settle_s,
               "process_rss_mb": rss, "segments": engine_segments()[0], "work": work,
               "rss_after_release_mb": tree_rss_mb(), "release_ms": release_ms}
    return store, probe, exact[1], exact_narrow[1], figures


def timed_queries(store: ProductStore, probe: np.ndarray,
                  truth: np.ndarray) -> tuple[list[float], float]:
    """Each probe searched once (top 10 by image vector): (latencies in ms, recall@10 against
    the exact top 10)."""
    latencies, recalls = [], []
    for q, exact in zip(probe, truth, strict=True):
        t = time.perf_counter()
        hits = store.search(q, "image", 10)
        latencies.append((time.perf_counter() - t) * 1000)
        recalls.append(len({int(h.product.id[1:]) for h in hits} & set(exact.tolist())) / 10)
    return latencies, float(np.mean(recalls))


def timed_variants(store: ProductStore, probe: np.ndarray, truth: np.ndarray,
                   narrow_truth: np.ndarray) -> dict[str, Any]:
    """Latencies (ms) of the probes searched with a filter (one category of four), with
    one product excluded (its exact nearest, as "more like this" excludes the product itself)
    and narrowed to NARROW's price band: each hands the segment indexes a mask of the rows
    allowed. Each is timed as shipped (`lite_search.index_search`: the mask as a bitmap, and
    a narrow one scanned) and, keys ending `_engine`, with the mask handed to the indexes as
    Milvus Lite's own search does (a set of row ids, always the graph walk). Also
    `narrow_recall` and `narrow_engine_recall`: recall@10 of the narrow searches against the
    exact top 10 among the products the band keeps (`narrow_truth`)."""
    shipped = lite_search.index_search

    def engine(index, queries, top_k, mask, params):
        return index.search(queries, top_k, valid_mask=mask, params=params)

    timings: dict[str, Any] = {}
    for suffix, index_search in (("", shipped), ("_engine", engine)):
        lite_search.index_search = index_search
        recalls = []
        try:
            for q, exact, narrow in zip(probe, truth, narrow_truth, strict=True):
                for name, kwargs in (("filtered", {"filter": ONE_CATEGORY}),
                                     ("excluding", {"exclude_ids": [f"p{int(exact[0])}"]}),
                                     ("narrow", {"filter": NARROW})):
                    t = time.perf_counter()
                    hits = store.search(q, "image", 10, **kwargs)
                    timings.setdefault(name + suffix, []).append(
                        (time.perf_counter() - t) * 1000)
                    if name == "narrow":
                        recalls.append(len({int(h.product.id[1:]) for h in hits}
                                           & set(narrow.tolist())) / 10)
        finally:
            lite_search.index_search = shipped
        timings[f"narrow{suffix}_recall"] = float(np.mean(recalls))
    return timings


def serve_size(size: int, image_seeds: np.ndarray, text_seeds: np.ndarray, queries: int,
               engine_search: bool) -> None:
    """A child process: build one size, print its figures, then answer "measure" lines on
    stdin with one round of timed queries each (so the parent can time every size side by
    side, alternating, once all are built) until "quit"."""
    store, probe, truth, narrow_truth, figures = build(size, image_seeds, text_seeds, queries,
                                                       engine_search=engine_search)
    print("BUILT " + json.dumps(figures), flush=True)
    # The same engine read through its gRPC server (as before deployments.core.lite_reads),
    # timed in the same rounds.
    grpc_store = ProductStore(store.settings.model_copy(update={"lite_direct_reads": False}))
    for line in sys.stdin:
        if line.strip() != "measure":
            break
        # Untimed: an idle gRPC channel to the embedded server may have been closed (its
        # keep-alive pings refused) and reconnects on the first call.
        store.search(probe[0], "image", 10)
        grpc_store.search(probe[0], "image", 10)
        latencies, recall = timed_queries(store, probe, truth)
        grpc_latencies, _ = timed_queries(grpc_store, probe, truth)
        print("ROUND " + json.dumps({"latencies": latencies, "recall": recall,
                                     "grpc_latencies": grpc_latencies,
                                     **timed_variants(store, probe, truth, narrow_truth)}),
              flush=True)
    store.close()
    shutil.rmtree(figures["work"], ignore_errors=True)


def _reply(child: subprocess.Popen, tag: str) -> dict:
    """The child's next line starting with `tag`, decoded (RuntimeError if it died)."""
    for line in child.stdout:
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise RuntimeError(f"scale child exited with {child.wait()} before {tag}")


def measure_side_by_side(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """Build each size in its own child process, one after the other, keep them all running,
    then time `args.rounds` rounds of queries alternating between the sizes: every size's
    latency is measured under the same machine load (this machine is shared)."""
    children = []
    try:
        for size in sizes:
            command = [sys.executable, "-m", "benchmarks.scale", "--one", str(size),
                       "--seeds", str(args.seeds), "--queries", str(args.queries)]
            # The environment the config gives the search replica, which runs the store.
            env = {**os.environ, **load_settings().search.env_vars}
            child = subprocess.Popen(
                command + (["--engine-search"] if args.engine_search else []),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            children.append(child)
            figures = _reply(child, "BUILT")
            print(f"{size:>8} vectors built: insert {figures['insert_s']:.0f} s, index settle "
                  f"{figures['index_settle_s']:.0f} s, RSS {figures['process_rss_mb']:.0f} MB "
                  f"({figures['rss_after_release_mb']:.0f} MB once freed memory is given back, "
                  f"{figures['release_ms']:.0f} ms), {figures['segments']} segments",
                  flush=True)
            child.figures, child.latencies, child.recalls = figures, [], []
            child.grpc_latencies, child.variants, child.narrow_recalls = [], {}, {}
        for _ in range(args.rounds):
            for child in children:
                child.stdin.write("measure\n")
                child.stdin.flush()
                round_ = _reply(child, "ROUND")
                child.latencies += round_["latencies"]
                child.grpc_latencies += round_["grpc_latencies"]
                for name in VARIANTS:
                    child.variants.setdefault(name, []).extend(round_[name])
                for name in ("narrow_recall", "narrow_engine_recall"):
                    child.narrow_recalls.setdefault(name, []).append(round_[name])
                child.recalls.append(round_["recall"])
    finally:
        for child in children:
            if child.poll() is None:
                child.stdin.write("quit\n")
                child.stdin.close()
                child.wait(timeout=120)
    return [{**{k: v for k, v in c.figures.items() if k != "work"},
             "p50_ms": float(np.percentile(c.latencies, 50)),
             "p99_ms": float(np.percentile(c.latencies, 99)),
             "grpc_p50_ms": float(np.percentile(c.grpc_latencies, 50)),
             **{f"{name}_p50_ms": float(np.percentile(c.variants[name], 50))
                for name in VARIANTS},
             **{name: float(np.mean(v)) for name, v in c.narrow_recalls.items()},
             "recall_at_10": float(np.mean(c.recalls))} for c in children]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seeds", type=int, default=7036, help="real products embedded")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--engine-search", action="store_true",
                        help="Milvus Lite's own per-row search path (lite_search_cache off)")
    parser.add_argument("--json", type=Path, default=OUT / "scale.json")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the queries per size, alternating between the sizes")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    image_seeds, text_seeds = seed_vectors(args.seeds)
    if args.one:  # a child process: Milvus Lite cannot reopen a store after closing one
        serve_size(args.one, image_seeds, text_seeds, args.queries, args.engine_search)
        return
    milvus = load_settings().milvus
    config = {"index_type": milvus.index_type, "index_params": milvus.index_params,
              "search_params": milvus.search_params,
              "lite_search_cache": milvus.lite_search_cache and not args.engine_search}
    print(f"seeds: {len(image_seeds)} real products; {config}")
    results = measure_side_by_side(args.sizes, args)
    for r in results:
        print(f"{r['size']:>8} vectors: search p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} "
              f"ms, recall@10 {r['recall_at_10']:.3f} ({args.rounds} rounds of "
              f"{args.queries} queries, alternating with the other sizes); through Milvus "
              f"Lite's gRPC server: p50 {r['grpc_p50_ms']:.1f} ms; filtered to one category "
              f"of four: p50 {r['filtered_p50_ms']:.1f} ms (masks as Lite hands them to its "
              f"indexes: {r['filtered_engine_p50_ms']:.1f} ms); excluding one product: p50 "
              f"{r['excluding_p50_ms']:.1f} ms ({r['excluding_engine_p50_ms']:.1f} ms); "
              f"narrowed to 0.5% by price: p50 {r['narrow_p50_ms']:.1f} ms, recall@10 "
              f"{r['narrow_recall']:.3f} ({r['narrow_engine_p50_ms']:.1f} ms, "
              f"{r['narrow_engine_recall']:.3f})", flush=True)
    growth = []
    for small, big in zip(results, results[1:], strict=False):
        added = big["size"] - small["size"]
        growth.append({"from": small["size"], "to": big["size"],
                       "p50_ratio": big["p50_ms"] / small["p50_ms"],
                       "grpc_p50_ratio": big["grpc_p50_ms"] / small["grpc_p50_ms"],
                       "filtered_p50_ratio": big["filtered_p50_ms"] / small["filtered_p50_ms"],
                       "excluding_p50_ratio": big["excluding_p50_ms"] / small["excluding_p50_ms"],
                       "narrow_p50_ratio": big["narrow_p50_ms"] / small["narrow_p50_ms"],
                       "rss_mb_per_100k": (big["process_rss_mb"] - small["process_rss_mb"])
                       / added * 100_000,
                       # what the search deployment holds once it has given freed memory back
                       "released_rss_mb_per_100k": (big["rss_after_release_mb"]
                                                    - small["rss_after_release_mb"])
                       / added * 100_000})
        g = growth[-1]
        print(f"x{big['size'] / small['size']:.0f} vectors: p50 x{g['p50_ratio']:.2f} (through "
              f"gRPC x{g['grpc_p50_ratio']:.2f}; filtered x{g['filtered_p50_ratio']:.2f}, "
              f"excluding one x{g['excluding_p50_ratio']:.2f}, narrow "
              f"x{g['narrow_p50_ratio']:.2f}), insert "
              f"x{big['insert_s'] / small['insert_s']:.1f}, memory "
              f"{g['rss_mb_per_100k'] / 1024:.2f} GB per 100k added products as built, "
              f"{g['released_rss_mb_per_100k'] / 1024:.2f} GB once freed memory is given back "
              "(as the search deployment does, milvus.release_memory_s)")
    if len(results) > 2:
        first, last = results[0], results[-1]
        print(f"{first['size']} -> {last['size']}: p50 x{last['p50_ms'] / first['p50_ms']:.2f}")
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "config": config,
                                     "rounds": args.rounds, "queries": args.queries,
                                     "results": results, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()
