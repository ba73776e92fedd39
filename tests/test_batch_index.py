"""Bulk indexing: catalogue validation (unit) and the Ray Data job on local Ray (integration)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from batch_index import fitted_on
from batch_index.__main__ import main
from batch_index.pipeline import plan_rows
from deployments.core.catalog import parse_mapping, read_csv_catalog, read_folder_catalog
from deployments.core.demo import generate_demo_catalog
from deployments.core.heads import CURRENT, current_version, heads_folder
from deployments.core.products import Product
from deployments.core.store import ProductStore
from deployments.core.writes import stamp
from tests.support import job_photos, write_config

FIELDS = ["id", "title", "category", "subcategory", "article_type", "colour", "gender", "season",
          "usage", "image", "year", "price"]


def make_catalog(folder: Path, n_good: int = 20) -> tuple[Path, dict[str, str]]:
    """A fashion-dev-shaped CSV with n_good good rows plus one of each kind of bad row.
    Returns the CSV and the expected reason keyword per bad line."""
    demo_csv = generate_demo_catalog(folder / "demo", n=n_good)
    images = folder / "images"
    shutil.copytree(demo_csv.parent / "images", images)
    rows = []
    for r in csv.DictReader(demo_csv.open()):
        rows.append({k: r.get(k, "") for k in FIELDS} | {"image": Path(r["image"]).name,
                                                        "year": "2024"})
    (images / "notes.jpg").write_text("this is not a photo")
    good = (images / rows[0]["image"]).read_bytes()
    (images / "cut.jpg").write_bytes(good[: len(good) // 2])
    bad = {
        "missing-photo": ("missing.jpg", "not found"),
        "text-photo": ("notes.jpg", "image"),
        "cut-photo": ("cut.jpg", "truncated"),
        "": (rows[1]["image"], "empty id"),
        rows[2]["id"]: (rows[2]["image"], "duplicate id"),
        "bad-price": (rows[3]["image"], "price"),
    }
    expected = {}
    for product_id, (image, reason) in bad.items():
        row = dict(rows[4]) | {"id": product_id, "image": image}
        if product_id == "bad-price":
            row["price"] = "twelve"
        rows.append(row)
        expected[product_id] = reason
    path = folder / "products.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path, expected


# -- unit: reading catalogues ---------------------------------------------------------------
def test_csv_rows_and_rejects(tmp_path):
    path, expected = make_catalog(tmp_path, n_good=10)
    rows, rejects = read_csv_catalog(path, tmp_path / "images")
    reasons = {r.id: r.reason for r in rejects}
    assert "duplicate id" in reasons[next(i for i in expected if "duplicate" in expected[i])]
    assert "empty id" in reasons[""] and "price" in reasons["bad-price"]
    # Photo problems are found by the pipeline, not the CSV reader.
    assert {"missing-photo", "text-photo", "cut-photo"} <= {r.id for r in rows}
    product = json.loads(rows[0].product_json)
    assert product["attributes"] == {"year": "2024"}  # unknown columns -> JSON attributes
    assert Path(rows[0].image_path).parent == tmp_path / "images"


def test_column_mapping(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("sku,productDisplayName,baseColour,img\nA1,Blue Mug,Blue,a.jpg\n")
    rows, rejects = read_csv_catalog(path, columns="id=sku,title=productDisplayName,"
                                                   "colour=baseColour,image=img")
    assert not rejects
    assert json.loads(rows[0].product_json)["colour"] == "Blue"
    with pytest.raises(ValueError, match="field=column"):
        parse_mapping("nonsense=x")


def test_fashion_dev_csv_is_accepted_as_is(fashion_dev):
    rows, rejects = read_csv_catalog(fashion_dev / "products.csv")
    assert len(rows) == 7036 and not rejects
    assert json.loads(rows[0].product_json)["attributes"]["dup_group"]


def test_folder_catalog_titles_from_file_names(tmp_path):
    generate_demo_catalog(tmp_path / "d", n=3)
    (tmp_path / "d" / "images" / "red_summer-dress.jpg").write_bytes(b"x")
    rows, _ = read_folder_catalog(tmp_path / "d" / "images")
    titles = {r.id: json.loads(r.product_json)["title"] for r in rows}
    assert titles["red_summer-dress"] == "red summer dress" and len(rows) == 4


def test_fit_is_current_only_for_the_same_rows_settings_and_version(tmp_path, settings_factory):
    settings = settings_factory(tmp_path, heads={"dir": str(tmp_path / "heads")})
    folder = heads_folder(settings.heads.dir, settings.milvus.collection)
    stored = {"a": "1" * 64, "b": "2" * 64}
    assert not fitted_on.is_current(settings, stored)  # never fitted
    folder.mkdir(parents=True)
    (folder / CURRENT).write_text(json.dumps({"version": "v1"}))
    fitted_on.record(settings, stored, "v1")
    assert fitted_on.is_current(settings, dict(reversed(stored.items())))
    assert not fitted_on.is_current(settings, stored | {"b": "3" * 64})  # a row changed
    assert not fitted_on.is_current(settings, {"a": stored["a"]})  # a row removed
    assert not fitted_on.is_current(settings, stored | {"c": "4" * 64})  # a row added
    other = settings.model_copy(update={"heads": settings.heads.model_copy(
        update={"align_epochs": settings.heads.align_epochs + 1})})
    assert not fitted_on.is_current(other, stored)  # other heads settings
    (folder / CURRENT).write_text(json.dumps({"version": "v2"}))
    assert not fitted_on.is_current(settings, stored)  # another fit is current


def test_plan_stamps_rows_as_the_writer_does_and_skips_unchanged(tmp_path):
    catalog, _ = make_catalog(tmp_path / "cat", n_good=5)
    rows, _ = read_csv_catalog(catalog, tmp_path / "cat" / "images")
    plan = plan_rows(rows, {}, force=False)
    assert [r.id for r in plan.rejects] == ["missing-photo"]
    assert "not found" in plan.rejects[0].reason and plan.unchanged == 0
    by_id = {r.id: r for r in rows}
    for todo in plan.todo:  # the writer's own stamp of the same photo and fields
        original = Product.model_validate_json(by_id[todo.id].product_json)
        expected = stamp(original, Path(todo.image_path).read_bytes())
        assert Product.model_validate_json(todo.product_json) == expected
    stored = {r.id: json.loads(r.product_json)["fingerprint"] for r in plan.todo}
    again = plan_rows(rows, stored, force=False)
    assert (again.todo, again.unchanged) == ([], len(plan.todo))
    edited = stored | {rows[0].id: "0" * 64}
    assert [r.id for r in plan_rows(rows, edited, force=False).todo] == [rows[0].id]
    assert len(plan_rows(rows, stored, force=True).todo) == len(plan.todo)


def test_a_ray_the_job_starts_itself_runs_without_its_dashboard(monkeypatch):
    """The dashboard's head processes cost ~8% of 2 cores for the whole bulk index and end
    with the command; `--dashboard` brings them back. (Against a running Ray, e.g. `ray job
    submit`, Ray ignores the flag: tests/test_job_submit.py runs the job that way.)"""
    import ray

    from batch_index import service
    from batch_index.__main__ import parse_args

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    for argv in (["index", "--catalog", "c.csv"], ["index", "--catalog", "c.csv", "--dashboard"],
                 ["fit", "--address", "ray://head:10001"]):
        service.ensure_ray(parse_args(argv))
    assert calls == [{"address": None, "include_dashboard": False},
                     {"address": None, "include_dashboard": True},
                     {"address": "ray://head:10001", "include_dashboard": False}]


def test_model_dims_are_remembered_beside_the_model_cache(tmp_path, settings_factory):
    from batch_index.__main__ import remembered_dims
    from deployments.core.encoders import model_dims

    settings = settings_factory(tmp_path)
    settings = settings.model_copy(update={"image_model": settings.image_model.model_copy(
        update={"cache_dir": str(tmp_path / "cache")})})
    expected = model_dims(settings.image_model, settings.text_model)
    assert remembered_dims(settings) == expected == (1280, 384)
    [saved] = (tmp_path / "cache").glob("dims-*.json")
    assert json.loads(saved.read_text()) == list(expected)
    saved.write_text("not json")  # a damaged file is computed again, not trusted
    assert remembered_dims(settings) == expected


# -- integration: the Ray Data job ----------------------------------------------------------
@pytest.fixture
def job_config(tmp_path, settings_factory) -> Path:
    """A Serve config file whose store lives in tmp_path (the job reads its settings from it)."""
    settings = settings_factory(tmp_path, demo={"enabled": False})
    config = {"applications": [{"name": "jobtest", "import_path": "serve_app.app:build_app",
                                "args": settings.model_dump()}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(config: Path, *extra: str) -> dict:
    """Run `python -m batch_index index` in this process; return its summary."""
    rejects = config.parent / "rejects.jsonl"
    assert main(["index", "--config", str(config), "--rejects", str(rejects),
                 "--via-service", "no", "--batch-size", "8", *extra]) == 0
    return {"rejects": [json.loads(x) for x in rejects.read_text().splitlines()]}


def open_job_store(config: Path) -> ProductStore:
    from deployments.core.settings import load_settings

    return ProductStore(load_settings(config).milvus)


@pytest.mark.integration
def test_index_job_end_to_end(ray_local, tmp_path, job_config, image_encoder, capsys):
    catalog, expected = make_catalog(tmp_path / "cat", n_good=20)
    images = catalog.parent / "images"
    out = run_job(job_config, "--catalog", str(catalog), "--images", str(images))
    summary = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert summary["indexed"] == 20 and summary["rejected"] == len(expected)
    reasons = {r["id"]: r["reason"] for r in out["rejects"]}
    for product_id, keyword in expected.items():
        assert keyword in reasons[product_id].lower(), (product_id, reasons[product_id])

    store = open_job_store(job_config)
    assert store.count() == 20
    first = next(csv.DictReader(catalog.open()))
    photo = (images / first["image"]).read_bytes()
    online = image_encoder.embed_bytes([photo])[0]
    stored = store.get_vectors(first["id"])["image"]
    assert np.abs(online - stored).max() < 1e-5  # same vector online and offline
    assert store.search(online, "image", k=1)[0].product.id == first["id"]
    deleted = ["demo-0003", "demo-0011", "demo-0017"]
    store.delete(deleted)
    store.close()

    run_job(job_config, "--catalog", str(catalog), "--images", str(images))
    summary = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert (summary["indexed"], summary["unchanged"]) == (3, 17)  # exactly the deleted ones

    run_job(job_config, "--catalog", str(catalog), "--images", str(images))
    summary = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert (summary["indexed"], summary["unchanged"]) == (0, 20)  # rerun changes nothing

    store = open_job_store(job_config)
    assert store.count() == 20
    assert sorted(p.id for p in store.get(deleted)) == deleted
    store.close()


@pytest.mark.integration
def test_partial_run_then_rerun_finishes_the_rest(ray_local, tmp_path, job_config, capsys):
    catalog, _ = make_catalog(tmp_path / "cat", n_good=16)
    images = catalog.parent / "images"
    run_job(job_config, "--catalog", str(catalog), "--images", str(images), "--limit", "6")
    capsys.readouterr()
    run_job(job_config, "--catalog", str(catalog), "--images", str(images))
    summary = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert summary["unchanged"] == 6 and summary["indexed"] == 10
    run_job(job_config, "--catalog", str(catalog), "--images", str(images), "--force")
    summary = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert summary["indexed"] == 16 and summary["unchanged"] == 0
    store = open_job_store(job_config)
    assert store.count() == 16
    store.close()


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Rewrite a catalogue CSV (FIELDS columns)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def encoder_actors() -> int:
    """How many encoder actors (image or text) this Ray instance has ever started. Ray's public
    state API needs the dashboard, which the test instance runs without; the GCS table is the
    same record."""
    import ray

    return sum("Embedder" in str(a.get("ActorClassName")) for a in ray._private.state.actors(
    ).values())


@pytest.mark.integration
def test_rerun_embeds_only_changed_rows_and_nothing_when_none_changed(
        ray_local, tmp_path, settings_factory, image_encoder, capsys):
    settings = settings_factory(tmp_path, demo={"enabled": False},
                                heads={"dir": str(tmp_path / "heads"), "min_products": 8,
                                       "min_field_products": 8, "min_class_products": 2})
    config = write_config(tmp_path / "config.yaml", settings, app_name="jobtest")
    catalog, expected = make_catalog(tmp_path / "cat", n_good=12)
    # A photo that exists but does not decode is never stored, so every run tries it again
    # (and starts the encoders for it); leave those two out. The other bad rows stay: they are
    # rejected before Ray Data (missing file) or by the CSV reader.
    lines = [r for r in csv.DictReader(catalog.open())
             if r["id"] not in ("text-photo", "cut-photo")]
    expected = {k: v for k, v in expected.items() if k not in ("text-photo", "cut-photo")}
    write_rows(catalog, lines)
    images = catalog.parent / "images"
    job = ("--catalog", str(catalog), "--images", str(images))
    heads = heads_folder(settings.heads.dir, settings.milvus.collection)

    def rerun() -> dict:
        run_job(config, *job)
        out = capsys.readouterr().out
        return json.loads(out.split("summary ")[-1]) | {"fit_skipped": "heads unchanged" in out}

    first = rerun()
    assert (first["indexed"], first["rejected"], first["fit_skipped"]) == (12, len(expected),
                                                                            False)
    first_fit = current_version(heads)
    assert first_fit

    # One photo changes (mirrored), one other row changes a field: exactly those two re-embed.
    lines = list(csv.DictReader(catalog.open()))
    photo = images / lines[0]["image"]
    with Image.open(photo) as image:
        ImageOps.mirror(image.convert("RGB")).save(photo, "JPEG", quality=90)
    lines[1]["title"] = "Renamed in the shop's catalogue"
    write_rows(catalog, lines)
    changed = rerun()
    assert (changed["indexed"], changed["unchanged"], changed["rejected"]) == (2, 10,
                                                                               len(expected))
    assert not changed["fit_skipped"] and current_version(heads) != first_fit
    store = open_job_store(config)
    online = image_encoder.embed_bytes([photo.read_bytes()])[0]
    assert np.abs(store.get_vectors(lines[0]["id"])["image"] - online).max() < 1e-5
    assert store.get([lines[1]["id"]])[0].title == "Renamed in the shop's catalogue"
    store.close()

    # Nothing changed: every row recognised, no encoder actor started, no new fit.
    actors, fit = encoder_actors(), current_version(heads)
    assert actors > 0
    same = rerun()
    assert (same["indexed"], same["unchanged"], same["rejected"]) == (0, 12, len(expected))
    assert encoder_actors() == actors
    assert same["fit_skipped"] and current_version(heads) == fit

    # --force still re-embeds every row, and fits again.
    run_job(config, *job, "--force")
    forced = json.loads(capsys.readouterr().out.split("summary ")[-1])
    assert (forced["indexed"], forced["unchanged"]) == (12, 0)
    assert current_version(heads) != fit


@pytest.mark.integration
def test_job_writes_through_the_running_service(service, service_settings, tmp_path, capsys):
    """With the service owning Milvus Lite, the job writes through its search deployment."""
    folder = job_photos(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "shopsearch", "import_path": "serve_app.app:build_app",
        "args": service_settings.model_dump()}]}))
    assert main(["index", "--config", str(config), "--images", str(folder),
                 "--rejects", str(tmp_path / "r.jsonl"), "--batch-size", "4"]) == 0
    assert "writing through the running service" in capsys.readouterr().out
    photo = (folder / "job-0004.jpg").read_bytes()
    r = httpx.post(f"{service}/search/image", files={"image": ("q.jpg", photo)}, timeout=60)
    assert r.json()["results"][0]["id"] in ("job-0004", "demo-0004")  # same photo, same vector
    assert httpx.get(f"{service}/products/job-0004").json()["title"] == "job 0004"
