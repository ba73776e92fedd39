"""`python -m batch_index index` fits heads at its end (unless --no-fit), on Ray, from the store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batch_index.__main__ import main
from deployments.core.demo import generate_demo_catalog
from deployments.core.heads import current_version, heads_folder, load_heads, model_ids
from deployments.core.settings import load_settings
from deployments.core.store import ProductStore
from tests.support import write_config

pytestmark = pytest.mark.integration


def test_index_then_fit_writes_an_artifact_beside_the_collection(ray_local, tmp_path,
                                                                  settings_factory, capsys):
    settings = settings_factory(tmp_path, demo={"enabled": False},
                                heads={"dir": str(tmp_path / "heads"), "min_products": 10,
                                       "min_field_products": 10, "min_class_products": 2})
    config = write_config(tmp_path / "config.yaml", settings, app_name="fittest")
    catalog = generate_demo_catalog(tmp_path / "cat", n=48)
    common = ["--config", str(config), "--via-service", "no"]
    assert main(["index", *common, "--catalog", str(catalog), "--no-fit",
                 "--rejects", str(tmp_path / "r.jsonl"), "--batch-size", "16"]) == 0
    folder = heads_folder(settings.heads.dir, settings.milvus.collection)
    assert current_version(folder) is None  # --no-fit
    capsys.readouterr()

    store = ProductStore(load_settings(config).milvus)
    data = store.vectors_and_labels()
    store.close()
    assert len(data["ids"]) == 48 and data["image"].shape == (48, 1280)
    assert len(data["image_hashes"]) == 48 and all(len(h) == 64 for h in data["image_hashes"])
    assert data["colour"].shape[0] == 48 and set(data["labels"]["colour"]) > {"Red"}
    assert np.allclose(np.linalg.norm(data["text"], axis=1), 1, atol=1e-4)

    assert main(["fit", *common]) == 0
    summary = json.loads(capsys.readouterr().out.split("heads ")[-1])
    heads = load_heads(folder, *model_ids(settings.image_model, settings.text_model), 1280, 384)
    assert heads.version == summary["version"] == current_version(folder)
    assert summary["alignment"] and {"article_type", "colour"} <= set(summary["fields"])
    # The fit wrote its predictions into every stored product, apart from the shop's labels.
    store = ProductStore(load_settings(config).milvus)
    products = store.all_products()
    store.close()
    assert len(products) == 48
    for product in products:
        assert {"article_type", "colour"} <= set(product.predicted)
        assert all(0 < p.confidence <= 1 for p in product.predicted.values())
    typed = np.mean([p.predicted["article_type"].value == p.article_type for p in products])
    assert typed > 0.5, typed  # fitted on these very products: a plumbing check, not quality
