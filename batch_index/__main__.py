"""Command line for the catalogue index: create / drop / stats a collection, index a catalogue.

    python -m batch_index index --catalog products.csv [--images DIR]
    python -m batch_index index --images DIR              # a bare folder of photos
    ray job submit --working-dir . -- python -m batch_index index --catalog ...
    python -m batch_index fit                              # heads from the stored catalogue
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from batch_index import service, versions
from deployments.core.catalog import read_csv_catalog, read_folder_catalog
from deployments.core.errors import SearchError
from deployments.core.settings import DEFAULT_CONFIG, AppSettings, load_settings

log = logging.getLogger("batch_index")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's arguments."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file")
    common.add_argument("--milvus-uri", help="Milvus Lite path or server URL (default: config)")
    common.add_argument("--collection", help="collection name (default: config)")
    common.add_argument("--media-dir", help="where product photos are stored (default: config)")
    parser = argparse.ArgumentParser(prog="python -m batch_index", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", parents=[common], help="create the collection if missing")
    sub.add_parser("drop", parents=[common], help="delete the collection")
    sub.add_parser("stats", parents=[common], help="print the collection's size and settings")
    index = sub.add_parser("index", parents=[common], help="embed and store a catalogue")
    index.add_argument("--catalog", help="CSV with id, title, ..., image columns")
    index.add_argument("--images", help="image folder (CSV paths are relative to it)")
    index.add_argument("--columns", help="column mapping, e.g. title=productDisplayName")
    index.add_argument("--rejects", default="data/index-rejects.jsonl", help="rejects JSONL")
    index.add_argument("--force", action="store_true", help="re-embed unchanged rows too")
    index.add_argument("--limit", type=int, help="index only the first N rows")
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--image-actors", type=int, default=1, help="image encoder actor pool")
    index.add_argument("--text-actors", type=int, default=1, help="text encoder actor pool")
    index.add_argument("--image-threads", type=int, default=2, help="threads per image actor")
    index.add_argument("--num-gpus", type=float, default=0, help="GPUs per image actor")
    index.add_argument("--image-actor-cpus", type=float, default=0.25,
                       help="CPUs each image actor reserves (raise on a cluster so the "
                       "autoscaler sees the load)")
    index.add_argument("--text-actor-cpus", type=float, default=0.1)
    index.add_argument("--task-cpus", type=float, default=0.1,
                       help="CPUs each read/decode task reserves (with --num-gpus; on CPU "
                            "the image actors decode)")
    index.add_argument("--decode-tasks", type=int, default=2,
                       help="read/decode tasks running at once, with --num-gpus (raise on a "
                            "cluster)")
    index.add_argument("--writers", type=int, help="parallel writers (server only; default 4)")
    index.add_argument("--via-service", choices=["auto", "yes", "no"], default="auto",
                       help="write through the running service (auto: when it owns Lite)")
    index.add_argument("--app-name", default="shopsearch", help="Serve application to use")
    index.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)")
    index.add_argument("--no-fit", action="store_true", help="skip fitting heads after indexing")
    index.add_argument("--dashboard", action="store_true",
                       help="when this command starts its own Ray, start its dashboard too "
                            "(off: it costs CPU for the whole run and ends with the command)")
    fit = sub.add_parser("fit", parents=[common], help="fit heads on the stored catalogue")
    fit.add_argument("--via-service", choices=["auto", "yes", "no"], default="auto",
                     help="read through the running service (auto: when it owns Lite)")
    fit.add_argument("--app-name", default="shopsearch", help="Serve application to use")
    fit.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)")
    fit.add_argument("--dashboard", action="store_true",
                     help="when this command starts its own Ray, start its dashboard too")
    index.add_argument("--write-timeout", type=float, default=300,
                       help="seconds a batch write may take (Milvus Lite stalls writes while "
                       "it builds an index after each 128 MB)")
    versions.add_commands(sub, common)
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> AppSettings:
    """Config file settings with the command line's Milvus overrides."""
    settings = load_settings(args.config)
    milvus = settings.milvus.model_copy(update={
        k: v for k, v in (("uri", args.milvus_uri), ("collection", args.collection),
                          ("timeout_s", getattr(args, "write_timeout", None))) if v})
    media_dir = args.media_dir or settings.media_dir
    return settings.model_copy(update={"milvus": milvus, "media_dir": media_dir})


