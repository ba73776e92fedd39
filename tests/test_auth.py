"""Only the shop changes the catalogue: writes need a bearer key, search stays public.

Unit tests of serve_app.auth and the settings, then the real service: the shared test service
(no key configured, so it generated its admin key file) and two extra ingresses in front of the
same encoders and store, one with keys from SHOPSEARCH_API_KEYS and one read-only.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import stat
import threading
from pathlib import Path

import httpx
import pytest

from deployments.core.demo import draw_product
from deployments.core.errors import Forbidden, Unauthorized
from deployments.core.settings import AppSettings, AuthSettings
from serve_app import auth
from serve_app.http import error_response
from tests.support import jpeg_bytes

ENV_KEYS = ("env-key-one-7f3a", "env-key-two-91bc")


# -- unit: keys, key file, comparison ----------------------------------------------------------
def test_env_var_parsing():
    parse = auth.api_keys_from_env
    assert parse({"SHOPSEARCH_API_KEYS": " k1, k2 ,,k1, "}) == ["k1", "k2"]
    assert parse({"SHOPSEARCH_API_KEYS": ""}) == [] and parse({}) == []
    assert auth.API_KEYS_ENV == "SHOPSEARCH_API_KEYS"


def test_settings_add_env_keys_to_config_keys_without_clashing(monkeypatch):
    monkeypatch.setenv("SHOPSEARCH_API_KEYS", "from-env,from-config")
    s = AppSettings(auth={"api_keys": ["from-config"]})  # extra="forbid" does not object
    assert [k.get_secret_value() for k in s.auth.api_keys] == ["from-config", "from-env"]
    assert "from-env" not in repr(s) and "from-env" not in str(s.auth)  # SecretStr
    monkeypatch.delenv("SHOPSEARCH_API_KEYS")
    assert AppSettings().auth.api_keys == [] and AppSettings().auth.key_file == "./data/admin_key"
    with pytest.raises(ValueError):
        AuthSettings(api_keys=["a,b"])


def test_key_file_is_created_once_with_mode_0600(tmp_path):
    path = tmp_path / "state" / "admin_key"
    key, created = auth.load_or_create_key(path)
    assert created and len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key
    assert auth.load_or_create_key(path) == (key, False)  # a restarted replica reuses it
    assert [p.name for p in path.parent.iterdir()] == ["admin_key"]  # no temp file left


def test_concurrent_replicas_agree_on_one_key(tmp_path):
    path = tmp_path / "admin_key"
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(auth.load_or_create_key(path)[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and path.read_text().strip() == keys[0]


def test_authenticator_checks_the_bearer_key_against_every_key(monkeypatch):
    a = auth.Authenticator(AuthSettings(api_keys=["first-key", "second-key"]))
    assert a.check("Bearer second-key") == auth.key_id("second-key")
    assert a.check("bearer first-key") == auth.key_id("first-key")
    for header, code in ((None, "missing_credentials"), ("", "missing_credentials"),
                         ("Bearer ", "missing_credentials"),
                         ("Basic Zmlyc3Qta2V5", "missing_credentials"),
                         ("first-key", "missing_credentials"), ("Bearer first-ke", "invalid_key"),
                         ("Bearer first-key2", "invalid_key"), ("Bearer FIRST-KEY", "invalid_key")):
        with pytest.raises(Unauthorized) as info:
            a.check(header)
        assert info.value.code == code, header
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    a.check("Bearer first-key")  # matches the first key, still compared with both
    assert len(calls) == 2


def test_read_only_refuses_every_write(tmp_path):
    a = auth.Authenticator(AuthSettings(read_only=True, key_file=str(tmp_path / "k")))
    with pytest.raises(Forbidden):
        a.check("Bearer anything")
    assert not (tmp_path / "k").exists()  # no key is created for a read-only service


def test_generated_key_is_logged_by_place_and_id_never_itself(tmp_path, caplog):
    path = tmp_path / "admin_key"
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        a = auth.Authenticator(AuthSettings(key_file=str(path)))
    key = path.read_text().strip()
    assert a.check(f"Bearer {key}") == auth.key_id(key)
    assert str(path) in caplog.text and auth.key_id(key) in caplog.text
    assert key not in caplog.text


def test_auth_errors_map_to_401_and_403_with_the_usual_body():
    missing = error_response(Unauthorized("send a key", code="missing_credentials"))
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = error_response(Unauthorized("bad key", code="invalid_key"))
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers[
        "www-authenticate"]
    assert json.loads(wrong.body) == {"error": {"code": "invalid_key", "message": "bad key"}}
    assert error_response(Forbidden("read-only", code="read_only")).status_code == 403


def test_client_key_reads_the_env_var_then_the_key_file(tmp_path, monkeypatch):
    path = tmp_path / "admin_key"
    monkeypatch.delenv("SHOPSEARCH_API_KEYS", raising=False)
    assert auth.client_key(path) is None and auth.write_headers(path) == {}
    path.write_text("file-key\n")
    assert auth.write_headers(path) == {"Authorization": "Bearer file-key"}
    monkeypatch.setenv("SHOPSEARCH_API_KEYS", "env-a,env-b")
    assert auth.client_key(path) == "env-a"


# -- the real service ---------------------------------------------------------------------------
def _photo(seed: int) -> bytes:
    return jpeg_bytes(draw_product("Mugs", "Purple", "Striped", seed=seed))


def _upsert(client: httpx.Client, product_id: str, headers: dict | None = None,
            title: str = "Auth test mug", seed: int = 7) -> httpx.Response:
    product = {"id": product_id, "title": title, "category": "Home", "article_type": "Mugs",
               "colour": "Purple", "price": 4.5}
    return client.post("/products", files={"image": ("m.jpg", _photo(seed), "image/jpeg")},
                       data={"product": json.dumps(product)}, headers=headers or {})


def _total(client: httpx.Client) -> int:
    return client.get("/products", params={"limit": 1}).json()["total"]


def _ray_logs() -> Path:
    from ray._private.worker import global_worker

    return Path(global_worker.node.get_session_dir_path()) / "logs"


def _logs_containing(secret: str) -> list[Path]:
    return [p for p in _ray_logs().rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
            and secret in p.read_text(errors="ignore")]


def _assert_401(r: httpx.Response, code: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.mark.integration
def test_generated_admin_key_file_is_private(service, service_settings, admin_key):
    path = Path(service_settings.auth.key_file)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(admin_key) >= 32


@pytest.mark.integration
def test_writes_without_a_valid_key_get_401_and_change_nothing(client, auth_headers):
    before = _total(client)
    original = client.get("/products/demo-0003").json()
    original_photo = client.get("/images/demo-0003").content

    _assert_401(_upsert(client, "auth-sneaky"), "missing_credentials")
    _assert_401(_upsert(client, "auth-sneaky", {"Authorization": "Bearer not-the-key"}),
                "invalid_key")
    _assert_401(_upsert(client, "auth-sneaky", {"Authorization": "Basic YWRtaW46YWRtaW4="}),
                "missing_credentials")
    # Overwriting an existing product is refused too.
    hijack = _upsert(client, "demo-0003", {"Authorization": "Bearer wrong"}, title="Hijacked")
    _assert_401(hijack, "invalid_key")
    _assert_401(client.delete("/products/demo-0003"), "missing_credentials")
    _assert_401(client.delete("/products/demo-0003", headers={"Authorization": "Bearer x"}),
                "invalid_key")
    # The key in another place than the Authorization header is not a credential.
    _assert_401(client.delete("/products/demo-0003",
                              params={"api_key": auth_headers["Authorization"][7:]}),
                "missing_credentials")

    assert client.get("/products/auth-sneaky").status_code == 404
    assert client.get("/products/demo-0003").json() == original
    assert client.get("/images/demo-0003").content == original_photo
    assert _total(client) == before


@pytest.mark.integration
def test_the_right_key_writes(client, auth_headers):
    before = _total(client)
    r = _upsert(client, "auth-ok-1", auth_headers)
    assert r.status_code == 201, r.text
    assert client.get("/products/auth-ok-1").json()["title"] == "Auth test mug"
    assert _total(client) == before + 1
    assert client.delete("/products/auth-ok-1", headers=auth_headers).status_code == 204
    assert client.get("/products/auth-ok-1").status_code == 404


@pytest.mark.integration
def test_search_and_browsing_need_no_key(client):
    photo = client.get("/images/demo-0005").content
    for method, path, kwargs in [
        ("GET", "/", {}), ("GET", "/static/app.js", {}), ("GET", "/static/app.css", {}),
        ("GET", "/healthz", {}), ("GET", "/docs", {}), ("GET", "/openapi.json", {}),
        ("GET", "/attributes", {}), ("GET", "/products", {}), ("GET", "/products/demo-0005", {}),
        ("GET", "/products/demo-0005/similar", {}), ("GET", "/images/demo-0005", {}),
        ("POST", "/search/text", {"json": {"query": "red dress"}}),
        ("POST", "/search/image", {"files": {"image": ("q.jpg", photo)}}),
        ("POST", "/search", {"data": {"query": "blue cap"}}),
    ]:
        r = client.request(method, path, **kwargs)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])


@pytest.mark.integration
def test_openapi_marks_only_the_writes_as_needing_a_key(client):
    paths = client.get("/openapi.json").json()["paths"]
    secured = {(p, m) for p, ops in paths.items() for m, op in ops.items() if op.get("security")}
    assert secured == {("/products", "post"), ("/products/{product_id}", "delete")}


@pytest.mark.integration
def test_the_page_has_no_write_controls(client):
    page = client.get("/").text + client.get("/static/app.js").text
    assert "DELETE" not in page and "Authorization" not in page and "admin_key" not in page
    assert "method: \"PUT\"" not in page


@pytest.mark.integration
def test_keys_never_reach_the_logs(client, auth_headers, admin_key):
    assert _upsert(client, "auth-log-1", auth_headers).status_code == 201
    assert client.delete("/products/auth-log-1", headers=auth_headers).status_code == 204
    logs = _ray_logs()
    assert not _logs_containing(admin_key)
    lines = "".join(p.read_text(errors="ignore")
                    for p in (logs / "serve").glob("replica_shopsearch_SearchAPI_*.log"))
    assert auth.key_id(admin_key) in lines  # the request line names the key by its id


@pytest.fixture(scope="module")
def env_keys_app(ingress_app):
    """An ingress whose keys come from SHOPSEARCH_API_KEYS (two at once, as during rotation)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHOPSEARCH_API_KEYS", ", ".join(ENV_KEYS))
        return ingress_app("auth-env")


