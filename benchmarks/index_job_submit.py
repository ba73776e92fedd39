"""The bulk index through `ray job submit` beside a running service (issue 12): first run and a
rerun over the unchanged catalogue, both as submitted jobs writing through the service.

Starts its own local Ray (with the job server), runs the whole service graph on it (Milvus Lite
owned by the service, demo catalogue off), submits `python -m batch_index index --catalog ...
--limit ROWS` twice (working_dir upload + the venv's Python as `py_executable`, as the README
says), and checks the service then finds a catalogue photo's own product first.

    .venv/bin/python -m benchmarks.index_job_submit [--rows 200]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import DATASET, OUT
from benchmarks.rebuild_job import agent_port
from tests.support import ROOT, job_runtime_env, submit_when_ready, wait_for_job


def run_job(client, name: str, entrypoint: str) -> dict:
    """Submit one job, wait for it; wall seconds (submit to end), status and its summary."""
    from ray.job_submission import JobStatus

    start = time.perf_counter()
    job = submit_when_ready(
        client, submission_id=f"{name}-{os.getpid()}", entrypoint=f"{sys.executable} {entrypoint}",
        runtime_env=job_runtime_env())
    status = wait_for_job(client, job)
    wall = time.perf_counter() - start
    logs = client.get_job_logs(job)
    summary = [line for line in logs.splitlines() if line.startswith("summary ")]
    out = {"wall_s": wall, "status": str(status),
           "summary": json.loads(summary[-1][len("summary "):]) if summary else None,
           "through_service": "writing through the running service" in logs,
           "fit_skipped": "heads unchanged" in logs}
    if status != JobStatus.SUCCEEDED:
        out["log_tail"] = logs[-2000:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray
    from ray import serve
    from ray.job_submission import JobSubmissionClient

    from deployments.core.settings import load_settings
    from serve_app.app import build_app
    from tests.support import free_port, wait_healthy, write_config

    work = Path(tempfile.mkdtemp(prefix="index-job-submit-"))
    base = load_settings()
    settings = base.model_copy(update={
        "milvus": base.milvus.model_copy(update={"uri": str(work / "milvus.db")}),
        "media_dir": str(work / "media"),
        "demo": base.demo.model_copy(update={"enabled": False}),
        "heads": base.heads.model_copy(update={"dir": str(work / "heads")}),
        # absolute: the submitted job runs in an unpacked copy of the working dir, without data/
        "image_model": base.image_model.model_copy(update={
            "cache_dir": str((ROOT / base.image_model.cache_dir).resolve())}),
        "auth": base.auth.model_copy(update={"key_file": str(work / "admin_key")}),
    })
    config = write_config(work / "config.yaml", settings)
    dashboard, http = free_port(), free_port()
    agent_port(free_port())
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=dashboard,
             object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    result: dict = {"rows": args.rows, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "load_before": os.getloadavg()[0]}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        serve.run(build_app(settings), name="shopsearch", route_prefix="/")
        url = f"http://127.0.0.1:{http}"
        wait_healthy(url, timeout=600)
        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        entry = (f"-m batch_index index --config {config} --catalog "
                 f"{args.dataset / 'products.csv'} --limit {args.rows} "
                 f"--rejects {work / 'rejects.jsonl'}")
        result["first"] = run_job(client, "index", entry)
        result["rerun"] = run_job(client, "rerun", entry)
        result["rerun_over_first"] = result["rerun"]["wall_s"] / result["first"]["wall_s"]
        with open(args.dataset / "products.csv", newline="") as f:
            row = next(csv.DictReader(f))
        photo = (args.dataset / row["image"]).read_bytes()
        found = httpx.post(f"{url}/search/image", files={"image": ("q.jpg", photo)},
                           timeout=120).json()["results"]
        result["own_photo_first"] = bool(found) and found[0]["id"] == row["id"]
        result["healthz_products"] = httpx.get(f"{url}/healthz", timeout=60).json().get(
            "products")
    finally:
        result["load_after"] = os.getloadavg()[0]
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(result, indent=2))
    OUT.mkdir(exist_ok=True)
    (OUT / "index_job_submit.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
