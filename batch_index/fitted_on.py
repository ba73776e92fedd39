"""Whether the current heads were fitted on the catalogue now stored, so that an `index` run
that changed nothing does not fit them again (the same data and settings give the same heads).

A marker beside the artifact, `<heads.dir>/<collection>/fitted-on.json`, names the heads
version and a key: SHA-256 over every stored (id, fingerprint) pair, the `heads:` settings and
the two model ids. Any stored row added, changed or removed (by this job or by the service),
other heads settings, other models, or another current version mean a new fit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deployments.core.files import write_atomically
from deployments.core.heads import current_version, heads_folder, model_ids
from deployments.core.settings import AppSettings

MARKER = "fitted-on.json"


# Settings only serving reads: changing them needs no refit.
SERVING_ONLY = {"poll_s", "prediction_weight", "evidence_weight", "words_candidates"}


def fit_key(settings: AppSettings, fingerprints: dict[str, str]) -> str:
    """64 hex chars identifying what a fit would read: stored id -> fingerprint, the heads
    settings and the model ids."""
    digest = hashlib.sha256()
    for product_id in sorted(fingerprints):
        digest.update(f"{product_id}\t{fingerprints[product_id]}\n".encode())
    digest.update(json.dumps({
        "heads": settings.heads.model_dump(mode="json", exclude=SERVING_ONLY),
        "models": model_ids(settings.image_model, settings.text_model),
    }, sort_keys=True).encode())
    return digest.hexdigest()


def _folder(settings: AppSettings) -> Path:
    return Path(heads_folder(settings.heads.dir, settings.milvus.collection))


def is_current(settings: AppSettings, fingerprints: dict[str, str]) -> bool:
    """True when the current heads were fitted on exactly these stored rows and settings."""
    path = _folder(settings) / MARKER
    version = current_version(_folder(settings))
    if version is None or not path.exists():
        return False
    marker = json.loads(path.read_text())
    return marker.get("version") == version and marker.get("key") == fit_key(
        settings, fingerprints)


def record(settings: AppSettings, fingerprints: dict[str, str], version: str) -> None:
    """Note that heads `version` was fitted on these stored rows (read before the fit)."""
    write_atomically(_folder(settings) / MARKER,
                     json.dumps({"version": version, "key": fit_key(settings, fingerprints)}))
