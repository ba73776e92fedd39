"""Shared fixtures: real encoders, a demo catalogue, temporary Milvus Lite, a local Ray + Serve."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deployments.core.demo import generate_demo_catalog
from deployments.core.settings import AppSettings, ImageModelSettings, TextModelSettings
from tests.support import free_port, wait_healthy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests choose their services' write keys themselves (the `admin_key` fixture, test_auth.py).
os.environ.pop("SHOPSEARCH_API_KEYS", None)
DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashion-dev"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def image_encoder(model_cache):
    from deployments.core.encoders import ImageEncoder

    return ImageEncoder(ImageModelSettings(cache_dir=model_cache), num_threads=2)


@pytest.fixture(scope="session")
def text_encoder(model_cache):
    from deployments.core.encoders import TextEncoder

    return TextEncoder(TextModelSettings(cache_dir=model_cache), num_threads=2)


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory) -> Path:
    """48 demo products (every type in several colours); returns products.csv."""
    return generate_demo_catalog(tmp_path_factory.mktemp("demo"), n=48)


@pytest.fixture(scope="session")
def fashion_dev() -> Path:
    if not (DATASET / "products.csv").exists():
        pytest.skip("../shared/datasets/fashion-dev is not available")
    return DATASET


def make_settings(tmp_path: Path, model_cache: str, **overrides) -> AppSettings:
    """Settings for a small service whose state lives under tmp_path."""
    base = {
        "image_model": {"cache_dir": model_cache},
        "milvus": {"uri": str(tmp_path / "milvus.db"), "collection": "products",
                   "release_memory_s": 2},
        "media_dir": str(tmp_path / "media"),
        "demo": {"enabled": True, "size": 48, "dir": str(tmp_path / "demo")},
        # No key configured: the ingress generates its admin key here (see `admin_key`).
        "auth": {"key_file": str(tmp_path / "admin_key")},
        "heads": {"dir": str(tmp_path / "heads"), "poll_s": 0.5},
        "image_encoder": {"num_cpus": 0.25, "num_threads": 1, "max_replicas": 1},
        "text_encoder": {"num_cpus": 0.25, "num_threads": 1, "max_replicas": 1},
        "search": {"num_cpus": 0.1, "max_ongoing_requests": 64,
                   "env_vars": {"MALLOC_ARENA_MAX": "2"}},  # as configs/config.yaml
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64},
    }
    base.update(overrides)
    return AppSettings(**base)


@pytest.fixture(scope="session")
def settings_factory(model_cache):
    """Build settings for a service under a given folder: factory(tmp_path, **overrides)."""
    return lambda tmp_path, **overrides: make_settings(tmp_path, model_cache, **overrides)


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance of this machine's size, stopped at the end (only what we started).
    Its Prometheus metrics are served on METRICS_PORT."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory, model_cache) -> AppSettings:
    """Settings of the shared test service (its Milvus Lite and photos live in a temp dir)."""
    return make_settings(tmp_path_factory.mktemp("service"), model_cache)


@pytest.fixture(scope="session")
def service(ray_local, service_settings):
    """The whole graph on local Ray with the demo catalogue indexed; yields its base URL."""
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(service_settings), name="shopsearch", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, products=48)
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def admin_key(service, service_settings) -> str:
    """The write key the shared test service generated on first start (no key configured)."""
    return Path(service_settings.auth.key_file).read_text().strip()


@pytest.fixture(scope="session")
def auth_headers(admin_key) -> dict[str, str]:
    """Headers that authorise writes on the shared test service."""
    return {"Authorization": f"Bearer {admin_key}"}


@pytest.fixture(scope="session")
def ingress_app(service, settings_factory, tmp_path_factory):
    """Factory: start(name, **setting overrides) runs another ingress with its own settings (keys,
    read-only, limits, CORS) under /<name>, in front of the shared service's encoders and
    ProductSearch (so no model loads again: one small SearchAPI replica), and returns its URL."""
    from ray import serve

    from serve_app.app import deployment_options
    from serve_app.ingress import SearchAPI

    started = []

    def start(name: str, **overrides) -> str:
        settings = settings_factory(tmp_path_factory.mktemp(name),
                                    demo={"enabled": False, "size": 0}, **overrides)
        handles = [serve.get_deployment_handle(d, app_name="shopsearch")
                   for d in ("ImageEncoder", "TextEncoder", "ProductSearch")]
        graph = SearchAPI.options(**deployment_options(settings.ingress)).bind(settings, *handles)
        serve.run(graph, name=name, route_prefix=f"/{name}")
        started.append(name)
        url = f"{service}/{name}"
        wait_healthy(url)
        return url

    yield start
    for name in started:
        serve.delete(name)
