"""Past its capacity the service sheds load with fast 503s + Retry-After, never a 500; a Milvus
that stops answering (its calls miss their deadline: gRPC DEADLINE_EXCEEDED) is a 503 too, on
the search routes and on /healthz. One small app on a Milvus Lite server process, with tiny
queues in front of its image encoder."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import httpx
import pytest

from deployments.core.demo import draw_product
from tests.support import LiteServer, free_port, jpeg_bytes, wait_healthy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory):
    server = LiteServer(tmp_path_factory.mktemp("milvus-overload"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_app(service, lite_server, settings_factory, tmp_path_factory):
    """One image-encoder replica that takes 2 requests at a time and queues 2 more (an empty
    catalogue: a search still asks Milvus, and answers 200 with no results)."""
    from ray import serve

    from serve_app.app import build_app

    settings = settings_factory(
        tmp_path_factory.mktemp("overload-app"),
        milvus={"uri": lite_server.uri, "collection": "overload", "read_timeout_s": 0.8},
        image_encoder={"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "num_threads": 1,
                       "max_ongoing_requests": 2, "max_queued_requests": 2},
        image_batching={"max_batch_size": 2, "batch_wait_timeout_s": 0.0},
        demo={"enabled": False, "size": 0},  # the seeder's 16 parallel writes would be shed
    )
    serve.run(build_app(settings), name="overload", route_prefix="/overload")
    url = f"{service}/overload"
    wait_healthy(url)
    yield url
    serve.delete("overload")


async def _burst(url: str, photo: bytes, n: int) -> list[tuple[int, str | None, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=n + 4)) as client:
        async def one() -> tuple[int, str | None, float]:
            start = time.monotonic()
            r = await client.post("/search/image", files={"image": ("q.jpg", photo)})
            return r.status_code, r.headers.get("retry-after"), time.monotonic() - start
        return await asyncio.gather(*(one() for _ in range(n)))


def test_past_capacity_the_service_sheds_with_fast_503s(small_app):
    photo = jpeg_bytes(draw_product("Caps", "Blue", "Solid", seed=5))
    outcomes = asyncio.run(_burst(small_app, photo, 40))
    statuses = Counter(status for status, _, _ in outcomes)
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    assert statuses[200] >= 4 and statuses[503] >= 1, statuses
    shed = [(after, took) for status, after, took in outcomes if status == 503]
    assert all(after for after, _ in shed), "a 503 without Retry-After"
    assert max(took for _, took in shed) < 5.0  # shed at once, not after a long wait


def test_a_hung_milvus_is_a_503_never_a_500(small_app, lite_server):
    photo = jpeg_bytes(draw_product("Mugs", "Red", "Dotted", seed=6))
    with httpx.Client(base_url=small_app, timeout=30) as client:
        assert client.post("/search/image", files={"image": ("q.jpg", photo)}).status_code == 200
        lite_server.proc.send_signal(signal.SIGSTOP)  # up but silent: every call times out
        try:
            answers = [client.post("/search/image", files={"image": ("q.jpg", photo)})
                       for _ in range(3)]
            answers.append(client.post("/search/text", json={"query": "red mug"}))
            answers.append(client.get("/products/p0"))
            health = client.get("/healthz")
        finally:
            lite_server.proc.send_signal(signal.SIGCONT)
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.status_code, r.text)
            assert r.headers.get("retry-after")
            assert r.json()["error"]["code"] in {"backend_unavailable", "timeout", "unavailable"}
        assert health.status_code == 503 and health.headers.get("retry-after"), health.text
        deadline = time.monotonic() + 30
        while client.post("/search/image", files={"image": ("q.jpg", photo)}).status_code != 200:
            assert time.monotonic() < deadline, "did not recover once Milvus answered again"
            time.sleep(0.5)


def test_a_shed_call_is_our_json_503_with_retry_after():
    """Serve answers BackPressureError ahead of the app's own handlers, as plain text without
    Retry-After; the ingress's call wrapper turns it into a BackendUnavailable first."""
    from ray.serve.exceptions import BackPressureError

    from deployments.core.errors import BackendUnavailable
    from deployments.core.settings import ResilienceSettings
    from serve_app import http as serve_http
    from serve_app import resilience

    async def shed():
        raise BackPressureError(num_queued_requests=2, max_queued_requests=2)

    with pytest.raises(BackendUnavailable) as caught:
        asyncio.run(resilience.call(shed, ResilienceSettings()))
    response = serve_http.error_response(caught.value)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert caught.value.code == "overloaded"
