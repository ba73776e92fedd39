"""Faults on real parts: bad input never gets a 5xx; a killed replica is retried and replaced;
a stopped Milvus server gives fast 503s and the service recovers by itself, losing no write."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from deployments.core.demo import draw_product
from tests.support import (
    LiteServer,
    free_port,
    jpeg_bytes,
    kill_replica,
    replica_actor_names,
    request_log_entries,
    wait_healthy,
)

pytestmark = pytest.mark.integration
FAULTS_KEY = "faults-app-write-key"  # the write key configured for the `server_app` service


def _png_bomb() -> bytes:
    """A tiny PNG that claims 30000 x 30000 pixels."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, "PNG")
    return buf.getvalue()


def _bad_requests(photo: bytes, auth: dict[str, str]) -> list[tuple[str, str, dict]]:
    """Bad requests; the writes carry a valid key (`auth`) so their input is what is judged."""
    text = "/search/text"
    image = "/search/image"
    return [
        ("POST", image, {"files": {"image": ("x.jpg", b"GIF89a-not-really")}}),
        ("POST", image, {"files": {"image": ("x.jpg", photo[: len(photo) // 3])}}),
        ("POST", image, {"files": {"image": ("x.png", _png_bomb())}}),
        ("POST", image, {"files": {"image": ("x.jpg", b"\x00" * 11_000_000)}}),
        ("POST", image, {"files": {"photo": ("x.jpg", photo)}}),
        ("POST", image, {"data": {"image": "not a file"}}),
        ("POST", image, {"files": {"image": ("x.jpg", photo)}, "params": {"k": "-1"}}),
        ("POST", image, {"files": {"image": ("x.jpg", photo)}, "params": {"k": "1e9"}}),
        ("POST", image, {"files": {"image": ("x.jpg", photo)}, "params": {"price_max": "nan"}}),
        ("POST", image, {"files": {"image": ("x.jpg", photo)}, "params": {"attr.a b": "x"}}),
        ("POST", text, {"json": {"query": ""}}),
        ("POST", text, {"json": {"query": "🙂" * 2000}}),
        ("POST", text, {"json": {"query": None}}),
        ("POST", text, {"json": {"query": ["a"]}}),
        ("POST", text, {"json": {"query": "shoes", "k": "ten"}}),
        ("POST", text, {"json": {"query": "shoes", "filters": "colour=red"}}),
        ("POST", text, {"json": {"query": "shoes", "filters": {"colour": {"$ne": 1}}}}),
        ("POST", text, {"json": {"query": "shoes", "filters": {"price_min": 9, "price_max": 1}}}),
        ("POST", text, {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("POST", text, {"content": b"query=x", "headers": {"content-type": "text/plain"}}),
        ("GET", "/products", {"params": {"limit": 0}}),
        ("GET", "/products", {"params": {"offset": -5}}),
        ("GET", "/products/no-such-id", {}),
        ("GET", "/products/no-such-id/similar", {}),
        ("GET", "/products/%22%20or%201%3D%3D1/similar", {}),
        ("GET", "/images/no-such-id", {}),
        ("GET", "/static/..%2Fingress.py", {}),
        ("DELETE", "/products/no-such-id", {"headers": auth}),
        ("POST", "/products", {"files": {"image": ("x.jpg", photo)}, "data": {"product": "{"},
                               "headers": auth}),
        ("POST", "/products", {"files": {"image": ("x.jpg", photo)},
                               "data": {"product": json.dumps({"id": "x y", "title": "t"})},
                               "headers": auth}),
        ("POST", "/products", {"files": {"image": ("x.jpg", photo)},
                               "data": {"product": json.dumps({"id": "ok", "price": -3,
                                                               "title": "t"})},
                               "headers": auth}),
        ("POST", "/products", {"files": {"image": ("x.txt", b"hello")},
                               "data": {"product": json.dumps({"id": "ok", "title": "t"})},
                               "headers": auth}),
        ("PUT", "/search/text", {"json": {"query": "x"}}),
        ("GET", "/nowhere", {}),
    ]


def test_no_bad_input_gets_a_5xx(service, auth_headers):
    with httpx.Client(base_url=service, timeout=60) as client:
        photo = client.get("/images/demo-0001").content
        wrong = []
        for i, (method, path, kwargs) in enumerate(_bad_requests(photo, auth_headers)):
            r = client.request(method, path, **kwargs)
            if not 400 <= r.status_code < 500 or not r.json()["error"]["message"]:
                wrong.append((i, method, path, r.status_code, r.text[:200]))
        assert not wrong


def test_responses_carry_a_request_id(service):
    r = httpx.get(f"{service}/healthz", timeout=30)
    assert r.headers.get("x-request-id")


class Load:
    """Background users sending image searches; records each outcome with its latency."""

    def __init__(self, url: str, photo: bytes, users: int = 4) -> None:
        self.url, self.photo, self.users = url, photo, users
        self.outcomes: list[tuple[float, int, float]] = []  # (time, status, seconds)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, daemon=True) for _ in range(users)]

    def _user(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.post("/search/image", files={"image": ("q.jpg", self.photo)},
                                         params={"k": 3}).status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append((start, status, time.monotonic() - start))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def counts(self) -> Counter:
        return Counter(status for _, status, _ in self.outcomes)


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    server = LiteServer(tmp_path_factory.mktemp("milvus-server"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_app(service, milvus_server, settings_factory, tmp_path_factory):
    """A second app on the same Serve instance, on a Milvus *server*, two image replicas."""
    from ray import serve

    from serve_app.app import build_app

    settings = settings_factory(
        tmp_path_factory.mktemp("server-app"),
        milvus={"uri": milvus_server.uri, "collection": "faults", "read_timeout_s": 0.8},
        image_encoder={"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1, "num_threads": 1},
        demo={"enabled": True, "size": 16},
        auth={"api_keys": [FAULTS_KEY]},
    )
    serve.run(build_app(settings), name="faults", route_prefix="/faults")
    url = f"{service}/faults"
    wait_healthy(url, products=16)
    yield url
    serve.delete("faults")


def test_killed_encoder_replica_is_retried_and_replaced(server_app):
    photo = jpeg_bytes(draw_product("Caps", "Blue", "Solid", seed=3))
    assert len(replica_actor_names("faults", "ImageEncoder")) == 2
    with Load(server_app, photo) as load:
        time.sleep(3)
        kill_replica("faults", "ImageEncoder")
        time.sleep(6)
    counts = load.counts()
    assert counts[200] > 50
    assert sum(n for s, n in counts.items() if s != 200) <= 1, counts
    deadline = time.monotonic() + 60
    while len(replica_actor_names("faults", "ImageEncoder")) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)


def test_milvus_outage_fails_fast_then_recovers_without_losing_writes(server_app,
                                                                      milvus_server):
    with httpx.Client(base_url=server_app, timeout=30) as client:
        acknowledged = []
        for i in range(5):
            photo = jpeg_bytes(draw_product("Mugs", "Green", "Dotted", seed=900 + i))
            product = {"id": f"ack-{i}", "title": f"Acknowledged mug {i}"}
            r = client.post("/products", files={"image": ("m.jpg", photo)},
                            data={"product": json.dumps(product)},
                            headers={"Authorization": f"Bearer {FAULTS_KEY}"})
            assert r.status_code == 201
            acknowledged.append(product["id"])
        photo = client.get("/images/ack-0").content

        with Load(server_app, photo, users=3) as load:
            time.sleep(2)
            milvus_server.stop(hard=True)
            stopped = time.monotonic()
            time.sleep(4)
            health = client.get("/healthz")
            time.sleep(2)
            restarting = time.monotonic()
            milvus_server.start()
            restarted = time.monotonic()
            recovered = None
            while time.monotonic() - restarted < 30:
                r = client.post("/search/image", files={"image": ("q.jpg", photo)})
                if r.status_code == 200:
                    recovered = time.monotonic() - restarted
                    break
                time.sleep(0.2)
            time.sleep(1)

        assert health.status_code == 503 and health.headers.get("retry-after")
        # Answered while Milvus was down: sent after it stopped, answered before its restart
        # began (a request sent while the server starts may reach it up, and rightly succeed).
        during = [status for t, status, took in load.outcomes
                  if stopped + 1.5 < t and t + took < restarting]
        assert during, "no request was answered while Milvus was down"
        assert set(during) == {503}
        # Fail fast, no hang: every request sent while it was down got its answer within 2 s.
        sent_down = [took for t, _, took in load.outcomes if stopped + 1.5 < t < restarting - 2.0]
        assert sent_down and max(sent_down) < 2.0
        assert recovered is not None and recovered < 10, recovered
        for product_id in acknowledged:
            assert client.get(f"/products/{product_id}").status_code == 200


def test_logs_and_metrics_show_each_request(service):
    """One structured log line per request (with Serve's request id) and Prometheus metrics."""
    from ray._private.worker import global_worker

    from tests.conftest import METRICS_PORT

    r = httpx.post(f"{service}/search/text", json={"query": "blue cap", "k": 2}, timeout=30)
    request_id = r.headers["x-request-id"]
    bad = httpx.post(f"{service}/search/text", json={"query": ""}, timeout=30)
    bad_id = bad.headers["x-request-id"]
    logs = Path(global_worker.node.get_session_dir_path()) / "logs" / "serve"
    lines = request_log_entries(logs, [request_id, bad_id])
    ok, failed = lines[request_id], lines[bad_id]
    assert ok["route"] == "/search/text" and ok["status"] == 200 and ok["duration_ms"] > 0
    assert ok["modality"] == "text" and ok["k"] == 2 and ok["results"] == 2
    assert failed["status"] == 400 and failed["error"].startswith("empty_query")

    deadline = time.monotonic() + 60
    wanted = ("ray_shopsearch_requests_total", "ray_shopsearch_request_latency_ms_bucket",
              "ray_shopsearch_encoder_batch_size_bucket", "ray_shopsearch_milvus_latency_ms")
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if all(w in text for w in wanted) and 'route="/search/text"' in text:
            break
        time.sleep(2)
    else:
        pytest.fail(f"metrics missing: {[w for w in wanted if w not in text]}")
