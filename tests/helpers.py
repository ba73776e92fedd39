"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import io

from PIL import Image

from benchmarks.faults import free_port, wait_healthy  # noqa: F401 (shared with tests)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Encode an image as JPEG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
