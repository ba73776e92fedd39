"""Versioned rebuilds of the index beside the live service: rebuild, swap, rollback, gc, versions.

    python -m batch_index rebuild --model-config new.yaml     # or --image-model / --image-weights
    python -m batch_index swap                                # catch up, check, move the alias
    python -m batch_index rollback                            # the alias back one version
    python -m batch_index gc --keep 2                         # drop older versions
    python -m batch_index versions                            # what made each version

A rebuild re-embeds the live collection's products (fields from Milvus, photos from the media
store) with the new model into `<alias>__v<n+1>`, through the same Ray Data pipeline as `index`.
`swap` first catches up (re-embeds products written or changed since, deletes products removed
since: the writes accepted during the rebuild), then checks the new version (row count, each
sampled product finds itself, ANN recall@10 against exact search) and only then moves the alias.
With a Milvus server the job connects directly; with Milvus Lite owned by the running service,
every store operation goes through the service's ProductSearch deployment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from batch_index.service import ensure_ray, running_search
from deployments.core.catalog import CatalogRow
from deployments.core.settings import AppSettings, load_settings

COMMANDS = ("rebuild", "swap", "rollback", "gc", "versions")
_OPENED: list = []  # stores a command opened, closed when it ends


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """Register the version commands on the CLI's subparsers."""
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--via-service", choices=["auto", "yes", "no"], default="auto",
                     help="go through the running service (auto: when it owns Milvus Lite)")
    job.add_argument("--app-name", default="shopsearch", help="Serve application to use")
    job.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)")
    embed = argparse.ArgumentParser(add_help=False)
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--image-threads", type=int, default=2)
    embed.add_argument("--image-actor-cpus", type=float, default=0.25)
    embed.add_argument("--text-actor-cpus", type=float, default=0.1)
    embed.add_argument("--task-cpus", type=float, default=0.1)
    embed.add_argument("--num-gpus", type=float, default=0)
    check = argparse.ArgumentParser(add_help=False)
    check.add_argument("--sample", type=int, default=20, help="products sampled by the checks")
    check.add_argument("--min-recall", type=float, default=0.9, help="ANN recall@10 needed")
    check.add_argument("--max-lag", type=int, default=5, help="catch-up passes repeat until "
                       "one re-embeds or deletes at most this many products")
    check.add_argument("--max-passes", type=int, default=4, help="catch-up passes at most")
    rebuild = sub.add_parser("rebuild", parents=[common, job, embed],
                             help="re-embed the live catalogue into a new version")
    rebuild.add_argument("--model-config", help="Serve config with the new model settings")
    rebuild.add_argument("--image-model", help="timm model name of the new version")
    rebuild.add_argument("--image-weights", help="checkpoint path, `package` or `timm`")
    sub.add_parser("swap", parents=[common, job, embed, check],
                   help="catch up, check and point the alias at the newest version")
    rollback = sub.add_parser("rollback", parents=[common, job],
                              help="point the alias back at the previous version")
    rollback.add_argument("--to", help="collection to point at (default: the one before)")
    gc = sub.add_parser("gc", parents=[common, job], help="drop old versions")
    gc.add_argument("--keep", type=int, default=2, help="newest versions kept (live always)")
    sub.add_parser("versions", parents=[common, job], help="list versions and what made each")


class ServiceAdmin:
    """VersionAdmin through the running service's ProductSearch (it owns Milvus Lite)."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __getattr__(self, method: str):
        return lambda *args: self.handle.version_admin.remote(method, *args).result()


class VersionWriter:
    """The pipeline's writer into one version (photos are in the media store already)."""

    def __init__(self, admin, collection: str) -> None:
        self.admin, self.collection = admin, collection

    def __call__(self, products, images, image_vectors, text_vectors, colour_vectors) -> None:
        self.admin.write(self.collection, products, image_vectors, text_vectors,
                         colour_vectors)

    def finish(self) -> None:
        """Seal what was written."""
        self.admin.flush(self.collection)


def _admin(args: argparse.Namespace, settings: AppSettings):
    """VersionAdmin in-process (direct to Milvus) or through the service."""
    from deployments.core.versions import VersionAdmin

    handle = running_search(args, settings)
    if handle is not None:
        print(f"going through the running service {args.app_name!r} (it owns the store)")
        return ServiceAdmin(handle)
    from batch_index.__main__ import open_store

    store = open_store(settings)
    _OPENED.append(store)
    return VersionAdmin(store)


