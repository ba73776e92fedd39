"""Product photos on local (or shared, mounted) storage, addressed by content hash."""

from __future__ import annotations

from pathlib import Path

from deployments.core.errors import NotFound
from deployments.core.files import write_atomically
from deployments.core.images import EXTENSIONS, sniff_content_type


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
            write_atomically(path, data)
        return ref

    def get(self, ref: str) -> tuple[bytes, str]:
        """Photo bytes and content type for a ref (by its extension, which `put` chose from
        the bytes: a phone's MPO JPEG is `.jpg`, served as image/jpeg); NotFound if absent."""
        path = (self.root / ref).resolve()
        if not ref or self.root.resolve() not in path.parents or not path.is_file():
            raise NotFound(f"no stored image {ref!r}")
        mime = next((m for m, e in EXTENSIONS.items() if e == path.suffix), "image/jpeg")
        return path.read_bytes(), mime
