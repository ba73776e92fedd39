"""Stress test: N users of mixed photo / text / similar queries (and a few writes) for T seconds.

Prints throughput, p50/p95/p99 latency, errors by type, and downtime (the longest stretch with no
successful response). Two ways to run it:

    # against a service you started (`serve run configs/config.yaml`):
    .venv/bin/python -m benchmarks.stress --url http://127.0.0.1:8000 --users 16 --seconds 60

    # fault mode: starts its own stack (a Milvus server process + the graph with two image
    # encoder replicas), kills an image-encoder replica at 1/3 of the run, stops Milvus for
    # --outage seconds at 1/2, restarts it, then checks every acknowledged write is still there:
    .venv/bin/python -m benchmarks.stress --fault --users 8 --seconds 60

    # rebuild mode: own stack; rebuilds the index with another image model, swaps the alias and
    # rolls the encoders over, under load (benchmarks/rebuild_fault.py); the load must outlast
    # rebuild + swap + rollout (about 5 min on 2 shared cores; RESULTS.md has the 420 s run):
    .venv/bin/python -m benchmarks.stress --rebuild --users 4 --seconds 420
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import OUT, Record, demo_photos, run_load
from serve_app.auth import write_headers  # writers send SHOPSEARCH_API_KEYS or data/admin_key


def report(record: Record, seconds: float) -> dict:
    """Throughput, latency percentiles, errors by type, downtime."""
    ok = [e for e in record.events if e[2] in (200, 201)]
    latencies = [e[3] * 1000 for e in ok]
    errors = Counter(f"{e[1]}:{e[2] if e[2] > 0 else 'timeout' if e[2] < 0 else 'connection'}"
                     for e in record.events if e[2] not in (200, 201))
    times = sorted(e[0] + e[3] for e in ok)
    start = min((e[0] for e in record.events), default=0)
    gaps = np.diff([start, *times, start + seconds]) if times else [seconds]
    out = {
        "requests": len(record.events), "ok": len(ok), "errors": dict(errors),
        "error_rate": 1 - len(ok) / max(1, len(record.events)),
        "throughput_rps": len(ok) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        "downtime_s": float(max(gaps)), "acknowledged_writes": len(record.acknowledged),
    }
    return out


def window(record: Record, begin: float, end: float) -> dict:
    """Outcomes of requests started in [begin, end): counts by status and slowest failure."""
    inside = [e for e in record.events if begin <= e[0] < end]
    failed = [e[3] for e in inside if e[2] not in (200, 201)]
    return {"requests": len(inside), "by_status": dict(Counter(e[2] for e in inside)),
            "slowest_failure_s": max(failed, default=0.0)}


def fault_run(args: argparse.Namespace) -> dict:
    """Own stack; kill an encoder replica, then stop and restart Milvus, under load."""
    import ray
    from ray import serve

    from deployments.core.settings import load_settings
    from serve_app.app import build_app
    from tests.support import LiteServer, free_port, kill_replica, wait_healthy

    work = Path(tempfile.mkdtemp(prefix="stress-"))
    milvus = LiteServer(work / "milvus", free_port())
    milvus.start()
    base = load_settings()
    settings = base.model_copy(update={
        "milvus": base.milvus.model_copy(update={"uri": milvus.uri, "read_timeout_s": 0.8}),
        "media_dir": str(work / "media"),
        "demo": base.demo.model_copy(update={"dir": str(work / "demo"), "size": 48}),
        "image_encoder": base.image_encoder.model_copy(update={
            "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.2, "num_threads": 1}),
        "search": base.search.model_copy(update={"max_replicas": 1}),
        "auth": base.auth.model_copy(update={"key_file": str(work / "admin_key")}),
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="stress", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 48)
    photos, ids = demo_photos(work / "demo")
    record = Record()

    def faults() -> None:
        time.sleep(args.seconds / 3)
        record.marks["replica_killed"] = time.monotonic()
        kill_replica("stress", "ImageEncoder")
        time.sleep(args.seconds / 2 - args.seconds / 3)
        record.marks["milvus_stopped"] = time.monotonic()
        milvus.stop(hard=True)
        time.sleep(args.outage)
        milvus.start()
        record.marks["milvus_restarted"] = time.monotonic()

    injector = threading.Thread(target=faults)
    injector.start()
    asyncio.run(run_load(url, photos, ids, args.users, args.seconds, record,
                         write_headers=write_headers(settings.auth.key_file)))
    injector.join()
    result = report(record, args.seconds)
    marks = record.marks
    result["replica_kill_window"] = window(
        record, marks["replica_killed"], min(marks["replica_killed"] + 10,
                                             marks["milvus_stopped"] - 1))
    result["milvus_outage_window"] = window(record, marks["milvus_stopped"] + 0.5,
                                            marks["milvus_restarted"])
    ok_after = [e[0] + e[3] for e in record.events
                if e[0] >= marks["milvus_restarted"] and e[2] == 200]
    result["recovered_after_restart_s"] = (min(ok_after) - marks["milvus_restarted"]
                                           if ok_after else None)
    lost = [i for i in record.acknowledged
            if httpx.get(f"{url}/products/{i}", timeout=30).status_code != 200]
    result["lost_writes"] = len(lost)
    serve.shutdown()
    ray.shutdown()
    milvus.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running service (omit with --fault)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--fault", action="store_true", help="start own stack and inject faults")
    parser.add_argument("--outage", type=float, default=10, help="seconds Milvus stays down")
    parser.add_argument("--rebuild", action="store_true", help="start own stack; change the "
                        "image model under load (rebuild, swap, encoder rollout)")
    parser.add_argument("--products", type=int, default=48, help="demo catalogue (--rebuild)")
    args = parser.parse_args()
    if args.rebuild:
        from benchmarks import rebuild_fault

        result = rebuild_fault.run(args, report, window)
    elif args.fault:
        result = fault_run(args)
    else:
        if not args.url:
            parser.error("give --url of a running service, or --fault")
        photos, ids = demo_photos(Path(tempfile.mkdtemp(prefix="stress-")))
        record = Record()
        asyncio.run(run_load(args.url, photos, ids, args.users, args.seconds, record,
                             write_headers=write_headers()))
        result = report(record, args.seconds)
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), users=args.users, seconds=args.seconds,
                  fault=args.fault, rebuild=args.rebuild)
    print(json.dumps(result, indent=2))
    OUT.mkdir(exist_ok=True)
    name = ("stress_rebuild.json" if args.rebuild else "stress_fault.json" if args.fault
            else "stress.json")
    (OUT / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
