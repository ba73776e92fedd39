"""Settings: the config files validate, bad numbers are refused, the environment fills gaps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.core.settings import AppSettings, ScalingSettings, load_settings
from serve_app.app import build_app, deployment_options

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_a_valid_serve_config_with_valid_args(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for app in schema.applications:
        assert app.import_path == "serve_app.app:build_app"
        settings = AppSettings(**app.args)
        assert build_app(settings) is not None


def test_default_config_fits_two_cores_with_room_for_a_batch_job():
    s = load_settings()
    parts = (s.image_encoder, s.text_encoder, s.search, s.ingress)
    reserved = sum(p.max_replicas * p.num_cpus for p in parts)
    assert reserved <= 1.5
    assert s.image_encoder.max_ongoing_requests >= s.image_batching.max_batch_size


def test_unknown_keys_are_refused():
    with pytest.raises(ValidationError, match="not_a_setting"):
        AppSettings(not_a_setting=1)


def test_ongoing_requests_below_batch_size_is_refused():
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        AppSettings(image_batching={"max_batch_size": 32},
                    image_encoder={"max_ongoing_requests": 8})


def test_lite_store_cannot_have_several_search_replicas():
    with pytest.raises(ValidationError, match="Lite"):
        AppSettings(search={"max_replicas": 2})
    assert AppSettings(milvus={"uri": "http://milvus:19530"}, search={"max_replicas": 3})


def test_environment_supplies_credentials(monkeypatch):
    monkeypatch.setenv("SHOPSEARCH_MILVUS__TOKEN", "root:secret")
    monkeypatch.setenv("SHOPSEARCH_MILVUS__URI", "http://milvus:19530")
    s = AppSettings()
    assert s.milvus.token == "root:secret" and not s.milvus.is_lite


def test_deployment_options_autoscale_only_when_a_range_is_given():
    scaled = deployment_options(ScalingSettings(min_replicas=1, max_replicas=4, num_cpus=0.5))
    assert scaled["autoscaling_config"]["max_replicas"] == 4
    assert scaled["ray_actor_options"]["num_cpus"] == 0.5
    fixed = deployment_options(ScalingSettings(min_replicas=2, max_replicas=2))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed


def test_a_deployment_environment_reaches_its_replicas_runtime_env():
    options = deployment_options(ScalingSettings(env_vars={"MALLOC_ARENA_MAX": "2"}))
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "2"}}
    assert "runtime_env" not in deployment_options(ScalingSettings())["ray_actor_options"]


def test_threads_follow_reserved_cpus_unless_set():
    assert ScalingSettings(num_cpus=0.25).threads() == 1
    assert ScalingSettings(num_cpus=2).threads() == 2
    assert ScalingSettings(num_cpus=0.5, num_threads=4).threads() == 4
