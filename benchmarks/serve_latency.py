"""The service against its own encoders, measured side by side in one run on one machine.

Starts the whole graph with `serve run` on the config (configs/config.yaml, data in a temp dir),
drives it over HTTP from this process, and prints:
  - the bare encoders' own figures (no Ray, in this process, the threads the graph gives each
    encoder): one call on one photo / text (ms), and saturated throughput at the configured
    max_batch_size (photos: decode + preprocess + model; texts: tokenise + model);
  - single-client photo- and text-query latency p50/p99 over HTTP;
  - throughput and p50/p99 at 16 and 32 concurrent clients, photo and text queries, for each
    image max_batch_size given (the config's value and 1 = unbatched), each on a freshly
    started graph over the same data;
  - the issue's ratios (service / bare encoder), and `--json PATH` with every figure;
  - CPU time per query under load by process role (benchmarks.cpu: proxy, ingress, encoders,
    search, Milvus Lite, Ray's own processes) and per photo / text of the bare encoders, and the
    ratio of the two: the same capacity ratio from CPU time, which other tenants' load on a
    shared machine does not move.

    python -m benchmarks.serve_latency --batch-sizes 8,1 --clients 16,32 --seconds 20 \
        --json benchmarks/out/serve_latency.json
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

from benchmarks.common import OUT, QUERIES, Record, Request, Workload, closed_loop, demo_photos
from benchmarks.cpu import CpuMeter, own_cpu_s
from deployments.core.encoders import ImageEncoder, TextEncoder
from deployments.core.settings import AppSettings, load_settings
from tests.support import wait_healthy


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0-100) of a list, in the list's units."""
    return float(np.percentile(values, q)) if values else float("nan")


def bare_encoder_ms(settings: AppSettings, photos: list[bytes], repeats: int = 60) -> float:
    """Median time of one encoder call on one photo, in this process, without Ray."""
    return bare_image(settings, photos, repeats, 0)["bare_image_ms"]


def _median_ms(call, items: list, repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        call([items[i % len(items)]])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _saturated(call, items: list, batch: int, seconds: float) -> tuple[float, float]:
    """(items per second, CPU ms per item) through `call` fed full batches back to back for
    `seconds` (CPU: this process, every thread)."""
    done, i = 0, 0
    start, cpu = time.perf_counter(), own_cpu_s()
    while time.perf_counter() - start < seconds:
        chunk = [items[(i + j) % len(items)] for j in range(batch)]
        call(chunk)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - start), (own_cpu_s() - cpu) * 1000 / done


def bare_image(settings: AppSettings, photos: list[bytes], repeats: int = 60,
               seconds: float = 10) -> dict:
    """The image encoder on its own (decode + preprocess + model), with the intra-op threads
    the graph gives one ImageEncoder replica: one photo per call (median ms), and saturated
    photos per second at the configured max_batch_size."""
    encoder = ImageEncoder(settings.image_model, num_threads=settings.image_encoder.threads())
    batch = settings.image_batching.max_batch_size
    for i in range(3):
        encoder.embed_bytes(photos[i * batch: (i + 1) * batch] or photos[:1])
    out = {"bare_image_ms": _median_ms(encoder.embed_bytes, photos, repeats),
           "bare_image_batch": batch, "image_threads": settings.image_encoder.threads()}
    if seconds:
        out["bare_image_per_s"], out["bare_image_cpu_ms"] = _saturated(
            encoder.embed_bytes, photos, batch, seconds)
    return out


def bare_text(settings: AppSettings, texts: list[str], repeats: int = 100,
              seconds: float = 10) -> dict:
    """The text encoder on its own (tokenise + model), same shape as `bare_image`."""
    encoder = TextEncoder(settings.text_model, num_threads=settings.text_encoder.threads())
    batch = settings.text_batching.max_batch_size
    for _ in range(3):
        encoder.embed(texts[:batch])
    per_s, cpu_ms = _saturated(encoder.embed, texts, batch, seconds)
    return {"bare_text_ms": _median_ms(encoder.embed, texts, repeats),
            "bare_text_per_s": per_s, "bare_text_cpu_ms": cpu_ms,
            "bare_text_batch": batch, "text_threads": settings.text_encoder.threads()}


def text_queries(users: int) -> Workload:
    """Text queries only, the common load generator's phrases in turn per user."""

    def next_request(uid: int, n: int, rng) -> Request:
        text = QUERIES[(uid + n) % len(QUERIES)]
        return Request("text", "POST", "/search/text", {"json": {"query": text}})

    return next_request


def image_queries(photos: list[bytes], users: int) -> Workload:
    """Image queries only; user u sends photos u, u + users, u + 2 * users, ..."""

    def next_request(uid: int, n: int, rng) -> Request:
        photo = photos[(uid + (n - 1) * users) % len(photos)]
        return Request("photo", "POST", "/search/image", {"files": {"image": ("q.jpg", photo)}})

    return next_request