@pytest.mark.integration
def test_keys_from_the_env_var_work_on_the_real_service(env_keys_app, auth_headers, client):
    before = _total(client)
    with httpx.Client(base_url=env_keys_app, timeout=60) as c:
        # The shared service's generated key is not a key of this one.
        _assert_401(_upsert(c, "auth-env-1", auth_headers), "invalid_key")
        _assert_401(_upsert(c, "auth-env-1"), "missing_credentials")
        assert client.get("/products/auth-env-1").status_code == 404
        first, second = ({"Authorization": f"Bearer {k}"} for k in ENV_KEYS)
        assert _upsert(c, "auth-env-1", first).status_code == 201
        assert client.get("/products/auth-env-1").json()["title"] == "Auth test mug"
        assert _total(client) == before + 1
        assert c.delete("/products/auth-env-1", headers=second).status_code == 204
        assert client.get("/products/auth-env-1").status_code == 404
    assert not [k for k in ENV_KEYS if _logs_containing(k)]


@pytest.mark.integration
def test_configured_keys_mean_no_key_file(env_keys_app, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert not list(base.glob("auth-env*/admin_key"))
    assert "SHOPSEARCH_API_KEYS" not in os.environ  # the fixture's env change did not leak


@pytest.fixture(scope="module")
def read_only_app(ingress_app):
    return ingress_app("auth-ro", auth={"read_only": True, "api_keys": ["ro-key"]})


@pytest.mark.integration
def test_read_only_service_refuses_writes_and_still_searches(read_only_app, client):
    before = _total(client)
    with httpx.Client(base_url=read_only_app, timeout=60) as c:
        for headers in ({}, {"Authorization": "Bearer ro-key"}, {"Authorization": "Bearer x"}):
            r = _upsert(c, "auth-ro-1", headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text
            r = c.delete("/products/demo-0004", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "read_only", r.text
        assert c.post("/search/text", json={"query": "red dress"}).status_code == 200
        assert c.get("/products/demo-0004").status_code == 200
    assert client.get("/products/auth-ro-1").status_code == 404
    assert _total(client) == before
