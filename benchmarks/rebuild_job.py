"""What a small rebuild costs through `ray job submit` (issue 14), against the same in-process.

Starts its own local Ray (with the job server), a Milvus server process and a demo catalogue of
--products, indexes v1 in-process, then rebuilds it with another image model twice: once as a
submitted job (working_dir upload + the venv's Python as `py_executable`, as the README says) and
once in-process. Prints and writes the wall times and where the difference goes.

    .venv/bin/python -m benchmarks.rebuild_job --products 48
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import OUT


def agent_port(port: int) -> None:
    """Give this local cluster's dashboard agent a free HTTP port. Jobs are submitted through
    that agent; its default port (52365) is taken when another Ray cluster runs on the machine
    (another user's, a test run's), and then the agent runs without HTTP and every submit gets
    500 "No available agent to submit job" for good. `ray.init` has no option for it (`ray
    start --head --dashboard-agent-listen-port` has), so the default is set here."""
    from ray._private.parameter import RayParams

    init = RayParams.__init__
    if getattr(init, "_agent_port", None):
        return

    def patched(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        init(self, *args, **kwargs)

    patched._agent_port = port
    RayParams.__init__ = patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    from batch_index.__main__ import main as batch_index
    from deployments.core.demo import generate_demo_catalog
    from deployments.core.settings import load_settings
    from tests.support import (
        LiteServer,
        free_port,
        job_runtime_env,
        perturbed_checkpoint,
        submit_when_ready,
        write_config,
    )

    work = Path(tempfile.mkdtemp(prefix="rebuild-job-"))
    milvus = LiteServer(work / "milvus", free_port())
    milvus.start()
    base = load_settings()
    settings = base.model_copy(update={
        "milvus": base.milvus.model_copy(update={"uri": milvus.uri}),
        "media_dir": str(work / "media"),
        "image_model": base.image_model.model_copy(update={"cache_dir": str(work / "cache")}),
    })
    config = write_config(work / "config.yaml", settings)
    catalog = generate_demo_catalog(work / "demo", n=args.products)
    weights = perturbed_checkpoint(work / "new-model.pt")
    dashboard = free_port()
    agent_port(free_port())
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=dashboard,
             object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    result: dict = {"products": args.products, "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        start = time.perf_counter()
        assert batch_index(["index", "--config", str(config), "--catalog", str(catalog),
                            "--rejects", str(work / "r.jsonl"), "--via-service", "no"]) == 0
        result["index_v1_in_process_s"] = time.perf_counter() - start

        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        python = sys.executable
        start = time.perf_counter()
        job = submit_when_ready(
            client, submission_id=f"rebuild-{os.getpid()}",
            entrypoint=f"{python} -m batch_index rebuild --config {config} "
                       f"--image-weights {weights} --via-service no",
            runtime_env=job_runtime_env())
        result["job_submit_accepted_s"] = time.perf_counter() - start
        first_log = None
        while (status := client.get_job_status(job)) not in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if first_log is None and client.get_job_logs(job).strip():
                first_log = time.perf_counter() - start
            time.sleep(0.2)
        result["job_wall_s"] = time.perf_counter() - start
        result["job_status"] = str(status)
        result["job_first_output_s"] = first_log
        logs = client.get_job_logs(job)
        found = re.search(r"rebuild (\{.*\})", logs)
        result["job_rebuild_reported_s"] = json.loads(found.group(1))["seconds"] if found else None
        if status != JobStatus.SUCCEEDED:
            result["job_log_tail"] = logs[-2000:]

        start = time.perf_counter()
        assert batch_index(["rebuild", "--config", str(config), "--image-weights",
                            str(weights), "--via-service", "no"]) == 0
        result["in_process_rebuild_s"] = time.perf_counter() - start
    finally:
        ray.shutdown()
        milvus.stop()
    print(json.dumps(result, indent=2))
    OUT.mkdir(exist_ok=True)
    (OUT / "rebuild_job.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