def single_client(url: str, photos: list[bytes], n: int, text: bool = False) -> list[float]:
    """Latencies (ms) of n sequential image queries (of the first 50 photos), or text ones."""
    record = Record()
    workload = text_queries(1) if text else image_queries(photos[:50], 1)
    asyncio.run(closed_loop(url, 1, float("inf"), workload, record,
                            requests_per_user=n, timeout=60))
    failed = [e for e in record.events if e[2] != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} sequential queries failed: {failed[0]}")
    return record.latencies_ms()


def load(url: str, photos: list[bytes], clients: int, seconds: float,
         text: bool = False, meter: CpuMeter | None = None) -> dict:
    """`clients` closed-loop users sending image (or text) queries for `seconds`; throughput,
    latency, and the failures by status (503s are load shed on purpose, with Retry-After).
    With `meter` (the service's process tree): CPU ms per answered query per role, the
    service's total (`cpu_ms`) and the load generator's own (`loadgen_cpu_ms`)."""
    record = Record()
    workload = text_queries(clients) if text else image_queries(photos, clients)
    before, own = (meter.sample() if meter else None), own_cpu_s()
    elapsed = asyncio.run(closed_loop(url, clients, seconds, workload, record, timeout=60))
    latencies = record.latencies_ms((200,))
    statuses = [e[2] for e in record.events if e[2] != 200]
    row = {"clients": clients, "requests": len(latencies),
           "errors": len(record.events) - len(latencies),
           "shed_503": statuses.count(503),
           "other_errors": len(statuses) - statuses.count(503),
           "qps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 50),
           "p99_ms": percentile(latencies, 99)}
    if meter and latencies:
        per_query = {name: cpu * 1000 / len(latencies)
                     for name, cpu in sorted(meter.since(before).items(), key=lambda kv: -kv[1])}
        row["cpu_ms_by_role"] = per_query
        row["cpu_ms"] = sum(per_query.values())
        row["loadgen_cpu_ms"] = (own_cpu_s() - own) * 1000 / len(latencies)
    return row


