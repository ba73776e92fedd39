"""What dynamic batching buys, measured side by side in one run on one machine.

Starts the whole graph with `serve run` on the config (configs/config.yaml, data in a temp dir),
drives it over HTTP from this process, and prints:
  - the bare encoder's own time per image (decode + preprocess + model, no Ray, same threads);
  - single-client image-query latency p50/p99 over HTTP;
  - throughput and p50/p99 at 16 and 32 concurrent clients, for each image max_batch_size given
    (the config's value and 1 = unbatched), each on a freshly started graph over the same data.

    .venv/bin/python -m benchmarks.serve_latency --batch-sizes 8,1 --clients 16,32 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import OUT, Record, Request, Workload, closed_loop, demo_photos
from deployments.core.encoders import ImageEncoder
from deployments.core.settings import AppSettings, load_settings
from tests.support import wait_healthy


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0-100) of a list, in the list's units."""
    return float(np.percentile(values, q)) if values else float("nan")


def bare_encoder_ms(settings: AppSettings, photos: list[bytes], repeats: int = 60) -> float:
    """Median time of one encoder call on one photo, in this process, without Ray."""
    encoder = ImageEncoder(settings.image_model, num_threads=settings.image_encoder.threads())
    for photo in photos[:5]:
        encoder.embed_bytes([photo])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        encoder.embed_bytes([photos[i % len(photos)]])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def image_queries(photos: list[bytes], users: int) -> Workload:
    """Image queries only; user u sends photos u, u + users, u + 2 * users, ..."""

    def next_request(uid: int, n: int, rng) -> Request:
        photo = photos[(uid + (n - 1) * users) % len(photos)]
        return Request("photo", "POST", "/search/image", {"files": {"image": ("q.jpg", photo)}})

    return next_request


def single_client(url: str, photos: list[bytes], n: int) -> list[float]:
    """Latencies (ms) of n sequential image queries (of the first 50 photos)."""
    record = Record()
    asyncio.run(closed_loop(url, 1, float("inf"), image_queries(photos[:50], 1), record,
                            requests_per_user=n, timeout=60))
    failed = [e for e in record.events if e[2] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} sequential queries failed: {failed[0]}")
    return record.latencies_ms()


def load(url: str, photos: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` closed-loop users sending image queries for `seconds`; throughput and latency."""
    record = Record()
    elapsed = asyncio.run(closed_loop(url, clients, seconds, image_queries(photos, clients),
                                      record, timeout=60))
    latencies = record.latencies_ms((200,))
    return {"clients": clients, "requests": len(latencies),
            "errors": len(record.events) - len(latencies),
            "qps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99)}


def run_mode(config: dict, work: Path, port: int, photos: list[bytes], args) -> dict:
    """`serve run` the graph with this config (as a user would), measure, stop it."""
    path = work / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (work / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, config["applications"][0]["args"]["demo"]["size"], 300, proc)
        load(url, photos, 8, 3)  # warm up every replica and batch path
        args_block = config["applications"][0]["args"]
        result = {"max_batch_size": args_block["image_batching"]["max_batch_size"]}
        lat = single_client(url, photos, args.single)
        result["single_p50_ms"] = percentile(lat, 50)
        result["single_p99_ms"] = percentile(lat, 99)
        result["load"] = [load(url, photos, c, args.seconds) for c in args.clients]
        return result
    finally:
        proc.send_signal(signal.SIGINT)  # serve run tears down its app and its Ray cluster
        proc.wait(timeout=120)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/config.yaml")
    parser.add_argument("--batch-sizes", default="8,1", type=lambda s: [int(x) for x in
                                                                         s.split(",")])
    parser.add_argument("--clients", default="16,32", type=lambda s: [int(x) for x in
                                                                       s.split(",")])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--single", type=int, default=200, help="sequential queries")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = load_settings(args.config)
    config = yaml.safe_load(Path(args.config).read_text())
    config["http_options"]["port"] = args.port
    app_args = config["applications"][0]["args"]
    app_args["milvus"]["uri"] = str(work / "milvus.db")
    app_args["media_dir"] = str(work / "media")
    app_args["demo"]["dir"] = str(work / "demo")
    photos, _ = demo_photos(work / "demo", base.demo.size)

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config,
              "image_threads": base.image_encoder.threads(),
              "backend": base.image_model.backend, "modes": []}
    for size in args.batch_sizes:
        app_args["image_batching"]["max_batch_size"] = size
        report["modes"].append(run_mode(config, work, args.port, photos, args))
    report["bare_encoder_ms"] = bare_encoder_ms(base, photos)
    print_report(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "serve_latency.json").write_text(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    """A small table and the ratios the issue asks for."""
    bare = report["bare_encoder_ms"]
    print(f"\nbare encoder (decode+preprocess+model, 1 image, {report['image_threads']} threads, "
          f"backend {report['backend']}): {bare:.1f} ms")
    print(f"{'batch':>5} {'clients':>7} {'qps':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for mode in report["modes"]:
        print(f"{mode['max_batch_size']:>5} {1:>7} {'-':>7} {mode['single_p50_ms']:>8.1f} "
              f"{mode['single_p99_ms']:>8.1f} {0:>6}")
        for row in mode["load"]:
            print(f"{mode['max_batch_size']:>5} {row['clients']:>7} {row['qps']:>7.1f} "
                  f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['errors']:>6}")
    batched, unbatched = report["modes"][0], report["modes"][-1]
    if batched is not unbatched:
        for b, u in zip(batched["load"], unbatched["load"], strict=True):
            print(f"{b['clients']} clients: batched/unbatched throughput "
                  f"{b['qps'] / u['qps']:.2f}x, p99 {b['p99_ms']:.0f} vs {u['p99_ms']:.0f} ms")
    print(f"single-client p50 / bare encoder: {batched['single_p50_ms'] / bare:.2f}x")


if __name__ == "__main__":
    main()