def open_store(settings: AppSettings):
    """Open the store, explaining the Lite one-process rule if another process holds it."""
    from deployments.core.store import ProductStore

    try:
        return ProductStore(settings.milvus)
    except SearchError as exc:
        if settings.milvus.is_lite:
            raise SystemExit(
                f"cannot open Milvus Lite at {settings.milvus.uri}: {exc.message}. Milvus Lite "
                "allows one process per data dir; if the service is running, use `index` (it "
                "writes through the service) or stop the service first.") from None
        raise


def cmd_create(settings: AppSettings) -> None:
    """Create the collection with dims read from the configured models."""
    store = open_store(settings)
    live = ensure_live(store, settings)
    print(f"collection {settings.milvus.collection!r} ({live}) ready at {settings.milvus.uri}")
    store.close()


def ensure_live(store, settings: AppSettings) -> str:
    """The physical collection behind the alias (a fresh store gets `<name>__v1`), refused
    when its vectors come from other models than the configured ones."""
    from deployments.core.versions import ensure_live as ensure
    from deployments.core.versions import image_model_id, text_model_id

    image_dim, text_dim = remembered_dims(settings)
    return ensure(store, settings.image_model, settings.text_model,
                  image_model_id(settings.image_model), image_dim,
                  text_model_id(settings.text_model), text_dim)


def remembered_dims(settings: AppSettings) -> tuple[int, int]:
    """(image_dim, text_dim) of the configured architectures (`encoders.model_dims`), kept in
    the model cache folder after the first time: reading them builds the timm model and imports
    transformers (~5 s), most of a rerun that finds nothing changed."""
    text = settings.text_model.model_path
    config = Path(text) / "config.json" if text else None
    key = hashlib.sha256(json.dumps([settings.image_model.model_name, text or "bundled"]).encode())
    if config is not None and config.exists():  # another model copied into the same folder
        key.update(config.read_bytes())
    path = Path(settings.image_model.cache_dir) / f"dims-{key.hexdigest()[:16]}.json"
    try:
        image_dim, text_dim = json.loads(path.read_text())
        return int(image_dim), int(text_dim)
    except (OSError, ValueError, TypeError):
        pass
    from deployments.core.encoders import model_dims

    dims = model_dims(settings.image_model, settings.text_model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(dims)))
    except OSError:  # a read-only cache folder: computed again next time
        pass
    return dims


def cmd_drop(settings: AppSettings) -> None:
    """Delete the collection."""
    from deployments.core.versions import VersionAdmin

    store = open_store(settings)
    VersionAdmin(store).drop_all()
    print(f"collection {settings.milvus.collection!r} dropped")
    store.close()


def cmd_stats(settings: AppSettings) -> None:
    """Print the collection's row count and index settings."""
    store = open_store(settings)
    stats = {"uri": settings.milvus.uri, "collection": settings.milvus.collection,
             "exists": store.exists()}
    if stats["exists"]:
        from deployments.core.encoders import model_dims

        store.ensure_collection(*model_dims(settings.image_model, settings.text_model))
        from deployments.core.versions import VersionAdmin

        admin = VersionAdmin(store)
        stats.update(live=admin.live(), versions=admin.versions())
        stats.update(rows=store.count(), metric=settings.milvus.metric,
                     index_type=settings.milvus.index_type,
                     index_params=settings.milvus.index_params)
    print(json.dumps(stats, indent=2))
    store.close()