def new_settings(args: argparse.Namespace, live: AppSettings) -> AppSettings:
    """The live settings with the new version's models (and index settings) applied."""
    settings = live
    if args.model_config:
        other = load_settings(args.model_config)
        milvus = live.milvus.model_copy(update={k: getattr(other.milvus, k) for k in (
            "metric", "index_type", "index_params", "search_params")})
        settings = live.model_copy(update={"image_model": other.image_model,
                                           "text_model": other.text_model, "milvus": milvus})
    update = {k: v for k, v in (("model_name", args.image_model),
                                ("weights", args.image_weights)) if v}
    if update:
        settings = settings.model_copy(update={
            "image_model": settings.image_model.model_copy(update=update)})
    return settings


def _options(args: argparse.Namespace):
    from batch_index import pipeline

    return pipeline.IndexOptions(
        batch_size=args.batch_size, image_actors=1, text_actors=1,
        image_threads=args.image_threads, num_gpus=args.num_gpus, force=False,
        image_actor_cpus=args.image_actor_cpus, text_actor_cpus=args.text_actor_cpus,
        task_cpus=args.task_cpus, writers=1)


def changes(current: dict[str, str], known: dict[str, str],
            since: dict[str, str] | None = None) -> tuple[set[str], list[str]]:
    """Which ids to re-embed into the new version and which to delete from it, by content
    fingerprint: `current` the live version's, `known` the new version's, `since` the live
    version's as an earlier pass read them (then only what changed in the live version since,
    and never over an id the new version was written since)."""
    if since is None:
        return ({i for i, f in current.items() if known.get(i) != f},
                [i for i in known if i not in current])
    untouched = {i for i in {*since, *current} if known.get(i) == since.get(i)}
    return ({i for i, f in current.items() if since.get(i) != f and i in untouched},
            [i for i in since if i not in current and i in untouched])


def sync(admin, live: str, new: str, settings: AppSettings, media_dir: str,
         args: argparse.Namespace, since: dict[str, str] | None = None) -> dict[str, Any]:
    """Make version `new` hold the live products, embedded by `settings`' models: re-embed
    those new or changed (by content fingerprint), delete those gone. With `since` (the live
    fingerprints an earlier pass read), only what changed in the live version since then, and
    never over a product the new version got newer writes for. The result's `snapshot` is the
    live fingerprints this pass read."""
    from batch_index import pipeline

    products = admin.products(live)
    current = {p.id: p.fingerprint for p in products}
    known = admin.fingerprints(new)
    todo, gone = changes(current, known, since)
    rows = [CatalogRow(i, p.id, p.model_dump_json(), str(Path(media_dir) / p.image_ref))
            for i, p in enumerate(products) if p.id in todo]
    indexed = 0
    if rows:
        ensure_ray(args)
        summary = pipeline.run_index(rows, [], settings, known, VersionWriter(admin, new),
                                     _options(args))
        if summary.rejected:
            print(f"{summary.rejected} products could not be re-embedded: "
                  f"{[r.as_json() for r in summary.rejects[:5]]}")
        indexed = summary.indexed
    admin.delete(new, gone)
    admin.flush(new)
    return {"embedded": indexed, "deleted": len(gone), "live_rows": len(products),
            "snapshot": current}


def cmd_rebuild(args: argparse.Namespace, live_settings: AppSettings) -> int:
    """Create the next version with the new models and embed the live catalogue into it."""
    from deployments.core.encoders import model_dims
    from deployments.core.versions import Provenance, image_model_id

    start = time.perf_counter()
    settings = new_settings(args, live_settings)
    admin = _admin(args, live_settings)
    live = admin.live()
    if not live:
        raise SystemExit(f"no live collection {live_settings.milvus.collection!r} to rebuild "
                         "from: `python -m batch_index index` builds the first one")
    old = admin.provenance(live)
    if old and old["text_model"] != Provenance.of(
            settings.image_model, 0, settings.text_model, 0, settings.milvus).text_model:
        raise SystemExit("changing the text model is not supported by rebuild yet (text "
                         "queries are not routed by model during the encoder rollout)")
    image_dim, text_dim = model_dims(settings.image_model, settings.text_model)
    provenance = Provenance.of(settings.image_model, image_dim, settings.text_model, text_dim,
                               settings.milvus)
    if old and old["image_model"] == image_model_id(settings.image_model):
        print(f"note: the new version uses the live version's image model {old['image_model']}")
    new = admin.create_next(json.loads(provenance.model_dump_json()), image_dim, text_dim)
    print(f"rebuilding {live} -> {new} with {provenance.image_model}")
    result = sync(admin, live, new, settings, live_settings.media_dir, args)
    result.pop("snapshot")
    result.update(collection=new, live=live, seconds=round(time.perf_counter() - start, 1))
    print("rebuild " + json.dumps(result))
    print(f"next: `python -m batch_index swap` (checks {new}, then moves the alias to it), and "
          "deploy the new model settings to the service's encoders")
    return 0


