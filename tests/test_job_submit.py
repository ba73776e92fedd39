"""The bulk job and the fit as a shop runs them on a cluster: `ray job submit` to a running Ray
head (its own, started here with `ray start --head`), the venv's Python named for the entrypoint
and the job's workers (`py_executable`), the working directory uploaded, Milvus as a server
process (`milvus-lite server`). The README's commands, end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deployments.core.demo import generate_demo_catalog
from deployments.core.heads import current_version, heads_folder, load_heads
from deployments.core.store import ProductStore
from tests.support import (
    LiteServer,
    free_port,
    job_runtime_env,
    submit_when_ready,
    wait_for_job,
    write_config,
)

pytestmark = pytest.mark.integration
PRODUCTS = 48


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own (every port chosen free, so another cluster on the machine is no
    obstacle); yields the job server's address. Stopped by ending its `--block` process, never
    with `ray stop` (which would stop every cluster on the machine)."""
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: it holds unix sockets
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard,
             "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
             "--ray-client-server-port": free_port(), "--runtime-env-agent-port": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats", f"--temp-dir={temp}",
         *(f"{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_server(address, head)
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()


def _wait_for_job_server(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        try:
            JobSubmissionClient(address)
            return
        except ConnectionError:
            assert time.monotonic() < deadline, f"no job server at {address} after {timeout} s"
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster_setup(tmp_path_factory, settings_factory):
    """A Milvus server process, a config naming it (absolute paths only: the job runs in an
    uploaded copy of the working directory), and a demo catalogue."""
    work = tmp_path_factory.mktemp("jobs")
    milvus = LiteServer(work / "milvus", free_port())
    milvus.start()
    settings = settings_factory(work, demo={"enabled": False})
    settings = settings.model_copy(update={
        "milvus": settings.milvus.model_copy(update={"uri": milvus.uri}),
        "heads": settings.heads.model_copy(update={
            "dir": str(work / "heads"), "min_products": 10, "min_field_products": 10,
            "min_class_products": 2}),
    })
    config = write_config(work / "config.yaml", settings)
    catalog = generate_demo_catalog(work / "demo", n=PRODUCTS)
    try:
        yield settings, config, catalog
    finally:
        milvus.stop()


def _run(address: str, name: str, command: str, timeout: float = 900) -> str:
    """Submit `python -m batch_index <command>` as the README does; wait; return its logs.
    Fails with the log's tail when the job does not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job = submit_when_ready(
        client, submission_id=f"{name}-{os.getpid()}-{time.monotonic_ns()}",
        entrypoint=f"{sys.executable} -m batch_index {command}", runtime_env=job_runtime_env())
    status = wait_for_job(client, job, timeout, poll_s=1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"{name} ended {status}:\n{logs[-3000:]}"
    return logs


def _summary(logs: str) -> dict:
    found = re.findall(r"^summary (\{.*\})$", logs, flags=re.M)
    assert found, logs[-2000:]
    return json.loads(found[-1])


def test_index_fit_and_rerun_through_ray_job_submit(ray_head, cluster_setup):
    settings, config, catalog = cluster_setup
    rejects = config.parent / "rejects.jsonl"
    index = (f"index --config {config} --catalog {catalog} --rejects {rejects} "
             "--via-service no --no-fit")

    first = _summary(_run(ray_head, "index", index))
    assert first["indexed"] == PRODUCTS and first["rejected"] == 0, first
    store = ProductStore(settings.milvus)
    try:
        assert store.count() == PRODUCTS
    finally:
        store.close()

    logs = _run(ray_head, "fit", f"fit --config {config} --via-service no")
    folder = heads_folder(settings.heads.dir, settings.milvus.collection)
    version = current_version(folder)
    assert version is not None and version in logs  # the job printed what it wrote
    heads = load_heads(folder, *_model_ids(settings), 1280, 384, version)
    assert heads.projection is not None and {"article_type", "colour"} <= set(heads.attributes)

    again = _summary(_run(ray_head, "rerun", index))  # an unchanged catalogue
    assert again["unchanged"] == PRODUCTS and again["indexed"] == 0, again


def _model_ids(settings) -> tuple[str, str]:
    from deployments.core.heads import model_ids

    return model_ids(settings.image_model, settings.text_model)
