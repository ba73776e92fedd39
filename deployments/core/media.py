"""Product photos on local (or shared, mounted) storage, addressed by content hash."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from deployments.core.errors import InvalidInput, NotFound

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif"}


def check_image(data: bytes, max_pixels: int) -> str:
    """Judge an upload by its bytes (not its name): the image MIME type, or InvalidInput when it
    is not a supported image or claims more pixels than allowed (decompression bombs)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = CONTENT_TYPES.get(img.format or "")
            width, height = img.size
    except Image.DecompressionBombError:
        raise InvalidInput(f"image has more than {max_pixels} pixels; send a smaller image",
                           code="image_too_large") from None
    except (OSError, SyntaxError, ValueError):
        mime = None
    if mime is None:
        raise InvalidInput("the upload is not a readable JPEG, PNG, WEBP or GIF image",
                           code="unsupported_media_type")
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} pixels; the limit is {max_pixels}",
                           code="image_too_large")
    return mime


def sniff_content_type(data: bytes) -> str:
    """The image MIME type judged from the bytes, not the file name."""
    try:
        return check_image(data, max_pixels=2**62)
    except InvalidInput:
        return "application/octet-stream"


class MediaStore:
    """Stores each photo once under `<root>/<hash[:2]>/<hash><ext>`; refs are relative paths."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, digest: str) -> str:
        """Store photo bytes (atomically, once per content) and return their ref."""
        ext = EXTENSIONS.get(sniff_content_type(data), ".bin")
        ref = f"{digest[:2]}/{digest}{ext}"
        path = self.root / ref
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return ref

    def get(self, ref: str) -> tuple[bytes, str]:
        """Photo bytes and content type for a ref; NotFound if absent."""
        path = (self.root / ref).resolve()
        if not ref or self.root.resolve() not in path.parents or not path.is_file():
            raise NotFound(f"no stored image {ref!r}")
        mime = next((m for m, e in EXTENSIONS.items() if e == path.suffix), "image/jpeg")
        return path.read_bytes(), mime
