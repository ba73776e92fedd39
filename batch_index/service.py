"""The running service's ProductSearch deployment, called from the job's synchronous code.

With Milvus Lite the service owns the store (one process per data dir), so `index`, `fit` and
the version commands write and read through its ProductSearch deployment handle instead.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from deployments.core.settings import AppSettings

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


def ray_address(args: argparse.Namespace) -> str | None:
    """Where Ray runs: --address, else RAY_ADDRESS, else None (a local Ray, or the job's)."""
    return args.address or os.environ.get("RAY_ADDRESS")


def ensure_ray(args: argparse.Namespace) -> None:
    """Connect to (or start) Ray, once; only steps that use it call this, so a rerun that
    finds nothing changed, direct to Milvus, needs no Ray at all."""
    init_ray(ray_address(args), dashboard=getattr(args, "dashboard", False))


def init_ray(address: str | None, dashboard: bool = False) -> None:
    """Connect to the Ray at `address` (None: RAY_ADDRESS, the job's, or one already running on
    this machine), or start one for this process, once. A Ray started here runs without its
    dashboard unless `dashboard`: the dashboard's head processes took ~8% of this 2-core
    machine for the whole bulk index (fashion-dev: 125 -> 114 s without them,
    benchmarks/RESULTS.md), and they would stop with this process anyway. A cluster's own
    dashboard (`ray job submit`, `serve run`) is not affected: Ray ignores the flag when it
    connects to a running instance."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=dashboard)


def search_handle(app_name: str = "shopsearch") -> DeploymentHandle:
    """ProductSearch's handle of a running application, safe to call from synchronous code
    (`.remote(...).result()` in a job driver, its writer thread, a test).

    A handle's router needs an event loop. By default Serve gives it one of its own on a
    background thread, but `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (the fast HTTP path, README)
    turns that default off (`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`) so that replicas route
    on their own loop; plain synchronous code then has none and the first call fails with
    "no running event loop". So the router is put on its own loop explicitly, before the first
    call initialises it. Serve caches handles per process: one this function initialised
    earlier is returned as it is."""
    from ray import serve

    handle = serve.get_deployment_handle("ProductSearch", app_name=app_name)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def running_search(args: argparse.Namespace, settings: AppSettings) -> DeploymentHandle | None:
    """ProductSearch's handle when the job should go through the running service: always with
    --via-service yes (SystemExit when the app is not running), never with no, and with auto
    when the store is Milvus Lite (which the running service owns) and the app is running."""
    if args.via_service == "no" or (args.via_service == "auto" and not settings.milvus.is_lite):
        return None
    from ray import serve

    ensure_ray(args)
    try:
        apps = serve.status().applications
    except Exception:  # no Serve on this cluster
        apps = {}
    if args.app_name in apps and str(apps[args.app_name].status).endswith("RUNNING"):
        return search_handle(args.app_name)
    if args.via_service == "yes":
        raise SystemExit(f"Serve application {args.app_name!r} is not running")
    return None
