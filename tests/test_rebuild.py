"""Versioned collections: provenance, the alias, model-routed search, and a rebuild into a new
model swapped in under load (issue 14)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployments.core.errors import BackendUnavailable, IncompatibleStore
from deployments.core.settings import ImageModelSettings, MilvusSettings, TextModelSettings
from deployments.core.store import ProductStore
from deployments.core.versions import (
    EncoderIdentity,
    Provenance,
    VersionAdmin,
    VersionRouter,
    image_model_id,
)
from tests.support import LiteServer, free_port, perturbed_checkpoint, wait_healthy, write_config

REBUILD_KEY = "rebuild-app-write-key"
A = EncoderIdentity(image_model="model-a", image_dim=8, text_model="text", text_dim=4)
B = A.model_copy(update={"image_model": "model-b"})


class FakeSearcher:
    """Stands in for Searcher: the router only needs something per collection."""

    def __init__(self, store: ProductStore) -> None:
        self.collection = store.collection


def _router(tmp_path: Path, identity: EncoderIdentity = A) -> VersionRouter:
    store = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="catalog",
                                        index_type="FLAT", index_params={}))
    router = VersionRouter(store, FakeSearcher)
    router.start(identity, ImageModelSettings(model_name="a"), TextModelSettings())
    return router


def _add_version(router: VersionRouter, identity: EncoderIdentity) -> str:
    admin = VersionAdmin(router.store)
    provenance = Provenance(image_model=identity.image_model, image_dim=identity.image_dim,
                            text_model=identity.text_model, text_dim=identity.text_dim)
    return admin.create_next(provenance.model_dump(), identity.image_dim, identity.text_dim)


def test_a_fresh_store_gets_v1_behind_the_alias_with_its_provenance(tmp_path):
    router = _router(tmp_path)
    assert router.target() == "catalog__v1"
    assert router.store.alias_target() == "catalog__v1"
    made = router.provenance("catalog__v1")
    assert (made.image_model, made.image_dim, made.text_model, made.text_dim) == (
        "model-a", 8, "text", 4)
    assert made.version == 1 and made.schema_version >= 2 and made.created_at
    assert made.index["type"] == "FLAT" and made.fit_artifact is None
    versions = VersionAdmin(router.store).versions()
    assert [(v["collection"], v["live"]) for v in versions] == [("catalog__v1", True)]


def test_a_store_made_by_another_model_is_refused_naming_the_fix(tmp_path):
    _router(tmp_path).store.close()
    store = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="catalog"))
    with pytest.raises(IncompatibleStore) as refused:
        VersionRouter(store, FakeSearcher).start(B)
    message = refused.value.message
    assert "'model-a'" in message and "'model-b'" in message
    assert "batch_index rebuild" in message and "swap" in message
    assert refused.value.code == "model_mismatch"


def test_a_store_made_before_provenance_keeps_working(tmp_path):
    store = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="old"))
    store.ensure_collection(8, 4)  # how every earlier version created its collection
    router = VersionRouter(store, FakeSearcher)
    assert router.start(B) == "old"
    assert router.provenance("old") is None
    assert router.for_query("model-b").collection == "old"
    assert VersionAdmin(store).versions()[0]["provenance"] is None


def test_queries_go_to_the_version_of_their_model_and_writes_to_the_live_one(tmp_path):
    router = _router(tmp_path)
    v2 = _add_version(router, B)
    assert v2 == "catalog__v2"
    assert router.for_query("model-a").collection == "catalog__v1"
    assert router.for_query("model-b").collection == "catalog__v2"  # not mixed with v1
    assert router.for_query("").collection == "catalog__v1"  # text: the alias target
    with pytest.raises(BackendUnavailable):
        router.for_query("model-c")
    with pytest.raises(BackendUnavailable):  # a write embedded by B while v1 is live: retry
        router.for_write("model-b")
    assert router.for_write("model-a").collection == "catalog__v1"
    VersionAdmin(router.store).point(v2)
    assert router.refresh() == "catalog__v2"
    assert router.for_write("model-b").collection == "catalog__v2"
    assert router.for_query("model-a").collection == "catalog__v1"  # old replicas, old index
    with pytest.raises(IncompatibleStore):
        VersionAdmin(router.store).drop(v2)  # never the live one


# -- the whole flow on local Ray, a Milvus server and Serve ------------------------------------
class ShopperLoad:
    """Shoppers searching by the photos of known products; each answer is checked: the product
    itself must come back with an image cosine ~1 (explain's `visual`; a query vector searched
    against another model's vectors scores about 0.2), so a mixed answer cannot pass."""

    def __init__(self, url: str, photos: dict[str, bytes], users: int = 2,
                 timeout: float = 30) -> None:
        self.url, self.photos, self.users, self.timeout = url, photos, users, timeout
        self.outcomes: Counter = Counter()
        self.bad: list[str] = []
        self.events: list[tuple[float, str]] = []  # (start, outcome) of every request
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, args=(u,)) for u in range(users)]

    def _user(self, uid: int) -> None:
        ids = sorted(self.photos)
        n = uid
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                pid = ids[n % len(ids)]
                n += self.users
                began = time.monotonic()
                try:
                    r = client.post("/search/image", params={"k": 5, "explain": "true"},
                                    files={"image": ("p.jpg", self.photos[pid])})
                except httpx.HTTPError as exc:
                    self._note(began, "error", repr(exc))
                    continue
                if r.status_code != 200:
                    self._note(began, str(r.status_code), r.text[:200])
                    continue
                scores = {h["id"]: h["explain"]["visual"] for h in r.json()["results"]}
                if scores.get(pid, 0) > 0.99:
                    self._note(began, "ok")
                else:
                    self._note(began, "mixed", f"{pid}: {scores}")

    def _note(self, began: float, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        self.events.append((began, outcome))
        if detail:
            self.bad.append(f"{outcome} {detail}")

    def between(self, begin: float, end: float) -> Counter:
        """Outcomes of the requests started in [begin, end)."""
        return Counter(o for t, o in self.events if begin <= t < end)

    def __enter__(self) -> ShopperLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _connect(settings: MilvusSettings) -> ProductStore:
    """A store on the Lite server; one retry (a fresh gRPC channel is sometimes turned away
    with "Too many pings" while the server is busy with the service's own connections)."""
    try:
        return ProductStore(settings)
    except BackendUnavailable:
        time.sleep(2)
        return ProductStore(settings)


def _top(client: httpx.Client, photo: bytes) -> list[str]:
    r = client.post("/search/image", params={"k": 3}, files={"image": ("p.jpg", photo)})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


@pytest.mark.integration
def test_rebuild_into_a_new_model_and_swap_under_load(service, settings_factory,
                                                      tmp_path_factory, capsys):
    from ray import serve

    from batch_index.__main__ import main as batch_index
    from deployments.core.demo import draw_product
    from serve_app.app import build_app
    from tests.support import jpeg_bytes

    root = tmp_path_factory.mktemp("rebuild")
    server = LiteServer(root / "milvus", free_port())
    server.start()
    try:
        v1_settings = settings_factory(
            root, milvus={"uri": server.uri, "collection": "catalog"},
            demo={"enabled": True, "size": 24, "dir": str(root / "demo")},
            auth={"api_keys": [REBUILD_KEY]},
            # Small reservations: during the encoder rollout every deployment surges (old and new
            # replicas side by side) next to the shared test service, on 2 CPUs.
            image_encoder={"num_cpus": 0.1, "num_threads": 1, "max_replicas": 1},
            text_encoder={"num_cpus": 0.1, "num_threads": 1, "max_replicas": 1},
            search={"num_cpus": 0.05, "max_ongoing_requests": 64},
            ingress={"num_cpus": 0.05, "max_ongoing_requests": 64})
        weights = perturbed_checkpoint(root / "perturbed.pt")
        v2_settings = v1_settings.model_copy(update={"image_model": v1_settings.image_model
                                                     .model_copy(update={"weights": str(weights)})})
        config = write_config(root / "config.yaml", v1_settings)
        serve.run(build_app(v1_settings), name="rebuild", route_prefix="/rebuild")
        url = f"{service}/rebuild"
        wait_healthy(url, products=24)
        auth = {"Authorization": f"Bearer {REBUILD_KEY}"}
        client = httpx.Client(base_url=url, timeout=60)
        listed = client.get("/products", params={"limit": 100}).json()
        ids = sorted(p["id"] for p in listed["results"])
        photos = {pid: client.get(f"/images/{pid}").content for pid in ids}
        before = {pid: _top(client, photos[pid]) for pid in ids[:4]}
        assert client.get("/healthz").json()["version"]["collection"] == "catalog__v1"

        searched = {pid: photos[pid] for pid in ids[:12] if pid != ids[6]}  # ids[6]: deleted
        new_photo = jpeg_bytes(draw_product("Mugs", "Green", "Dotted", seed=9999))
        changed = {"id": ids[5], "title": "Renamed during the rebuild", "colour": "Green"}
        with ShopperLoad(url, searched) as load:
            started = time.monotonic()
            rebuild = threading.Thread(target=lambda: results.append(batch_index(
                ["rebuild", "--config", str(config), "--image-weights", str(weights)])))
            results: list[int] = []
            rebuild.start()
            # Writes accepted while the rebuild runs (against the live v1): one while it embeds,
            # the rest after it has read the catalogue, so only swap's catch-up can bring them.
            r = client.post("/products", headers=auth, files={"image": ("c.jpg", photos[ids[5]])},
                            data={"product": json.dumps(changed)})
            assert r.status_code == 201, r.text
            rebuild.join()
            assert results == [0]
            r = client.post("/products", headers=auth, files={"image": ("n.jpg", new_photo)},
                            data={"product": json.dumps({
                                "id": "added-during-rebuild", "title": "New green mug",
                                "article_type": "Mugs", "colour": "Green"})})
            assert r.status_code == 201, r.text
            assert client.delete(f"/products/{ids[6]}", headers=auth).status_code == 204
            capsys.readouterr()
            swap_began = time.monotonic()
            assert batch_index(["swap", "--config", str(config)]) == 0
            swapped = time.monotonic()
            out = capsys.readouterr().out
            caught_up = json.loads(out.split("catch-up ")[1].split(" (")[0])
            after_swap = json.loads(out.split("after-swap ")[1].splitlines()[0])
            # The encoders switch to the new model: a rolling update of the graph.
            serve.run(build_app(v2_settings), name="rebuild", route_prefix="/rebuild")
            switched = time.monotonic()
            time.sleep(3)
        assert caught_up["embedded"] >= 1 and caught_up["deleted"] == 1, caught_up
        assert after_swap["embedded"] == after_swap["deleted"] == 0  # no writes came meanwhile
        assert load.outcomes["ok"] > 20, load.outcomes
        assert "mixed" not in load.outcomes, load.bad[:5]  # never another model's answer
        during_swap = load.between(swap_began, switched + 3)
        assert set(during_swap) == {"ok"}, (during_swap, load.bad[:5])  # zero failed
        # Before the swap the rebuild shares 2 CPUs with this load: a request may run out of
        # its time budget (503 timeout, retryable), which is reported, never a wrong answer.
        assert set(load.outcomes) <= {"ok", "503"}, (load.outcomes, load.bad[:5])
        print(f"rebuild start to swap: {swapped - started:.1f} s; swap {swapped - swap_began:.1f}"
              f" s; encoder rollout {switched - swapped:.1f} s; answers {dict(load.outcomes)}; "
              f"during swap + rollout {dict(during_swap)}")

        health = client.get("/healthz").json()
        assert health["version"]["collection"] == "catalog__v2"
        assert health["version"]["image_model"] == image_model_id(v2_settings.image_model)
        # The writes made during the rebuild are in v2 (re-embedded by the new model).
        assert client.get("/products/added-during-rebuild").status_code == 200
        assert client.get(f"/products/{ids[5]}").json()["title"] == changed["title"]
        assert client.get(f"/products/{ids[6]}").status_code == 404
        r = client.post("/search/image", params={"k": 5, "explain": "true"},
                        files={"image": ("n.jpg", new_photo)})
        scores = {h["id"]: h["explain"]["visual"] for h in r.json()["results"]}
        assert scores.get("added-during-rebuild", 0) > 0.99, scores  # embedded by the new model
        store = _connect(v1_settings.milvus)
        admin = VersionAdmin(store)
        v2_ids = set(admin.fingerprints("catalog__v2"))
        assert "added-during-rebuild" in v2_ids and ids[6] not in v2_ids
        made = admin.provenance("catalog__v2")
        assert made["image_model"] == image_model_id(v2_settings.image_model)
        assert made["image_settings"]["weights"] == str(weights)

        # Rollback: the alias back to v1, the encoders back to the old model; v1's answers.
        assert batch_index(["rollback", "--config", str(config)]) == 0
        with ShopperLoad(url, searched) as load:
            serve.run(build_app(v1_settings), name="rebuild", route_prefix="/rebuild")
            time.sleep(2)
        assert set(load.outcomes) == {"ok"}, (load.outcomes, load.bad[:5])
        assert client.get("/healthz").json()["version"]["collection"] == "catalog__v1"
        for pid, top in before.items():
            assert _top(client, photos[pid])[0] == top[0]

        # gc keeps the newest version and the live one (rolled back to: v1).
        assert batch_index(["gc", "--keep", "1", "--config", str(config)]) == 0
        assert [v["collection"] for v in admin.versions()] == ["catalog__v1", "catalog__v2"]
        store.close()
        client.close()
    finally:
        serve.delete("rebuild")
        server.stop()


@pytest.mark.integration
def test_rebuild_and_swap_on_embedded_lite_through_the_service(service, settings_factory,
                                                               tmp_path_factory, capsys):
    """The default deployment: the service's ProductSearch owns `milvus.db` (Milvus Lite in
    its process), so rebuild / swap / rollback / gc go through its deployment handle."""
    from ray import serve

    from batch_index.__main__ import main as batch_index
    from batch_index.service import search_handle
    from batch_index.versions import ServiceAdmin
    from deployments.core.demo import draw_product
    from serve_app.app import build_app
    from tests.support import jpeg_bytes

    app = "rebuild-lite"
    root = tmp_path_factory.mktemp("rebuild-lite")
    v1_settings = settings_factory(
        root, milvus={"uri": str(root / "milvus.db"), "collection": "catalog"},
        demo={"enabled": True, "size": 16, "dir": str(root / "demo")},
        auth={"api_keys": [REBUILD_KEY]},
        # On Lite the search replica restarts in place when the models change (every
        # deployment's version follows the app's args; Lite cannot surge): idempotent reads
        # ride out that pause when their budget and tries outlast it (README "Change the model").
        resilience={"request_timeout_s": 60, "attempt_timeout_s": 8, "retries": 5,
                    "retry_backoff_s": 0.5},
        image_encoder={"num_cpus": 0.1, "num_threads": 1, "max_replicas": 1},
        text_encoder={"num_cpus": 0.1, "num_threads": 1, "max_replicas": 1},
        search={"num_cpus": 0.05, "max_ongoing_requests": 64},
        ingress={"num_cpus": 0.05, "max_ongoing_requests": 64})
    assert v1_settings.milvus.is_lite
    weights = perturbed_checkpoint(root / "perturbed.pt")
    v2_settings = v1_settings.model_copy(update={"image_model": v1_settings.image_model
                                                 .model_copy(update={"weights": str(weights)})})
    config = write_config(root / "config.yaml", v1_settings, app_name=app)
    cli = ["--config", str(config), "--app-name", app, "--via-service", "yes"]
    serve.run(build_app(v1_settings), name=app, route_prefix=f"/{app}")
    try:
        url = f"{service}/{app}"
        wait_healthy(url, products=16)
        auth = {"Authorization": f"Bearer {REBUILD_KEY}"}
        client = httpx.Client(base_url=url, timeout=60)
        ids = sorted(p["id"] for p in client.get("/products", params={"limit": 100})
                     .json()["results"])
        photos = {pid: client.get(f"/images/{pid}").content for pid in ids}
        before = {pid: _top(client, photos[pid]) for pid in ids[:3]}
        assert client.get("/healthz").json()["version"]["collection"] == "catalog__v1"

        searched = {pid: photos[pid] for pid in ids[:8] if pid != ids[6]}  # ids[6]: deleted
        new_photo = jpeg_bytes(draw_product("Mugs", "Green", "Dotted", seed=9999))
        changed = {"id": ids[5], "title": "Renamed during the rebuild", "colour": "Green"}
        results: list[int] = []
        with ShopperLoad(url, searched, users=1, timeout=90) as load:
            started = time.monotonic()
            rebuild = threading.Thread(target=lambda: results.append(batch_index(
                ["rebuild", *cli, "--batch-size", "8", "--image-weights", str(weights)])))
            rebuild.start()
            r = client.post("/products", headers=auth, files={"image": ("c.jpg", photos[ids[5]])},
                            data={"product": json.dumps(changed)})
            assert r.status_code == 201, r.text
            rebuild.join()
            assert results == [0]
            r = client.post("/products", headers=auth, files={"image": ("n.jpg", new_photo)},
                            data={"product": json.dumps({
                                "id": "added-during-rebuild", "title": "New green mug",
                                "article_type": "Mugs", "colour": "Green"})})
            assert r.status_code == 201, r.text
            assert client.delete(f"/products/{ids[6]}", headers=auth).status_code == 204
            capsys.readouterr()
            swap_began = time.monotonic()
            assert batch_index(["swap", *cli, "--batch-size", "8"]) == 0
            swapped = time.monotonic()
            out = capsys.readouterr().out
            assert "going through the running service" in out
            caught_up = json.loads(out.split("catch-up ")[1].split(" (")[0])
            serve.run(build_app(v2_settings), name=app, route_prefix=f"/{app}")
            switched = time.monotonic()
            time.sleep(3)
        assert caught_up["embedded"] >= 1 and caught_up["deleted"] == 1, caught_up
        assert load.outcomes["ok"] > 10, load.outcomes
        assert "mixed" not in load.outcomes, load.bad[:5]
        during_swap = load.between(swap_began, switched + 3)
        assert set(during_swap) == {"ok"}, (during_swap, load.bad[:5])
        assert set(load.outcomes) <= {"ok", "503"}, (load.outcomes, load.bad[:5])
        print(f"embedded Lite: rebuild start to swap {swapped - started:.1f} s; swap "
              f"{swapped - swap_began:.1f} s; encoder rollout {switched - swapped:.1f} s; "
              f"answers {dict(load.outcomes)}; during swap + rollout {dict(during_swap)}")

        health = client.get("/healthz").json()
        assert health["version"]["collection"] == "catalog__v2"
        assert health["version"]["image_model"] == image_model_id(v2_settings.image_model)
        assert client.get("/products/added-during-rebuild").status_code == 200
        assert client.get(f"/products/{ids[5]}").json()["title"] == changed["title"]
        assert client.get(f"/products/{ids[6]}").status_code == 404
        r = client.post("/search/image", params={"k": 5, "explain": "true"},
                        files={"image": ("n.jpg", new_photo)})
        scores = {h["id"]: h["explain"]["visual"] for h in r.json()["results"]}
        assert scores.get("added-during-rebuild", 0) > 0.99, scores
        admin = ServiceAdmin(search_handle(app))
        v2_ids = set(admin.fingerprints("catalog__v2"))
        assert "added-during-rebuild" in v2_ids and ids[6] not in v2_ids
        assert admin.provenance("catalog__v2")["image_settings"]["weights"] == str(weights)

        assert batch_index(["rollback", *cli]) == 0
        with ShopperLoad(url, searched, users=1, timeout=90) as load:
            serve.run(build_app(v1_settings), name=app, route_prefix=f"/{app}")
            time.sleep(2)
        assert set(load.outcomes) == {"ok"}, (load.outcomes, load.bad[:5])
        assert client.get("/healthz").json()["version"]["collection"] == "catalog__v1"
        for pid, top in before.items():
            assert _top(client, photos[pid])[0] == top[0]
        assert batch_index(["gc", "--keep", "1", *cli]) == 0
        admin = ServiceAdmin(search_handle(app))
        assert [v["collection"] for v in admin.versions()] == ["catalog__v1", "catalog__v2"]
        client.close()
    finally:
        serve.delete(app)


def test_rebuild_check_fails_on_a_short_version(tmp_path):
    """swap's checks: a version missing rows is not swapped in."""
    router = _router(tmp_path)
    admin = VersionAdmin(router.store)
    live_store = router.store.for_collection("catalog__v1")
    from deployments.core.products import Product

    products = [Product(id=f"p{i}", title=f"t{i}") for i in range(12)]
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    text = np.ones((12, 4), np.float32) / 2
    live_store.upsert(products, vectors, text)
    live_store.flush()
    v2 = _add_version(router, A)
    admin.write(v2, products[:10], vectors[:10], text[:10], None)
    admin.flush(v2)
    report = admin.check(v2, "catalog__v1", sample=5)
    assert not report["ok"] and report["rows"] == 10 and report["live_rows"] == 12
    admin.write(v2, products[10:], vectors[10:], text[10:], None)
    report = admin.check(v2, "catalog__v1", sample=5)
    assert report["ok"], report
    assert report["found_self"] == 5 and report["recall@10"] == 1.0


def test_the_job_names_missing_packages_and_the_fix(tmp_path):
    """What a job submitted without the venv meets first (the cluster's own `python`)."""
    import subprocess
    import sys

    from batch_index import environment

    assert environment.missing_packages() == []
    bare = tmp_path / "bare"  # a Python without the project's packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    done = subprocess.run([str(bare / "bin" / "python"), "-m", "batch_index", "versions"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "lacks numpy, pandas" in done.stderr and "py_executable" in done.stderr
    assert "ModuleNotFoundError" not in done.stderr


def test_gc_drops_versions_past_the_newest_but_never_the_live_one(tmp_path):
    from batch_index.__main__ import main as batch_index

    router = _router(tmp_path)
    admin = VersionAdmin(router.store)
    for _ in range(3):
        _add_version(router, B)
    admin.point("catalog__v3")
    router.store.close()
    cli = ["--milvus-uri", str(tmp_path / "m.db"), "--collection", "catalog", "--via-service",
           "no"]
    assert batch_index(["gc", "--keep", "2", *cli]) == 0  # v4 (newest), v3 (live) stay
    store = ProductStore(MilvusSettings(uri=str(tmp_path / "m.db"), collection="catalog"))
    assert [v["collection"] for v in VersionAdmin(store).versions()] == [
        "catalog__v3", "catalog__v4"]
    store.close()


def test_catch_up_picks_changed_new_and_gone_products_and_never_newer_writes():
    from batch_index.versions import changes

    live = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "old", "d": "4"}
    todo, gone = changes(live, new)
    assert todo == {"b", "c"} and gone == ["d"]
    # After the swap: the live version took writes up to the move (b changed, c deleted, e
    # added); the new version was written since for b2 only.
    snapshot = {"a": "1", "b": "2", "c": "3", "b2": "5"}
    live = {"a": "1", "b": "2x", "e": "6", "b2": "5y"}
    new = {"a": "1", "b": "2", "c": "3", "b2": "newer"}
    todo, gone = changes(live, new, since=snapshot)
    assert todo == {"b", "e"} and gone == ["c"]  # b2 keeps its newer write
