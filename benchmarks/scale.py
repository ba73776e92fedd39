"""How search latency, ANN recall and memory grow with catalogue size on the embedded store.

Vectors have the real dimensions and a realistic spread: real photo and text embeddings of a
catalogue (fashion-dev when present, else the demo catalogue) are the seeds, and larger sets are
made of seeds blended with a random other seed plus noise, then L2-normalised. Each size gets a
fresh Milvus Lite store with the configured index (configs/config.yaml), filled through
ProductStore.upsert; queries are held-out blends; recall@10 is against exact (numpy) search.

    .venv/bin/python -m benchmarks.scale --sizes 10000,100000[,300000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import DATASET, OUT, CatalogueEmbedder, read_catalogue
from deployments.core.demo import generate_demo_catalog
from deployments.core.products import Product
from deployments.core.settings import load_settings
from deployments.core.store import ProductStore


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


def measure(size: int, image_seeds: np.ndarray, text_seeds: np.ndarray, queries: int,
            batch: int = 5000) -> dict:
    """Fill a fresh store with `size` products and measure search latency and recall."""
    rng = np.random.default_rng(size)
    settings = load_settings()
    # A long read timeout: this measures latency; during an index build searches take seconds.
    milvus = settings.milvus.model_copy(update={"uri": tempfile.mkdtemp() + "/scale.db",
                                                "read_timeout_s": 60, "timeout_s": 600})
    store = ProductStore(milvus)
    store.ensure_collection(image_seeds.shape[1], text_seeds.shape[1])
    image = np.empty((size, image_seeds.shape[1]), np.float32)
    start = time.perf_counter()
    for lo in range(0, size, batch):
        n = min(batch, size - lo)
        image[lo:lo + n] = blend(image_seeds, n, rng)
        products = [Product(id=f"p{lo + i}", title=f"Product {lo + i}") for i in range(n)]
        store.upsert(products, image[lo:lo + n], blend(text_seeds, n, rng))
    store.flush()
    insert_s = time.perf_counter() - start
    probe = blend(image_seeds, queries, np.random.default_rng(size + 1))
    start = time.perf_counter()
    while time.perf_counter() - start < 900:  # wait for the background index build to settle
        t = time.perf_counter()
        store.search(probe[0], "image", 10)
        if time.perf_counter() - t < 0.2:
            break
        time.sleep(2)
    settle_s = time.perf_counter() - start
    latencies, recalls = [], []
    for q in probe:
        t = time.perf_counter()
        hits = store.search(q, "image", 10)
        latencies.append((time.perf_counter() - t) * 1000)
        exact = set(np.argpartition(-(image @ q), 10)[:10])
        recalls.append(len({int(h.product.id[1:]) for h in hits} & exact) / 10)
    me = psutil.Process()  # Milvus Lite may run as a child process: count the whole tree
    rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20
    store.close()
    return {"size": size, "insert_s": insert_s, "index_settle_s": settle_s,
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "recall_at_10": float(np.mean(recalls)), "process_rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seeds", type=int, default=7036, help="real products embedded")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    image_seeds, text_seeds = seed_vectors(args.seeds)
    if args.one:  # a child process: Milvus Lite cannot reopen a store after closing one
        print("RESULT " + json.dumps(measure(args.one, image_seeds, text_seeds, args.queries)))
        return
    settings = load_settings()
    print(f"seeds: {len(image_seeds)} real products; index {settings.milvus.index_type} "
          f"{settings.milvus.index_params} search {settings.milvus.search_params}")
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--one", str(size),
                              "--seeds", str(args.seeds), "--queries", str(args.queries)],
                             capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.split("RESULT ")[-1]))
        r = results[-1]
        print(f"{r['size']:>8} vectors: insert {r['insert_s']:.0f} s, index settle "
              f"{r['index_settle_s']:.0f} s, search p50 {r['p50_ms']:.1f} ms p99 "
              f"{r['p99_ms']:.1f} ms, recall@10 {r['recall_at_10']:.3f}, RSS "
              f"{r['process_rss_mb']:.0f} MB", flush=True)
    for small, big in zip(results, results[1:], strict=False):
        grow = big["size"] / small["size"]
        print(f"x{grow:.0f} vectors: p50 x{big['p50_ms'] / small['p50_ms']:.2f}, insert "
              f"x{big['insert_s'] / small['insert_s']:.1f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "scale.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                                 "results": results}, indent=2))


if __name__ == "__main__":
    main()
