"""Stage 1 of the bulk job: read and decode photos in plain Ray Data tasks.

Kept apart from `batch_index.pipeline` and free of torch: a task worker unpickles
`load_images` and its preprocessor, and importing this module (numpy, Pillow, pydantic) costs
a fraction of a second where importing the encoders (torch, timm) cost seconds of CPU per
worker process, paid while the encoder actors load their models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deployments.core.errors import InvalidInput
from deployments.core.images import ImagePreprocessor, decode_image
from deployments.core.products import Product, image_hash

OK, REJECTED = "ok", "rejected"


def load_images(batch: dict[str, np.ndarray], *,
                preprocessor: ImagePreprocessor) -> dict[str, np.ndarray]:
    """Read and decode each row's photo (rows come stamped from `plan_rows`); mark unreadable
    ones. Rows to write carry the stamped product JSON, the photo bytes (`photo`, written by
    the driver), the model pixels (`pixels`, uint8 (n, H, W, 3), zeros for a rejected row) and
    the text to embed (`text`)."""
    n = len(batch["id"])
    height, width = preprocessor.input_size
    pixels = np.zeros((n, height, width, 3), dtype=np.uint8)
    out: dict[str, list[Any]] = {"product_json": [], "status": [], "reason": [], "photo": [],
                                 "text": []}
    for i in range(n):
        status, reason, product_json, data, text = OK, "", batch["product_json"][i], b"", ""
        try:
            data = Path(batch["image_path"][i]).read_bytes()
            product = Product.model_validate_json(product_json)
            if image_hash(data) != product.image_hash:  # the file changed since the plan
                from deployments.core.writes import stamp  # rare: imports the store

                product = stamp(product, data)
                product_json = product.model_dump_json()
            pixels[i] = preprocessor.model_pixels(decode_image(data))
            text = product.embedding_text()
        except FileNotFoundError:
            status, reason = REJECTED, f"image file not found: {batch['image_path'][i]}"
        except (OSError, InvalidInput) as exc:
            status, reason = REJECTED, getattr(exc, "message", None) or f"unreadable image: {exc}"
        if status == REJECTED:
            data = b""
        for key, value in (("product_json", product_json), ("status", status),
                           ("reason", reason), ("photo", data), ("text", text)):
            out[key].append(value)
    # Bytes stay objects: a fixed-width bytes array would drop trailing NUL bytes.
    return {"id": batch["id"], "row": batch["row"], "pixels": pixels,
            **{k: np.asarray(v, dtype=object) if k == "photo" else np.asarray(v)
               for k, v in out.items()}}