def _newest(admin) -> tuple[dict, list[dict]]:
    versions = admin.versions()
    numbered = [v for v in versions if v["version"]]
    if not numbered:
        raise SystemExit("no versioned collections: `python -m batch_index rebuild` first")
    return numbered[-1], versions


def cmd_swap(args: argparse.Namespace, live_settings: AppSettings) -> int:
    """Catch up the newest version with writes made since the rebuild, check it, move the
    alias to it. Exit 1 (alias unchanged) when a check fails."""
    start = time.perf_counter()
    admin = _admin(args, live_settings)
    newest, _ = _newest(admin)
    live = admin.live()
    if newest["collection"] == live:
        print(f"{live} is already live")
        return 0
    provenance = newest["provenance"] or {}
    settings = live_settings.model_copy(update={
        "image_model": live_settings.image_model.model_copy(
            update=provenance.get("image_settings", {})),
        "text_model": live_settings.text_model.model_copy(
            update=provenance.get("text_settings", {}))})
    new = newest["collection"]
    # Catch up until a pass finds little to do (writes keep coming while a pass embeds).
    passes = []
    for _ in range(args.max_passes):
        caught_up = sync(admin, live, new, settings, live_settings.media_dir, args)
        snapshot = caught_up.pop("snapshot")
        passes.append(caught_up)
        if caught_up["embedded"] + caught_up["deleted"] <= args.max_lag:
            break
    print("catch-up " + json.dumps(caught_up) + f" ({len(passes)} passes)")
    report = admin.check(new, live, args.sample, 10, args.min_recall, len(snapshot))
    print("check " + json.dumps(report))
    if not report["ok"]:
        print(f"not swapped: {new} failed its checks; the alias stays on {live}")
        return 1
    admin.point(new)
    # Writes the live version took after the last pass (up to the move: from then on writes
    # go to the new version) are carried over now.
    after = sync(admin, live, new, settings, live_settings.media_dir, args, since=snapshot)
    after.pop("snapshot")
    print("after-swap " + json.dumps(after))
    print(f"alias {live_settings.milvus.collection!r}: {live} -> {new} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_rollback(args: argparse.Namespace, live_settings: AppSettings) -> int:
    """Point the alias back at the previous version (or --to)."""
    admin = _admin(args, live_settings)
    versions = admin.versions()
    live = admin.live()
    older = [v["collection"] for v in versions
             if v["version"] and v["collection"] != live
             and v["version"] < next((x["version"] for x in versions if x["live"]), 1 << 30)]
    target = args.to or (older[-1] if older else None)
    if target is None:
        raise SystemExit(f"no version before {live} to roll back to")
    admin.point(target)
    print(f"alias {live_settings.milvus.collection!r}: {live} -> {target}; deploy the "
          "matching model settings to the encoders")
    return 0


def cmd_gc(args: argparse.Namespace, live_settings: AppSettings) -> int:
    """Drop versions older than the newest --keep (never the live one)."""
    admin = _admin(args, live_settings)
    numbered = [v for v in admin.versions() if v["version"]]
    keep = {v["collection"] for v in numbered[-max(1, args.keep):]}
    dropped = [v["collection"] for v in numbered
               if v["collection"] not in keep and not v["live"]]
    for name in dropped:
        admin.drop(name)
    print(json.dumps({"dropped": dropped, "kept": sorted(keep)}))
    return 0


def cmd_versions(args: argparse.Namespace, live_settings: AppSettings) -> int:
    """Print every version, which one is live, and what made each."""
    admin = _admin(args, live_settings)
    print(json.dumps({"alias": live_settings.milvus.collection, "live": admin.live(),
                      "versions": admin.versions()}, indent=2))
    return 0


def main(args: argparse.Namespace, settings: AppSettings) -> int:
    """Run one version command."""
    try:
        return {"rebuild": cmd_rebuild, "swap": cmd_swap, "rollback": cmd_rollback,
                "gc": cmd_gc, "versions": cmd_versions}[args.command](args, settings)
    finally:
        while _OPENED:
            _OPENED.pop().close()


def check_service_model(handle, settings: AppSettings) -> None:
    """Before `index` writes through the service: SystemExit unless the live version's vectors
    come from the configured models (the job would otherwise store another model's vectors)."""
    from deployments.core.versions import image_model_id, text_model_id

    admin = ServiceAdmin(handle)
    made = admin.provenance(admin.live())
    if made is None:
        return
    wanted = {"image_model": image_model_id(settings.image_model),
              "text_model": text_model_id(settings.text_model)}
    wrong = [f"{k}: live {made[k]!r}, config {v!r}" for k, v in wanted.items() if made[k] != v]
    if wrong:
        raise SystemExit(f"the live index was made by other models ({'; '.join(wrong)}); index "
                         "with the config that made it, or `rebuild` into the new model first")
