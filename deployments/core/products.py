"""What a product is: its typed attributes, shared by the API, the store and the batch job."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field, field_validator

# Typed scalar attributes (filterable fields in Milvus); everything else goes to `attributes`.
STRING_FIELDS = (
    "category", "subcategory", "article_type", "colour", "size", "gender", "season", "usage",
)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"


class Product(BaseModel):
    """A catalogue product as stored and returned (without its vectors)."""

    id: str = Field(pattern=ID_PATTERN, description="Shop's product id (letters, digits, ._:-)")
    title: str = Field(min_length=1, max_length=500)
    category: str = Field("", max_length=64)
    subcategory: str = Field("", max_length=64)
    article_type: str = Field("", max_length=64)
    colour: str = Field("", max_length=64)
    size: str = Field("", max_length=64)
    gender: str = Field("", max_length=64)
    season: str = Field("", max_length=64)
    usage: str = Field("", max_length=64)
    price: float | None = Field(None, ge=0)
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_ref: str = Field("", max_length=256, description="Key of the stored photo")
    image_hash: str = Field("", max_length=64, description="SHA-256 of the photo bytes")
    fingerprint: str = Field("", max_length=64, description="Hash of photo + fields (re-index)")

    @field_validator("title", *STRING_FIELDS, mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    def embedding_text(self) -> str:
        """The text the text encoder embeds for this product."""
        words = [self.colour, self.article_type, self.gender and f"for {self.gender}", self.usage]
        parts = [self.title, " ".join(w for w in words if w), self.category, self.subcategory]
        return ". ".join(p for p in parts if p)

    def content_fingerprint(self) -> str:
        """Hash of everything stored about the product: unchanged rows are skipped on re-index."""
        content = self.model_dump_json(exclude={"image_ref", "fingerprint"})
        return hashlib.sha256(content.encode()).hexdigest()

    def public_attributes(self) -> dict[str, Any]:
        """Typed and extra attributes as one flat dict, empty values left out."""
        attrs: dict[str, Any] = {f: getattr(self, f) for f in STRING_FIELDS if getattr(self, f)}
        if self.price is not None:
            attrs["price"] = self.price
        return {**attrs, **self.attributes}


def image_hash(data: bytes) -> str:
    """Content hash of a photo (identifies duplicates and unchanged rows)."""
    return hashlib.sha256(data).hexdigest()
