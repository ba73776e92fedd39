"""`stress.py --rebuild`: change the image model under load (issue 14).

Own stack (a Milvus server process, the graph, the demo catalogue); the mixed shopper workload
runs throughout. At 1/5 of the run `batch_index rebuild` re-embeds the catalogue with another
image model (EfficientNet-Lite0 with perturbed weights) into the next version beside the live
one; when it is done, `batch_index swap` catches up the writes made meanwhile, checks the new
version and moves the alias; then the encoders are switched with a Serve rolling update. Reports
requests failed around the swap, the time from rebuild start to swap, and lost writes.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import Record, demo_photos, run_load


def run(args: argparse.Namespace, report, window) -> dict:
    """The run; `report` / `window` are stress.py's summaries."""
    import ray
    from ray import serve

    from batch_index.__main__ import main as batch_index
    from deployments.core.settings import load_settings
    from serve_app.app import build_app
    from serve_app.auth import write_headers
    from tests.support import (
        LiteServer,
        free_port,
        perturbed_checkpoint,
        wait_healthy,
        write_config,
    )

    work = Path(tempfile.mkdtemp(prefix="stress-rebuild-"))
    milvus = LiteServer(work / "milvus", free_port())
    milvus.start()
    base = load_settings()
    settings = base.model_copy(update={
        "milvus": base.milvus.model_copy(update={"uri": milvus.uri}),
        "media_dir": str(work / "media"),
        "demo": base.demo.model_copy(update={"dir": str(work / "demo"), "size": args.products}),
        "image_model": base.image_model.model_copy(update={"cache_dir": str(work / "cache")}),
        "auth": base.auth.model_copy(update={"key_file": str(work / "admin_key")}),
    })
    weights = perturbed_checkpoint(work / "new-model.pt")
    new = settings.model_copy(update={"image_model": settings.image_model.model_copy(
        update={"weights": str(weights)})})
    config = write_config(work / "config.yaml", settings)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="stress", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, args.products)
    photos, ids = demo_photos(work / "demo")
    record = Record()
    outcome: dict = {}

    def change_model() -> None:
        time.sleep(args.seconds / 5)
        record.marks["rebuild_started"] = time.monotonic()
        outcome["rebuild_rc"] = batch_index(["rebuild", "--config", str(config),
                                             "--image-weights", str(weights)])
        record.marks["rebuilt"] = time.monotonic()
        # Two catch-up passes at most: each pays the job's start-up (about 20-40 s here), and
        # what the last one leaves is carried over right after the alias moves.
        outcome["swap_rc"] = batch_index(["swap", "--config", str(config), "--max-passes", "2"])
        record.marks["swapped"] = time.monotonic()
        if outcome["swap_rc"] == 0:  # a refused swap keeps the old model everywhere
            serve.run(build_app(new), name="stress", route_prefix="/")
        record.marks["encoders_switched"] = time.monotonic()

    changer = threading.Thread(target=change_model)
    changer.start()
    asyncio.run(run_load(url, photos, ids, args.users, args.seconds, record,
                         write_headers=write_headers(settings.auth.key_file)))
    changer.join()
    result = report(record, args.seconds)
    marks = record.marks
    result.update(outcome)
    result["rebuild_start_to_swap_s"] = marks["swapped"] - marks["rebuild_started"]
    result["rebuild_s"] = marks["rebuilt"] - marks["rebuild_started"]
    result["swap_s"] = marks["swapped"] - marks["rebuilt"]
    result["encoder_rollout_s"] = marks["encoders_switched"] - marks["swapped"]
    result["rebuild_window"] = window(record, marks["rebuild_started"], marks["rebuilt"])
    result["swap_and_rollout_window"] = window(record, marks["rebuilt"],
                                               marks["encoders_switched"] + 2)
    result["failed_by_kind_in_swap"] = dict(Counter(
        f"{e[1]}:{e[2]}" for e in record.events
        if marks["rebuilt"] <= e[0] < marks["encoders_switched"] + 2 and e[2] not in (200, 201)))
    lost = [i for i in record.acknowledged
            if httpx.get(f"{url}/products/{i}", timeout=30).status_code != 200]
    result["lost_writes"] = len(lost)
    result["live_version"] = httpx.get(f"{url}/healthz", timeout=30).json().get("version")
    serve.shutdown()
    ray.shutdown()
    milvus.stop()
    return result
