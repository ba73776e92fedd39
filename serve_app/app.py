"""The deployment graph, wired in one place.

    HTTP -> SearchAPI (FastAPI ingress) -+-> ImageEncoder  (autoscaled, @serve.batch)
                                         +-> TextEncoder   (autoscaled, @serve.batch)
                                         +-> ProductSearch (Milvus; uses the encoders' dims)

`serve run configs/config.yaml` calls `build_app` with the config's `args:` block.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.core.settings import AppSettings, ScalingSettings
from deployments.image_encoder import ImageEncoder
from deployments.search import ProductSearch
from deployments.text_encoder import TextEncoder
from serve_app.ingress import SearchAPI


def deployment_options(scaling: ScalingSettings) -> dict[str, Any]:
    """Serve options (replicas, autoscaling, queues, resources) for one deployment."""
    options: dict[str, Any] = {
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "max_queued_requests": scaling.max_queued_requests,
        "ray_actor_options": {"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        "max_surge_percent": scaling.max_surge_percent,
    }
    if scaling.resources:
        options["ray_actor_options"]["resources"] = scaling.resources
    if scaling.env_vars:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": scaling.env_vars}
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(1, scaling.min_replicas),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    if scaling.max_replicas_per_node:
        options["max_replicas_per_node"] = scaling.max_replicas_per_node
    return options


def build_app(args: dict[str, Any] | AppSettings) -> Application:
    """Build the bound graph from the config's typed arguments."""
    settings = args if isinstance(args, AppSettings) else AppSettings(**(args or {}))
    image = ImageEncoder.options(**deployment_options(settings.image_encoder)).bind(
        settings.image_model, settings.image_batching, settings.image_encoder.threads(),
        settings.limits.max_image_pixels,
    )
    text = TextEncoder.options(**deployment_options(settings.text_encoder)).bind(
        settings.text_model, settings.text_batching, settings.text_encoder.threads(),
    )
    search_options = deployment_options(settings.search)
    if settings.milvus.is_lite:  # one process per data dir: the old replica must go first
        search_options["max_surge_percent"] = 0
    search = ProductSearch.options(**search_options).bind(
        settings.milvus, settings.media_dir, image, text, settings.ranking, settings.heads,
    )
    return SearchAPI.options(**deployment_options(settings.ingress)).bind(
        settings, image, text, search
    )
