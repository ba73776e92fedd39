"""Multi-node scenario on one machine (run in its own process by test_multinode.py).

Starts a two-node Ray cluster with ray.cluster_utils.Cluster, deploys the graph with image-encoder
replicas spread one per node, removes the worker node under load, adds a node back, and runs the
bulk-index job with an image actor pool on both nodes. Prints one JSON line of findings.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.util.state
from ray import serve
from ray.cluster_utils import Cluster

from batch_index import pipeline
from benchmarks.common import Record, run_load
from deployments.core.catalog import read_csv_catalog
from deployments.core.demo import generate_demo_catalog
from deployments.core.errors import BackendUnavailable
from deployments.core.settings import AppSettings, MilvusSettings
from deployments.core.store import ProductStore
from serve_app.app import build_app
from tests.support import free_port, wait_healthy


def replica_nodes(app: str, deployment: str) -> list[str]:
    """Node ids of a deployment's live replicas."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    nodes = []
    for actor in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if (actor.name or "").startswith(prefix):
            nodes.append(actor.node_id)
    return nodes


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll until predicate() is true; return seconds taken."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(what)
        time.sleep(0.5)
    return time.monotonic() - start


def open_when_free(milvus: MilvusSettings, timeout: float = 60) -> ProductStore:
    """Open the Lite store once the search replica has let go of it: serve.shutdown() can return
    before that replica's process, which holds Milvus Lite's data-dir lock, has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ProductStore(milvus)
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main(work: Path) -> dict:
    # Faster node-failure detection than Ray's default (~15 s): calls stuck on a lost node fail
    # over sooner. The head carries the data dir of Milvus Lite, so the search replica stays there.
    fast_health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"milvus_lite": 1}, "_system_config": fast_health})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    settings = AppSettings(
        milvus={"uri": str(work / "milvus.db")}, media_dir=str(work / "media"),
        image_model={"cache_dir": str(work / "cache")},
        demo={"size": 24, "dir": str(work / "demo")},
        auth={"key_file": str(work / "admin_key")},  # not the repo's ./data
        image_encoder={"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.2, "num_threads": 1,
                       "max_replicas_per_node": 1},
        text_encoder={"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1, "num_threads": 1,
                      "max_replicas_per_node": 1},
        search={"num_cpus": 0.1, "resources": {"milvus_lite": 0.01}},
        ingress={"num_cpus": 0.1, "resources": {"milvus_lite": 0.01}},
    )
    serve.run(build_app(settings), name="multi", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 24, timeout=300)
    found = {"image_encoder_nodes_before": len(set(replica_nodes("multi", "ImageEncoder")))}

    csv_path = generate_demo_catalog(work / "demo", 24)
    photos = [p.read_bytes() for p in sorted((csv_path.parent / "images").glob("*.jpg"))]
    ids = [p.stem for p in sorted((csv_path.parent / "images").glob("*.jpg"))]
    record = Record()

    worker_hosted = [d for d in ("ImageEncoder", "TextEncoder", "ProductSearch", "SearchAPI")
                     if worker.node_id in replica_nodes("multi", d)]

    async def load_and_remove() -> None:
        task = asyncio.create_task(run_load(url, photos, ids, 4, 24, record, write_every=0))
        await asyncio.sleep(8)
        cluster.remove_node(worker, allow_graceful=False)  # a hard node loss
        await task

    asyncio.run(load_and_remove())
    ok = sum(1 for e in record.events if e[2] == 200)
    failures = [f"{e[1]}:{e[2]}:{e[3]:.1f}s" for e in record.events if e[2] != 200]
    found.update(requests=len(record.events), failed=len(record.events) - ok,
                 failures=failures[:20], worker_hosted=worker_hosted)

    cluster.add_node(num_cpus=2)
    found["seconds_to_full_strength"] = wait_for(
        lambda: len(set(replica_nodes("multi", "ImageEncoder"))) == 2, 180, "replacement")
    serve.shutdown()

    rows, rejects = read_csv_catalog(csv_path)
    store = open_when_free(settings.milvus.model_copy(update={"collection": "job"}))
    store.ensure_collection(1280, 384)
    summary = pipeline.run_index(
        rows, rejects, settings, {}, pipeline.direct_writer(settings, store),
        # 1.5 CPUs per image actor (as on a real cluster, see --image-actor-cpus): two cannot
        # share a 2-CPU node, so the pool must use both nodes.
        pipeline.IndexOptions(batch_size=4, image_actors=2, image_threads=1,
                              image_actor_cpus=1.5))
    # Where the pool's image actors were placed (a quick actor can embed every batch before its
    # twin on the other node has loaded its model, so the nodes that embedded may be fewer).
    placed = {a.node_id for a in ray.util.state.list_actors(limit=10_000)
              if "ImageEmbedder" in (a.class_name or "")}
    found.update(job_indexed=summary.indexed, job_image_actor_nodes=len(placed),
                 job_nodes_that_embedded=len(summary.image_nodes))
    store.close()
    ray.shutdown()
    cluster.shutdown()
    return found


if __name__ == "__main__":
    work_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    print("RESULT " + json.dumps(main(work_dir)), flush=True)
