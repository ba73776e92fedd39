"""A security pass over the HTTP surface, one test per finding: no path traversal on any route
that takes a name or id, error bodies without stack traces or server paths, request bodies
bounded before they are read (multipart and JSON, declared or streamed), no CORS unless
configured."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.core.errors import BackendUnavailable
from serve_app import http as serve_http

LEAKS = ("Traceback", "/work", "site-packages", ".py", "/home/", "/tmp/", 'File "')
TRAVERSALS = [
    "/static/..%2fingress.py", "/static/..%2Fingress.py", "/static/%2e%2e/ingress.py",
    "/static/%2e%2e%2fingress.py", "/static/../ingress.py", "/static/..%5cingress.py",
    "/static/%252e%252e%252fingress.py", "/static/....//ingress.py",
    "/static/.%2e/.%2e/serve_app/ingress.py", "/static/%2fetc%2fpasswd", "/static//etc/passwd",
    "/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "/static/..", "/static/%2e%2e",
    "/static/app.js%00.txt", "/static/..%2fweb%2findex.html",
    "/products/..", "/products/%2e%2e", "/products/..%2f..%2fetc%2fpasswd", "/products/a%2fb",
    "/products/demo-0001%2f..%2fdemo-0002", "/products/.demo-0001", "/products/%2e%2e/similar",
    "/products/..%2fdemo-0001/similar", "/products/a%2fb/similar", "/images/..",
    "/images/%2e%2e", "/images/..%2f..%2fetc%2fpasswd", "/images/demo-0001%2f..%2f..%2fx",
    "/images/..%5c..%5cetc%5cpasswd", "/images/%2e%2e%2fmedia", "/images/demo-0001%00",
]


def _raw(base: str, method: str, path: str, headers: dict | None = None,
         body: bytes | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request with the path sent exactly as written (httpx would normalise `..`)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(method, url.path.rstrip("/") + path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _assert_clean_error(status: int, headers: dict, body: bytes, where: str) -> None:
    assert 400 <= status < 500, (where, status, body[:200])
    assert headers.get("content-type", "").startswith("application/json"), (where, headers)
    error = json.loads(body)["error"]
    assert error["code"] and error["message"], where
    text = body.decode()
    assert not [leak for leak in LEAKS if leak in text], (where, text)


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


# -- path traversal ------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_path_traversal_on_any_name_or_id(service, path):
    for method in ("GET", "DELETE") if path.startswith("/products/") and "similar" not in path \
            else ("GET",):
        status, headers, body = _raw(service, method, path)
        assert status in (400, 401, 404), (method, path, status, body[:200])
        _assert_clean_error(status, headers, body, f"{method} {path}")
        text = body.decode()
        for secret in ("SearchAPI", "import ", "root:", "<html", "function "):
            assert secret not in text, (path, text[:200])


@pytest.mark.integration
def test_static_files_still_served(service):
    status, headers, body = _raw(service, "GET", "/static/app.js")
    assert status == 200 and b"function" in body


# -- error bodies --------------------------------------------------------------------------------
@pytest.mark.integration
def test_error_bodies_carry_no_traces_or_paths(client):
    photo = client.get("/images/demo-0001").content
    provoked = [
        client.get("/nowhere"), client.put("/search/text", json={"query": "x"}),
        client.post("/search/text", content=b"{not json",
                    headers={"content-type": "application/json"}),
        client.post("/search/text", json={"query": ["a"]}),
        client.post("/search/text", json={"query": "x", "filters": {"colour": {"$ne": 1}}}),
        client.post("/search/image", files={"image": ("x.jpg", b"GIF89a-not-really")}),
        client.post("/search/image", files={"image": ("x.jpg", photo[: len(photo) // 3])}),
        client.post("/search/image", files={"image": ("x.jpg", photo)},
                    params={"attr.a b": "x"}),
        client.get("/products/no-such-id"), client.get("/images/no-such-id"),
        client.get("/products", params={"limit": "many"}),
        client.get("/static/no-such-file.js"),
        client.post("/products", files={"image": ("x.jpg", photo)}, data={"product": "{"}),
        client.delete("/products/demo-0001"),
        client.post("/search/text", content=b"x" * 100_000,
                    headers={"content-type": "application/json"}),
    ]
    for r in provoked:
        _assert_clean_error(r.status_code, dict(r.headers), r.content, str(r.request.url))


def test_unexpected_failures_are_a_json_500_without_details():
    api = FastAPI()
    serve_http.install(api)

    @api.get("/boom")
    async def boom():
        raise RuntimeError('Traceback: File "/work/main/serve_app/secret.py", line 1')

    with TestClient(api, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal error"}}


def test_backend_error_text_with_paths_is_not_passed_on():
    r = serve_http.error_response(BackendUnavailable(
        "Milvus unreachable: Open local milvus failed: /work/main/data/milvus.db/x.py"))
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "/work" not in r.body.decode() and ".py" not in r.body.decode()
    ok = serve_http.error_response(BackendUnavailable("Milvus unreachable: timed out"))
    assert b"Milvus unreachable: timed out" in ok.body  # a plain message is kept


# -- body limits ---------------------------------------------------------------------------------
@pytest.mark.integration
def test_oversized_json_is_refused_from_its_content_length(client):
    body = json.dumps({"query": "red dress", "pad": "x" * 70_000}).encode()
    r = client.post("/search/text", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    small = client.post("/search/text", json={"query": "red dress", "k": 2})
    assert small.status_code == 200


@pytest.mark.integration
def test_a_streamed_body_is_cut_off_at_the_limit(client):
    def chunks():  # chunked transfer: no Content-Length to judge by
        yield b'{"query": "red dress", "pad": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    r = client.post("/search/text", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text


@pytest.mark.integration
def test_a_huge_declared_body_is_refused_before_it_is_sent(service):
    """Content-Length says 1 GB and no byte of it is sent: the answer comes at once."""
    for content_type in ("application/json", "multipart/form-data; boundary=x"):
        start = time.monotonic()
        status, headers, body = _raw(service, "POST", "/search/image" if "multipart" in
                                     content_type else "/search/text",
                                     headers={"Content-Type": content_type,
                                              "Content-Length": str(10**9)}, timeout=20)
        assert status == 413, (content_type, status, body[:200])
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert time.monotonic() - start < 10


@pytest.mark.integration
def test_upload_over_the_limit_is_refused(client, service_settings):
    limits = service_settings.limits
    size = limits.max_upload_bytes + limits.max_form_overhead_bytes + 1024
    r = client.post("/search/image", files={"image": ("x.jpg", b"\xff" * size)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


@pytest.fixture(scope="module")
def locked_app(ingress_app):
    """An ingress with small body limits and one CORS origin configured."""
    return ingress_app("locked", limits={"max_upload_bytes": 40_000, "max_json_bytes": 2048,
                                         "max_form_overhead_bytes": 2048},
                       http={"cors_origins": ["https://shop.example"]},
                       auth={"api_keys": ["locked-key"]})


@pytest.mark.integration
def test_configured_limits_bound_multipart_and_json(locked_app, client):
    photo = client.get("/images/demo-0005").content
    assert len(photo) < 40_000
    with httpx.Client(base_url=locked_app, timeout=60) as c:
        ok = c.post("/search/image", files={"image": ("q.jpg", photo)}, params={"k": 1})
        assert ok.status_code == 200 and ok.json()["results"][0]["id"] == "demo-0005"
        big = c.post("/search/image", files={"image": ("q.jpg", photo + b"\0" * 45_000)})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"

        def parts():  # a multipart body streamed past the limit
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'
            for _ in range(30):
                yield b"\0" * 2048
            yield b"\r\n--b--\r\n"

        streamed = c.post("/search/image", content=parts(),
                          headers={"content-type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413, streamed.text
        # A write with a valid key is bounded the same way.
        write = c.post("/products", files={"image": ("q.jpg", b"\0" * 50_000)},
                       data={"product": json.dumps({"id": "locked-1", "title": "t"})},
                       headers={"Authorization": "Bearer locked-key"})
        assert write.status_code == 413
        assert c.post("/search/text", json={"query": "x" * 3000}).status_code == 413
        assert c.post("/search/text", json={"query": "red dress"}).status_code == 200
    assert client.get("/products/locked-1").status_code == 404


# -- CORS ----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_no_cors_headers_unless_configured(client):
    origin = {"Origin": "https://evil.example"}
    r = client.get("/products", headers=origin)
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]
    pre = client.options("/products", headers={**origin, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization"})
    assert not [h for h in pre.headers if h.lower().startswith("access-control-")]


@pytest.mark.integration
def test_configured_cors_origin_only(locked_app):
    with httpx.Client(base_url=locked_app, timeout=60) as c:
        r = c.get("/products", headers={"Origin": "https://shop.example"})
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        pre = c.options("/products", headers={"Origin": "https://shop.example",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        other = c.get("/products", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