def run_mode(config: dict, work: Path, port: int, photos: list[bytes], args) -> dict:
    """`serve run` the graph with this config (as a user would), measure, stop it."""
    path = work / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (work / f"serve-{port}.log").open("w")
    # `python -m`, not the venv's `serve` script (its shebang may name another interpreter).
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, config["applications"][0]["args"]["demo"]["size"], 300, proc)
        load(url, photos, 8, 3)  # warm up every replica and batch path
        load(url, photos, 8, 2, text=True)
        args_block = config["applications"][0]["args"]
        result = {"max_batch_size": args_block["image_batching"]["max_batch_size"]}
        lat = single_client(url, photos, args.single)
        result["single_p50_ms"] = percentile(lat, 50)
        result["single_p99_ms"] = percentile(lat, 99)
        lat = single_client(url, photos, args.single, text=True)
        result["single_text_p50_ms"] = percentile(lat, 50)
        result["single_text_p99_ms"] = percentile(lat, 99)
        meter = CpuMeter(proc.pid)
        result["load"] = [load(url, photos, c, args.seconds, meter=meter) for c in args.clients]
        result["text_load"] = [load(url, photos, c, args.seconds, text=True, meter=meter)
                               for c in args.clients]
        return result
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Stop `serve run` (SIGINT: it tears down its app and its Ray cluster); on a loaded
    machine that was seen to hang, so SIGTERM, then SIGKILL, after a grace period each."""
    for sig, grace in ((signal.SIGINT, 45), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            print(f"serve run did not stop on {sig.name}", file=sys.stderr)


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
    parser.add_argument("--bare-seconds", type=float, default=10,
                        help="seconds of saturated bare-encoder load, each encoder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = load_settings(args.config)
    config = yaml.safe_load(Path(args.config).read_text())
    config["http_options"]["port"] = args.port
    app_args = config["applications"][0]["args"]
    app_args["milvus"]["uri"] = str(work / "milvus.db")
    app_args["media_dir"] = str(work / "media")
    app_args["demo"]["dir"] = str(work / "demo")
    # No fitted heads: an artifact left in the configured folder would change the text path.
    app_args.setdefault("heads", {})["dir"] = str(work / "heads")
    photos, _ = demo_photos(work / "demo", base.demo.size)

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "config": args.config,
              "image_threads": base.image_encoder.threads(),
              "backend": base.image_model.backend, "modes": []}
    for size in args.batch_sizes:
        app_args["image_batching"]["max_batch_size"] = size
        report["modes"].append(run_mode(config, work, args.port, photos, args))
    # The bare encoders run after the graph is gone, so neither competes with the other.
    report.update(bare_image(base, photos, seconds=args.bare_seconds))
    report.update(bare_text(base, QUERIES * 4, seconds=args.bare_seconds))
    report["bare_encoder_ms"] = report["bare_image_ms"]
    report.update(headline(report))
    print_report(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "serve_latency.json").write_text(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


def headline(report: dict) -> dict:
    """The issue's figures from the first (configured) mode, and their ratios to the bare
    encoders: throughput at 32 clients / saturated encoder, single p50 / bare call."""
    mode = report["modes"][0]
    out = {"single_image_p50_ms": mode["single_p50_ms"],
           "single_text_p50_ms": mode["single_text_p50_ms"]}
    for kind, rows in (("image", mode["load"]), ("text", mode["text_load"])):
        for row in rows:
            out[f"{kind}_qps_{row['clients']}"] = row["qps"]
            out[f"{kind}_p99_ms_{row['clients']}"] = row["p99_ms"]
            out[f"{kind}_errors_{row['clients']}"] = row["other_errors"]
            out[f"{kind}_shed_{row['clients']}"] = row["shed_503"]
            if "cpu_ms" in row:
                out[f"{kind}_cpu_ms_{row['clients']}"] = row["cpu_ms"]
    for kind in ("image", "text"):
        if f"{kind}_qps_32" in out:
            out[f"{kind}_qps_32_over_bare"] = out[f"{kind}_qps_32"] / report[f"bare_{kind}_per_s"]
        out[f"single_{kind}_p50_over_bare"] = (out[f"single_{kind}_p50_ms"]
                                                / report[f"bare_{kind}_ms"])
        # The same ratio as q/s over the saturated encoder, from CPU time instead of wall time:
        # what a query costs the machine against what the encoder alone costs per item. On an
        # otherwise idle machine whose cores the service saturates, the two agree; on a shared
        # one only this one holds still.
        if f"{kind}_cpu_ms_32" in out:
            out[f"{kind}_cpu_ratio_32"] = report[f"bare_{kind}_cpu_ms"] / out[f"{kind}_cpu_ms_32"]
    return out


def print_report(report: dict) -> None:
    """A small table and the ratios the issue asks for."""
    print(f"\nbare image encoder (decode+preprocess+model, {report['image_threads']} threads, "
          f"backend {report['backend']}): {report['bare_image_ms']:.1f} ms per 1-photo call, "
          f"{report['bare_image_per_s']:.1f} photos/s saturated at batch "
          f"{report['bare_image_batch']}")
    print(f"bare text encoder ({report['text_threads']} threads): {report['bare_text_ms']:.1f} ms "
          f"per 1-text call, {report['bare_text_per_s']:.1f} texts/s saturated at batch "
          f"{report['bare_text_batch']}")
    print(f"{'kind':>5} {'batch':>5} {'clients':>7} {'qps':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'503':>5} {'other':>5}")
    for mode in report["modes"]:
        for kind, single, rows in (("image", "single", mode["load"]),
                                   ("text", "single_text", mode.get("text_load", []))):
            print(f"{kind:>5} {mode['max_batch_size']:>5} {1:>7} {'-':>7} "
                  f"{mode[single + '_p50_ms']:>8.1f} {mode[single + '_p99_ms']:>8.1f} "
                  f"{0:>5} {0:>5}")
            for row in rows:
                print(f"{kind:>5} {mode['max_batch_size']:>5} {row['clients']:>7} "
                      f"{row['qps']:>7.1f} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
                      f"{row['shed_503']:>5} {row['other_errors']:>5}")
    batched, unbatched = report["modes"][0], report["modes"][-1]
    if batched is not unbatched:
        for b, u in zip(batched["load"], unbatched["load"], strict=True):
            print(f"{b['clients']} clients: batched/unbatched throughput "
                  f"{b['qps'] / u['qps']:.2f}x, p99 {b['p99_ms']:.0f} vs {u['p99_ms']:.0f} ms")
    for kind in ("image", "text"):
        if f"{kind}_qps_32_over_bare" in report:
            print(f"{kind}: 32-client q/s / saturated bare encoder: "
                  f"{report[kind + '_qps_32_over_bare']:.2f}x (target >= 0.6)")
        print(f"{kind}: single-client p50 / bare call: "
              f"{report['single_' + kind + '_p50_over_bare']:.2f}x (target <= 2.5)")
        if f"{kind}_cpu_ratio_32" in report:
            print(f"{kind}: CPU per item, bare encoder / service at 32 clients: "
                  f"{report['bare_' + kind + '_cpu_ms']:.1f} / {report[kind + '_cpu_ms_32']:.1f} "
                  f"ms = {report[kind + '_cpu_ratio_32']:.2f}x")
    for mode in report["modes"]:
        for kind, rows in (("image", mode["load"]), ("text", mode.get("text_load", []))):
            for row in rows:
                if "cpu_ms_by_role" in row:
                    parts = ", ".join(f"{name} {ms:.1f}" for name, ms in
                                      row["cpu_ms_by_role"].items() if ms >= 0.05)
                    print(f"CPU ms per {kind} query, batch {mode['max_batch_size']}, "
                          f"{row['clients']} clients: {parts}; load generator "
                          f"{row['loadgen_cpu_ms']:.1f}")


if __name__ == "__main__":
    main()