def cmd_index(args: argparse.Namespace, settings: AppSettings) -> int:
    """Read the catalogue, run the Ray Data job, write, summarise."""
    from batch_index import pipeline

    if args.catalog:
        rows, rejects = read_csv_catalog(args.catalog, args.images, args.columns)
    elif args.images:
        rows, rejects = read_folder_catalog(args.images)
    else:
        raise SystemExit("give --catalog CSV (and optionally --images DIR) or --images DIR")
    if args.limit:
        rows = rows[: args.limit]
    options = pipeline.IndexOptions(
        batch_size=args.batch_size, image_actors=args.image_actors, text_actors=args.text_actors,
        image_threads=args.image_threads, num_gpus=args.num_gpus, force=args.force,
        image_actor_cpus=args.image_actor_cpus, text_actor_cpus=args.text_actor_cpus,
        task_cpus=args.task_cpus, decode_tasks=args.decode_tasks,
        writers=args.writers or (1 if settings.milvus.is_lite else 4),
        ray_address=service.ray_address(args), dashboard=args.dashboard,
    )
    search = service.running_search(args, settings)
    if search is not None:
        if args.collection or args.milvus_uri:
            raise SystemExit("the running service owns the Milvus Lite store and writes to its "
                             "own collection; drop --collection/--milvus-uri or use --via-service "
                             "no with another store")
        print(f"writing through the running service {args.app_name!r} (it owns the store)")
        versions.check_service_model(search, settings)
        known = {} if args.force else search.fingerprints.remote(None).result()
        writer = pipeline.service_writer(search)
        options.writers = 1
    else:

        store = open_store(settings)
        ensure_live(store, settings)
        known = {} if args.force else store.fingerprints()
        writer = pipeline.direct_writer(settings, store)
    summary = pipeline.run_index(rows, rejects, settings, known, writer, options)
    pipeline.write_rejects(args.rejects, summary.rejects)
    if not args.no_fit:  # before the summary, which stays the last line
        fit_unless_current(args, settings, search, None if search is not None else store,
                           force=args.force)
    print(summary.line())
    print(f"rejects: {summary.rejected} -> {Path(args.rejects).resolve()}")
    print("summary " + pipeline.summary_json(summary))
    return 0


def fit_unless_current(args: argparse.Namespace, settings: AppSettings, search=None,
                       store=None, force: bool = False) -> None:
    """The fit after `index`, skipped when the current heads were fitted on exactly the rows
    now stored with the same settings (batch_index.fitted_on): a rerun that changed nothing.
    `force` (index --force: vectors made again, perhaps by changed code) always fits."""
    from batch_index import fitted_on

    stored = (search.fingerprints.remote(None).result() if search is not None
              else store.fingerprints())
    if not force and fitted_on.is_current(settings, stored):
        print("heads unchanged: the current fit was made on this very catalogue")
        return
    heads = _fit(args, settings, search, store)
    if heads is not None:
        fitted_on.record(settings, stored, heads.version)


def cmd_fit(args: argparse.Namespace, settings: AppSettings, search=None, store=None) -> int:
    """Fit heads on the stored catalogue (batch_index.fit) and print their figures."""
    _fit(args, settings, search, store)
    return 0


def _fit(args: argparse.Namespace, settings: AppSettings, search=None, store=None):
    """Fit, save and print the heads; None when the catalogue is below heads.min_products."""
    from batch_index.fit import run_fit

    service.ensure_ray(args)
    if search is None and store is None:
        search = service.running_search(args, settings)
        if search is None:
            store = open_store(settings)
    heads = run_fit(settings, search, store)
    if heads is None:
        log.info("heads not fitted: fewer than heads.min_products = %d products",
                 settings.heads.min_products)
        return None
    print("heads " + json.dumps(heads.summary()))
    return heads


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    settings = settings_for(args)
    if args.command == "index":
        return cmd_index(args, settings)
    if args.command == "fit":
        return cmd_fit(args, settings)
    if args.command in versions.COMMANDS:
        return versions.main(args, settings)
    {"create": cmd_create, "drop": cmd_drop, "stats": cmd_stats}[args.command](settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
