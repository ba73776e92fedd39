"""The whole graph on a local Ray instance, driven over real HTTP."""

from __future__ import annotations

import asyncio
import csv
import json
import time

import httpx
import pytest

from deployments.core.demo import draw_product
from tests.support import jpeg_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def demo_rows(service, tmp_path_factory):
    """The demo products the service indexed (read back from its own catalogue)."""
    with httpx.Client(base_url=service, timeout=60) as c:
        page = c.get("/products", params={"limit": 100}).json()
    return {r["id"]: r for r in page["results"]}


def _image_of(client: httpx.Client, product_id: str) -> bytes:
    r = client.get(f"/images/{product_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    return r.content


def test_healthz_reports_models_and_catalogue(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["products"] >= 48
    assert body["models"] == {"image_dim": 1280, "text_dim": 384}


def test_own_photo_comes_back_first(client, demo_rows):
    # demo-0004 (a white T-shirt among grey-labelled look-alikes) came 4th while its
    # neighbours' colour vote outweighed its exact photo: a copy of a stored photo has the
    # product's own labels (Searcher.same_photo).
    for product_id in ("demo-0004", "demo-0005", "demo-0017", "demo-0033"):
        photo = _image_of(client, product_id)
        r = client.post("/search/image", files={"image": ("p.jpg", photo, "image/jpeg")},
                        params={"k": 5, "explain": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["results"][0]["id"] == product_id
        # `score` is what the list is ranked by: the own product has the top score, scores
        # descend, and explain shows the photo's cosine to itself (~1.0).
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
        assert 0 < scores[0] <= 1
        assert body["results"][0]["explain"]["visual"] == pytest.approx(1.0, abs=1e-3)
        assert body["results"][0]["explain"]["score"] == scores[0]
        assert len(body["results"]) == 5 and body["took_ms"] > 0
        assert body["results"][0]["image_url"] == f"/images/{product_id}"


def test_text_search_finds_described_products(client):
    r = client.post("/search/text", json={"query": "red dress", "k": 3})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]["attributes"]
    assert top["article_type"] == "Dresses" and top["colour"] == "Red"


def test_similar_leaves_out_the_product_itself(client, demo_rows):
    query = client.get("/products/demo-0021").json()["attributes"]  # blue trousers
    r = client.get("/products/demo-0021/similar", params={"k": 4, "explain": "true"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 4 and "demo-0021" not in [x["id"] for x in results]
    # No other blue trousers exist: every result shares the type or the colour.
    for x in results:
        attrs = x["attributes"]
        assert (attrs["article_type"], attrs["colour"]) != (query["article_type"],
                                                            query["colour"])
        assert attrs["article_type"] == query["article_type"] or attrs["colour"] == query[
            "colour"], attrs
    explain = results[0]["explain"]
    assert {"visual", "colour", "article_type", "colour_label", "score"} <= set(explain)
    assert explain["inferred"]["colour"] == "Blue"


def test_upsert_then_find_then_delete(client, auth_headers):
    photo = jpeg_bytes(draw_product("Mugs", "Purple", "Dotted", seed=4242))
    product = {"id": "sku-mug-1", "title": "Test Purple Dotted Mug", "category": "Home",
               "article_type": "Mugs", "colour": "Purple", "price": 9.5,
               "attributes": {"material": "ceramic"}}
    r = client.post("/products", files={"image": ("m.jpg", photo, "image/jpeg")},
                    data={"product": json.dumps(product)}, headers=auth_headers)
    assert r.status_code == 201, r.text
    assert client.get("/products/sku-mug-1").json()["attributes"]["material"] == "ceramic"
    assert client.get("/images/sku-mug-1").content == photo
    found = client.post("/search/image", files={"image": ("q.jpg", photo, "image/jpeg")})
    assert found.json()["results"][0]["id"] == "sku-mug-1"

    assert client.delete("/products/sku-mug-1", headers=auth_headers).status_code == 204
    assert client.get("/products/sku-mug-1").status_code == 404
    assert client.delete("/products/sku-mug-1", headers=auth_headers).status_code == 404
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # searches read with bounded staleness
        again = client.post("/search/image", files={"image": ("q.jpg", photo, "image/jpeg")})
        if "sku-mug-1" not in [x["id"] for x in again.json()["results"]]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("deleted product still returned by search")


def test_browse_pages_through_the_catalogue(client):
    first = client.get("/products", params={"limit": 10, "offset": 0}).json()
    second = client.get("/products", params={"limit": 10, "offset": 10}).json()
    assert first["total"] >= 48 and len(first["results"]) == 10
    assert not {r["id"] for r in first["results"]} & {r["id"] for r in second["results"]}


@pytest.mark.parametrize(("payload", "status", "code"), [
    (b"this is text, not a photo", 415, "unsupported_media_type"),
    (b"", 400, "invalid_image"),
])
def test_bad_uploads_get_a_clear_4xx(client, payload, status, code):
    r = client.post("/search/image", files={"image": ("x.jpg", payload, "image/jpeg")})
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_truncated_jpeg_gets_a_4xx(client):
    photo = _image_of(client, "demo-0001")
    half = photo[: len(photo) // 2]
    r = client.post("/search/image", files={"image": ("x.jpg", half, "image/jpeg")})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "code"), [
    ({"query": "   "}, "empty_query"),
    ({"query": "x" * 5000}, "query_too_long"),
    ({"query": "shoes", "k": 0}, "invalid_k"),
    ({"query": "shoes", "k": 10_000}, "invalid_k"),
    ({"k": 3}, "invalid_request"),
])
def test_bad_text_queries_get_a_clear_4xx(client, body, code):
    r = client.post("/search/text", json=body)
    assert 400 <= r.status_code < 500
    assert r.json()["error"]["code"] == code


def test_bad_product_upsert_names_the_field(client, auth_headers):
    photo = jpeg_bytes(draw_product("Caps", "Red", "Solid", seed=1))
    r = client.post("/products", files={"image": ("c.jpg", photo, "image/jpeg")},
                    data={"product": json.dumps({"id": "bad id with spaces", "title": "x"})},
                    headers=auth_headers)
    assert r.status_code == 400 and "id" in r.json()["error"]["message"]


def test_concurrent_queries_each_get_their_own_answer(service, client):
    """Requests batched together must not get each other's results; a bad one fails alone."""
    ids = [f"demo-{i:04d}" for i in range(0, 48, 3)]
    photos = {i: _image_of(client, i) for i in ids}

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=service, timeout=60) as ac:
            good = [ac.post("/search/image", files={"image": ("p.jpg", photos[i])},
                            params={"k": 1}) for i in ids]
            truncated = photos[ids[0]][: len(photos[ids[0]]) // 2]  # reaches the encoder batch
            bad = ac.post("/search/image", files={"image": ("p.jpg", truncated)})
            *answers, bad_answer = await asyncio.gather(*good, bad)
            return answers, bad_answer

    answers, bad_answer = asyncio.run(run())
    assert [a.json()["results"][0]["id"] for a in answers] == ids
    assert bad_answer.status_code == 400


def test_openapi_documents_the_routes(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/search/image", "/search/text", "/products", "/products/{product_id}",
                  "/products/{product_id}/similar", "/images/{product_id}", "/healthz"):
        assert route in paths


def test_demo_catalogue_matches_its_csv(service, settings_factory, tmp_path):
    from deployments.core.demo import generate_demo_catalog

    rows = list(csv.DictReader(generate_demo_catalog(tmp_path / "d", 48).open()))
    with httpx.Client(base_url=service) as c:
        stored = c.get(f"/products/{rows[10]['id']}").json()
    assert stored["title"] == rows[10]["title"]
    assert stored["attributes"]["colour"] == rows[10]["colour"]


def test_filters_narrow_every_search_route(client):
    photo = _image_of(client, "demo-0005")
    r = client.post("/search/image", files={"image": ("p.jpg", photo)},
                    params={"k": 8, "colour": ["red", "Blue"], "price_max": 200})
    assert r.status_code == 200, r.text
    colours = {x["attributes"]["colour"] for x in r.json()["results"]}
    assert colours and colours <= {"Red", "Blue"}  # "red" matched the catalogue's "Red"

    r = client.post("/search/text", json={"query": "shoes", "k": 5,
                                           "filters": {"article_type": "Sports Shoes"}})
    assert {x["attributes"]["article_type"] for x in r.json()["results"]} == {"Sports Shoes"}

    r = client.get("/products/demo-0005/similar", params={"k": 5, "category": "Footwear"})
    assert {x["attributes"]["category"] for x in r.json()["results"]} == {"Footwear"}

    r = client.get("/products/demo-0005/similar", params={"attr.pattern": "Solid", "k": 30})
    assert {x["attributes"]["pattern"] for x in r.json()["results"]} == {"Solid"}


@pytest.mark.parametrize("params", [{"flavour": "mint"}, {"price_min": "cheap"},
                                    {"colour": 'Red" or id != "'}])
def test_bad_or_hostile_filters_never_widen_results(client, params):
    photo = _image_of(client, "demo-0005")
    r = client.post("/search/image", files={"image": ("p.jpg", photo)}, params=params)
    if r.status_code == 200:  # a hostile value is just a colour nobody has
        assert r.json()["results"] == []
    else:
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_filter"


def test_attributes_lists_values_with_counts(client):
    body = client.get("/attributes").json()
    assert body["colour"]["Red"] >= 1 and "Dresses" in body["article_type"]
    assert sum(body["category"].values()) >= 48
    assert "attr.pattern" in body and "pattern" not in body  # JSON attributes, by filter name


def test_hybrid_search_fuses_photo_and_text(client):
    photo = _image_of(client, "demo-0013")  # a black dress
    only_photo = client.post("/search", files={"image": ("p.jpg", photo)}, params={"k": 5})
    assert only_photo.json()["results"][0]["id"] == "demo-0013"
    for params in ({"k": 5}, {"k": 5, "ranker": "weighted", "image_weight": 0.7}):
        r = client.post("/search", files={"image": ("p.jpg", photo)},
                        data={"query": "black dress"}, params=params)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[0]["id"] == "demo-0013"
        assert all(x["attributes"]["article_type"] == "Dresses" for x in results[:3])
    text_only = client.post("/search", data={"query": "yellow cap"}, params={"k": 3})
    assert text_only.json()["results"][0]["attributes"]["colour"] == "Yellow"
    filtered = client.post("/search", files={"image": ("p.jpg", photo)},
                           data={"query": "dress"}, params={"colour": "Blue", "k": 5})
    assert {x["attributes"]["colour"] for x in filtered.json()["results"]} == {"Blue"}
    assert client.post("/search", params={"k": 5}).json()["error"]["code"] == "empty_query"
    bad = client.post("/search", data={"query": "x"}, params={"ranker": "magic"})
    assert bad.status_code == 422


def test_text_attribute_words_narrow_and_explain(client):
    r = client.post("/search/text", json={"query": "green handbags", "k": 5, "explain": True})
    results = r.json()["results"]
    assert results[0]["id"] == "demo-0042"  # the only green handbag
    assert results[0]["explain"]["recognised"] == {"colour": ["Green"],
                                                   "article_type": ["Handbags"]}
    assert len(results) == 5  # the rest filled from the unfiltered search
    # A field the shopper set wins over the recognised word.
    r = client.post("/search/text", json={"query": "green handbags", "k": 3,
                                           "filters": {"colour": "Red"}})
    assert {x["attributes"]["colour"] for x in r.json()["results"]} == {"Red"}


def test_similar_leaves_out_copies_of_the_same_photo(client, auth_headers):
    photo = _image_of(client, "demo-0007")
    attributes = client.get("/products/demo-0007").json()["attributes"]
    labels = {f: attributes[f] for f in ("category", "article_type", "colour", "gender")}
    copy = {"id": "copy-of-0007", "title": "Same photo, other listing", **labels}
    r = client.post("/products", files={"image": ("c.jpg", photo)},
                    data={"product": json.dumps(copy)}, headers=auth_headers)
    assert r.status_code == 201
    try:
        ids = [x["id"] for x in client.get("/products/demo-0007/similar",
                                           params={"k": 20}).json()["results"]]
        assert "copy-of-0007" not in ids and "demo-0007" not in ids
        searched = client.post("/search/image", files={"image": ("q.jpg", photo)},
                               params={"k": 2}).json()["results"]
        assert {x["id"] for x in searched} == {"demo-0007", "copy-of-0007"}  # search keeps both
    finally:
        client.delete("/products/copy-of-0007", headers=auth_headers)
