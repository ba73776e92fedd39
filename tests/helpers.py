"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import io
import socket
import time

import httpx
from PIL import Image


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    """Encode an image as JPEG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def wait_healthy(url: str, products: int = 0, timeout: float = 180) -> dict:
    """Poll /healthz until it is 200 with at least `products` products indexed."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10)
            last = r.text
            if r.status_code == 200 and r.json()["products"] >= products:
                return r.json()
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"service not healthy in {timeout}s: {last}")
