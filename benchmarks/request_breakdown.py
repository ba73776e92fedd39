"""Where one query's milliseconds go, stage by stage, in one process without Ray or HTTP.

Builds the demo catalogue (the one `serve_latency` serves) in a temporary Milvus Lite store with
the real encoders, then times each stage of the service's photo and text query paths with the
same core code the deployments run (median of `--repeats` queries), and the re-rank pool as it
was fetched before (every field of every candidate) next to the lean pool, and reads through
Milvus Lite's gRPC server (marked "(gRPC)") next to the direct engine reads, side by side.

    python -m benchmarks.request_breakdown [--size 240] [--repeats 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import QUERIES, CatalogueEmbedder, demo_photos, read_catalogue


def _timed(stages: dict[str, list[float]], name: str, func, *args):
    start = time.perf_counter()
    result = func(*args)
    stages.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return result


def main() -> None:
    from deployments.core import images
    from deployments.core.colour import colour_descriptor
    from deployments.core.encoders import ImageFeatures
    from deployments.core.media import MediaStore
    from deployments.core.searcher import Searcher, rerank_hits
    from deployments.core.settings import load_settings
    from deployments.core.store import ProductStore
    from serve_app.schemas import SearchResponse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=240, help="demo catalogue products")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    settings = load_settings()
    settings = settings.model_copy(update={
        "milvus": settings.milvus.model_copy(update={"uri": str(work / "milvus.db")})})
    photos, _ = demo_photos(work / "demo", args.size)
    products, paths = read_catalogue(work / "demo" / "products.csv")
    embedder = CatalogueEmbedder(settings, threads=settings.image_encoder.threads())
    searcher = Searcher(ProductStore(settings.milvus), MediaStore(work / "media"),
                        settings.ranking)
    searcher.start(*embedder.dims)
    for i in range(0, len(products), 64):
        chunk = products[i: i + 64]
        blobs = [Path(p).read_bytes() for p in paths[i: i + 64]]
        v = embedder.embed(chunk, blobs)
        searcher.upsert(chunk, blobs, v.image, v.text, v.colour)
    searcher.flush()
    searcher.vocabulary.refresh()
    store, encoder = searcher.store, embedder.image_encoder
    # The same engine read through its gRPC server, as before deployments.core.lite_reads.
    grpc_store = ProductStore(settings.milvus.model_copy(update={"lite_direct_reads": False}))
    pool_k = max(10, settings.ranking.candidates)

    photo: dict[str, list[float]] = {}
    for i in range(args.repeats + 3):
        stages: dict[str, list[float]] = {} if i < 3 else photo  # 3 warm-up queries
        blob = photos[i % len(photos)]
        image = _timed(stages, "decode", images.decode_image, blob)
        pixels = _timed(stages, "preprocess", encoder.preprocessor.model_pixels, image)[None]
        vector = _timed(stages, "model", encoder.embed_pixels, pixels)[0]
        colour = _timed(stages, "colour descriptor", colour_descriptor, pixels[0])
        features = ImageFeatures(vector, colour)
        expr = searcher.expression(None)
        _timed(stages, "(before) pool, every field", store.search, vector, "image", pool_k,
               expr, (), True)
        _timed(stages, "(gRPC) pool search, lean fields", grpc_store.search_pool, vector,
               "image", pool_k, expr)
        pool = _timed(stages, "pool search, lean fields", store.search_pool, vector, "image",
                      pool_k, expr)
        ranked = _timed(stages, "re-rank", rerank_hits, pool, colour, 10, searcher.weights,
                        False)
        _timed(stages, "(gRPC) full products of the 10", grpc_store.complete, ranked)
        hits = _timed(stages, "full products of the 10", store.complete, ranked)
        body = _timed(stages, "response (pydantic + JSON)",
                      lambda h: SearchResponse.of(h, 0.0).model_dump_json(), hits)
        _timed(stages, "Searcher.by_image (all of the above after the model)",
               searcher.by_image, features, 10)
        assert body and len(hits) == 10

    text: dict[str, list[float]] = {}
    for i in range(args.repeats + 3):
        stages = {} if i < 3 else text
        query = QUERIES[i % len(QUERIES)]
        vector = _timed(stages, "tokenise + model", embedder.text_encoder.embed, [query])[0]
        _timed(stages, "(gRPC) text search k=10", grpc_store.search, vector, "text", 10)
        _timed(stages, "text search k=10", store.search, vector, "text", 10)
        hits = _timed(stages, "Searcher.by_text (parse, search k=10)", searcher.by_text,
                      vector, query, 10)
        _timed(stages, "response (pydantic + JSON)",
               lambda h: SearchResponse.of(h, 0.0).model_dump_json(), hits)

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": len(products),
              "pool": pool_k, "photo": {k: statistics.median(v) for k, v in photo.items()},
              "text": {k: statistics.median(v) for k, v in text.items()}}
    for kind in ("photo", "text"):
        print(f"\n{kind} query, {report['size']} products, median of {args.repeats} (ms)")
        for name, ms in report[kind].items():
            print(f"  {name:<55} {ms:8.2f}")
    store.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
