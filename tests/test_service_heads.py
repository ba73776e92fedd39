"""A running service picks up a new fit of its catalogue's heads without a restart and without a
failed request (real Ray, real service, the fit through `batch_index.fit` on Ray)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from deployments.core.demo import draw_product
from deployments.core.products import PREDICTED_FIELDS
from tests.support import jpeg_bytes, replica_actor_names, replica_libraries

pytestmark = pytest.mark.integration
# Names the colour and type of the untitled product below: its title says nothing, its photo does.
QUERY = "red dress"


def _wait_heads(url: str, wanted, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/healthz", timeout=10).json()
        version = (body.get("heads") or {}).get("version")
        if version == wanted:
            return body
        time.sleep(0.25)
    raise AssertionError(f"heads {wanted!r} not in use after {timeout} s: {body}")


def _listed_predictions(client: httpx.Client, photo: bytes, timeout: float = 30) -> dict:
    """GET /attributes once its most common predicted colour filters (as the query-string
    name it is listed under, `predicted.colour=<value>`) to exactly its count of products
    (the first 100 when there are more), each predicted so: the recount after a fit's backfill
    runs within seconds."""
    deadline = time.monotonic() + timeout
    while True:
        listed = client.get("/attributes").json()
        colours = listed.get("predicted.colour", {})
        value, count = max(colours.items(), key=lambda item: item[1], default=("", 0))
        found = client.post("/search/image", params={"predicted.colour": value, "k": 100},
                            files={"image": ("q.jpg", photo)}).json()["results"] if value else []
        assert all(x["predicted"]["colour"]["value"] == value for x in found), value
        if value and len(found) == min(count, 100):  # k is at most 100 (limits.max_k)
            return listed
        assert time.monotonic() < deadline, (colours, len(found))
        time.sleep(0.5)


def test_service_picks_up_a_new_fit_without_restart(service, service_settings):
    from batch_index.fit import run_fit
    from batch_index.service import search_handle

    assert httpx.get(f"{service}/healthz", timeout=10).json()["heads"] is None
    before = httpx.post(f"{service}/search/text", json={"query": "red dress", "k": 5},
                        timeout=30).json()
    assert before["heads_version"] is None
    replicas = replica_actor_names("shopsearch", "ProductSearch")

    statuses: list[int] = []
    stop = threading.Event()

    def shop() -> None:  # searches all through the fit and the swap
        photo = (Path(service_settings.demo.dir) / "images" / "demo-0004.jpg").read_bytes()
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post(f"{service}/search/text",
                                            json={"query": "blue mug", "k": 5}).status_code)
                statuses.append(client.post(f"{service}/search/image",
                                            files={"image": ("q.jpg", photo)}).status_code)

    shopper = threading.Thread(target=shop)
    shopper.start()
    try:
        settings = service_settings.model_copy(update={"heads": service_settings.heads.model_copy(
            update={"min_products": 10, "min_field_products": 10, "min_class_products": 2})})
        handle = search_handle()
        heads = run_fit(settings, handle)
        assert heads is not None and heads.projection is not None
        assert {"article_type", "colour"} <= set(heads.attributes)
        health = _wait_heads(service, heads.version)
        assert health["heads"]["fitted_at"] == heads.fitted_at
        time.sleep(1)  # a few more searches with the new heads
    finally:
        stop.set()
        shopper.join()
    assert statuses and set(statuses) == {200}, statuses
    assert replica_actor_names("shopsearch", "ProductSearch") == replicas  # no replica restarted
    # The replicas apply the heads (and backfilled the predictions) with numpy: torch, which
    # only the fit needs, is not loaded in their processes.
    mapped = replica_libraries("shopsearch", "ProductSearch")
    assert len(mapped) == len(replicas) and all(mapped)
    assert not [f for files in mapped for f in files if "libtorch" in f]

    text = httpx.post(f"{service}/search/text", json={"query": "red dress", "k": 5,
                                                       "explain": True}, timeout=30).json()
    assert text["heads_version"] == heads.version
    assert all(r["found_by"] == r["explain"]["found_by"] in ("text", "photo", "both")
               for r in text["results"])
    scores = [r["score"] for r in text["results"]]
    assert scores == sorted(scores, reverse=True)
    query = (Path(service_settings.demo.dir) / "images" / "demo-0007.jpg").read_bytes()
    photo = httpx.post(f"{service}/search/image?explain=true",
                       files={"image": ("q.jpg", query)}, timeout=30).json()
    assert photo["heads_version"] == heads.version
    assert "article_type" in photo["results"][0]["explain"]["predicted"]
    scores = [r["score"] for r in photo["results"]]  # the score it was ranked by
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert photo["results"][0]["explain"]["visual"] > 0.9  # the same photo's cosine
    own = httpx.get(f"{service}/products/demo-0007", timeout=30).json()["attributes"]
    similar = httpx.get(f"{service}/products/demo-0007/similar?explain=true", timeout=30).json()
    assert similar["heads_version"] == heads.version
    predicted = similar["results"][0]["explain"]["predicted"]  # its own labels: known
    assert predicted["article_type"] == [own["article_type"], 1.0]

    # The fit removed: the service searches as without heads again, still without a restart.
    shutil.rmtree(f"{service_settings.heads.dir}/{service_settings.milvus.collection}")
    _wait_heads(service, None)
    after = httpx.post(f"{service}/search/text", json={"query": "red dress", "k": 5},
                       timeout=30).json()
    assert after["heads_version"] is None
    assert [r["id"] for r in after["results"]] == [r["id"] for r in before["results"]]


def test_a_fit_predicts_stored_attributes_and_words_find_untitled_photos(
        service, service_settings, auth_headers):
    """After a fit, every stored product carries predicted attributes with confidence (apart
    from its labels, filterable); a product stored untitled and unlabelled gets them at once
    and a text query finds it through its photo; scores descend."""
    from batch_index.fit import run_fit
    from batch_index.service import search_handle

    settings = service_settings.model_copy(update={"heads": service_settings.heads.model_copy(
        update={"min_products": 10, "min_field_products": 10, "min_class_products": 2})})
    heads = run_fit(settings, search_handle())
    _wait_heads(service, heads.version)
    client = httpx.Client(base_url=service, timeout=60)
    try:
        before = client.get("/products/demo-0007").json()  # stored before the fit: backfilled
        assert {"article_type", "colour"} <= set(before["predicted"])
        assert before["attributes"]["colour"]  # its own label stays apart

        # With no write since, /attributes lists the backfilled predictions under their filter
        # names within seconds, and a listed value filters to as many products as its count.
        listed = _listed_predictions(client, client.get("/images/demo-0007").content)
        assert {"predicted.colour", "predicted.article_type"} <= set(listed)
        predicted = {name for name in listed if name.startswith("predicted.")}
        assert predicted <= {f"predicted.{f}" for f in PREDICTED_FIELDS}

        photo = jpeg_bytes(draw_product("Dresses", "Red", "Solid", seed=9001))
        r = client.post("/products", files={"image": ("u.jpg", photo, "image/jpeg")},
                        data={"product": json.dumps({"id": "untitled-9001",
                                                     "title": "IMG_9001"})},
                        headers=auth_headers)
        assert r.status_code == 201, r.text
        stored = r.json()
        assert "colour" not in stored["attributes"]
        guess = stored["predicted"]["colour"]
        assert guess["value"] and 0 < guess["confidence"] <= 1
        assert client.get("/products/untitled-9001").json()["predicted"] == stored["predicted"]

        # Filterable, in a JSON body and as query parameters.
        found = client.post("/search/text", json={
            "query": "something to wear", "k": 60,
            "filters": {"predicted": {"colour": [guess["value"]]}}}).json()["results"]
        assert "untitled-9001" in [x["id"] for x in found]
        assert all(x["predicted"]["colour"]["value"] == guess["value"] for x in found)
        similar = client.get("/products/demo-0007/similar", params={
            "k": 60, "predicted.colour": guess["value"].lower(),
            "predicted_confidence_min": guess["confidence"]}).json()["results"]
        assert "untitled-9001" in [x["id"] for x in similar]
        assert all(x["predicted"]["colour"]["value"] == guess["value"]
                   and x["predicted"]["colour"]["confidence"] >= guess["confidence"]
                   for x in similar)

        # A just-written prediction is listed at once.
        assert guess["value"] in client.get("/attributes").json()["predicted.colour"]

        # Words find it through its photo: its title says nothing.
        text = client.post("/search/text", json={"query": QUERY, "k": 5,
                                                 "explain": True}).json()
        results = {x["id"]: x for x in text["results"]}
        assert "untitled-9001" in results, [x["id"] for x in text["results"]]
        mine = results["untitled-9001"]
        assert mine["found_by"] == mine["explain"]["found_by"] == "photo", mine["explain"]
        assert mine["explain"]["photo"] > mine["explain"]["text"]
        scores = [x["score"] for x in text["results"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
        assert text["heads_version"] == heads.version
    finally:
        client.delete("/products/untitled-9001", headers=auth_headers)
        client.close()
        shutil.rmtree(f"{service_settings.heads.dir}/{service_settings.milvus.collection}")
        _wait_heads(service, None)
