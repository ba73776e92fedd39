"""Where the bulk index job's time goes: CPU seconds per kind of process, and Ray's timeline.

Runs the job's own code (`batch_index.pipeline.run_index`, defaults of `python -m batch_index
index`) in this process on a fresh local Ray and a fresh Milvus Lite store, samples every
process of the machine every 0.5 s (CPU seconds attributed to what the process was doing:
the driver, Ray Data's decode tasks, the image and text actors, Ray's own daemons, Milvus Lite,
everything else = other users), and sums Ray's timeline per task / actor method.

    python -m benchmarks.index_breakdown [--rows 300] [--json PATH] [--image-threads 2] ...
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from benchmarks.common import DATASET, OUT

KINDS = (("load_images", "decode tasks"), ("ImageEmbedder", "image actor"),
         ("TextEmbedder", "text actor"), ("IDLE", "idle Ray workers"),
         ("milvus", "Milvus Lite"), ("raylet", "Ray daemons"), ("gcs_server", "Ray daemons"),
         ("dashboard", "Ray daemons"), ("log_monitor", "Ray daemons"), ("ray::", "other Ray"))


def kind_of(proc: psutil.Process, me: int) -> str:
    """What a process is doing now (by its title, which Ray sets to the running task)."""
    if proc.pid == me:
        return "driver (Ray Data executor, plan, writer)"
    try:
        title = " ".join(proc.cmdline())[:300]
    except psutil.Error:
        return "gone"
    if not title:
        return "other processes"
    for needle, kind in KINDS:
        if needle in title:
            return kind
    return "other processes (other users)"


class CpuSampler:
    """CPU seconds per process kind between start() and stop(), sampled every `period` s."""

    def __init__(self, period: float = 0.5) -> None:
        self.period, self.seconds = period, defaultdict(float)
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        for proc in psutil.process_iter():
            try:
                t = proc.cpu_times()
                total = t.user + t.system
            except psutil.Error:
                continue
            before = self._last.get(proc.pid)
            self._last[proc.pid] = total
            if before is not None and total >= before:
                self.seconds[kind_of(proc, me)] += total - before

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def start(self) -> None:
        """Baseline every process now, then sample in the background."""
        self._sample()
        self.seconds.clear()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds per kind since start()."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))


def timeline_totals(path: Path) -> dict[str, dict[str, float]]:
    """Ray's timeline summed per event name: count and seconds."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"n": 0, "s": 0.0})
    for event in json.loads(path.read_text()):
        if event.get("ph") == "X" and "dur" in event:
            name = str(event.get("name", "?"))
            totals[name]["n"] += 1
            totals[name]["s"] += event["dur"] / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["s"])[:15])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-threads", type=int)
    args = parser.parse_args()

    import ray

    from batch_index import pipeline
    from benchmarks.index_throughput import _settings
    from deployments.core.catalog import read_csv_catalog
    from deployments.core.encoders import model_dims
    from deployments.core.store import ProductStore

    work = Path(tempfile.mkdtemp(prefix="bench-breakdown-"))
    settings = _settings(work)
    rows, rejects = read_csv_catalog(args.dataset / "products.csv")
    rows = rows[: args.rows]
    options = pipeline.IndexOptions()
    for name in ("batch_size", "image_threads"):
        if getattr(args, name):
            setattr(options, name, getattr(args, name))
    store = ProductStore(settings.milvus)
    store.ensure_collection(*model_dims(settings.image_model, settings.text_model))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    sampler = CpuSampler()
    sampler.start()
    load_start = os.getloadavg()[0]
    summary = pipeline.run_index(rows, rejects, settings, {},
                                 pipeline.direct_writer(settings, store), options)
    cpu = sampler.stop()
    ray.timeline(str(work / "timeline.json"))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": summary.indexed,
              "wall_s": summary.wall_s, "images_per_s": summary.images_per_s,
              "load_before_after": [load_start, os.getloadavg()[0]],
              "cpu_s": cpu, "timeline": timeline_totals(work / "timeline.json")}
    ray.shutdown()
    store.close()
    print(f"{summary.line()}\n\nCPU seconds by process kind (wall {summary.wall_s:.1f} s):")
    for kind, seconds in cpu.items():
        print(f"  {kind:<45} {seconds:8.1f}")
    print("\nRay timeline (count, seconds):")
    for name, t in report["timeline"].items():
        print(f"  {name[:60]:<60} {t['n']:5d} {t['s']:8.1f}")
    OUT.mkdir(exist_ok=True)
    for path in filter(None, (OUT / "index_breakdown.json", args.json)):
        path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
