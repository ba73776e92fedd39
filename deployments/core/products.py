"""What a product is: its typed attributes, shared by the API, the store and the batch job."""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

# Typed scalar attributes (filterable fields in Milvus); everything else goes to `attributes`.
STRING_FIELDS = (
    "category", "subcategory", "article_type", "colour", "size", "gender", "season", "usage",
)
# Fields the fitted heads (deployments.core.heads) may predict from a photo; each product's
# predicted value and its confidence are stored apart from the shop's own labels.
PREDICTED_FIELDS = tuple(f for f in STRING_FIELDS if f != "size")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
# The longest value of each stored string field, in characters: the one list of string limits.
# The store sizes each VARCHAR (whose max_length a Milvus server counts in UTF-8 bytes) at
# UTF8_MAX_BYTES times this, so every value accepted here is stored, on Milvus Lite and servers.
STRING_LIMITS = {"id": 64, "title": 500, **dict.fromkeys(STRING_FIELDS, 64), "image_ref": 256,
                 "image_hash": 64, "fingerprint": 64}
UTF8_MAX_BYTES = 4
# Prices are stored exactly (a DOUBLE) and read back as sent; the range a price may take:
PRICE_MAX = 1e12
INT64 = (-(2**63), 2**63 - 1)  # what Milvus JSON holds for an integer attribute


def check_price(value: float | None) -> float | None:
    """A price (or price filter bound) as stored: finite, 0 <= value <= PRICE_MAX, -0 as 0."""
    if value is None:
        return None
    if not math.isfinite(value) or not 0 <= value <= PRICE_MAX:
        raise PydanticCustomError(
            "price_range", "must be a finite number from 0 to {max} (got {value})",
            {"max": f"{PRICE_MAX:.0f}", "value": repr(value)})
    return value + 0.0  # -0.0 -> 0.0


Price = Annotated[float, AfterValidator(check_price)]
PRICE_SCHEMA = {"minimum": 0, "maximum": PRICE_MAX}


def _check_json_numbers(value: Any, where: str) -> None:
    """Every number inside a JSON attribute value is one Milvus JSON can hold."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise PydanticCustomError("number_range", "{where}: integers must be within 64 bits",
                                      {"where": where})
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("number_range", "{where}: numbers must be finite",
                                      {"where": where})
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_numbers(item, f"{where}[{i}]")


class Prediction(BaseModel):
    """A value the fitted heads predict for a product from its photo, with its calibrated
    probability (0..1)."""

    value: str
    confidence: float = Field(ge=0, le=1)


class Product(BaseModel):
    """A catalogue product as stored and returned (without its vectors)."""

    id: str = Field(pattern=ID_PATTERN, description="Shop's product id (letters, digits, ._:-)")
    title: str = Field(min_length=1, max_length=STRING_LIMITS["title"])
    category: str = Field("", max_length=STRING_LIMITS["category"])
    subcategory: str = Field("", max_length=STRING_LIMITS["subcategory"])
    article_type: str = Field("", max_length=STRING_LIMITS["article_type"])
    colour: str = Field("", max_length=STRING_LIMITS["colour"])
    size: str = Field("", max_length=STRING_LIMITS["size"])
    gender: str = Field("", max_length=STRING_LIMITS["gender"])
    season: str = Field("", max_length=STRING_LIMITS["season"])
    usage: str = Field("", max_length=STRING_LIMITS["usage"])
    price: Price | None = Field(None, json_schema_extra=PRICE_SCHEMA,
                                description=f"Stored exactly; 0 to {PRICE_MAX:.0f}")
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_ref: str = Field("", max_length=STRING_LIMITS["image_ref"],
                           description="Key of the stored photo")
    image_hash: str = Field("", max_length=STRING_LIMITS["image_hash"],
                            description="SHA-256 of the photo bytes")
    fingerprint: str = Field("", max_length=STRING_LIMITS["fingerprint"],
                             description="Hash of photo + fields (re-index)")
    predicted: dict[str, Prediction] = Field(
        default_factory=dict, description="What the fitted heads predict from the photo, per "
        "field (kept apart from the shop's labels; written by the service, never sent)")

    @field_validator("title", *STRING_FIELDS, mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("attributes")
    @classmethod
    def _attribute_numbers(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, item in value.items():
            _check_json_numbers(item, name)
        return value

    def embedding_text(self) -> str:
        """The text the text encoder embeds for this product."""
        words = [self.colour, self.article_type, self.gender and f"for {self.gender}", self.usage]
        parts = [self.title, " ".join(w for w in words if w), self.category, self.subcategory]
        return ". ".join(p for p in parts if p)

    def content_fingerprint(self) -> str:
        """Hash of everything stored about the product: unchanged rows are skipped on re-index."""
        content = self.model_dump_json(exclude={"image_ref", "fingerprint", "predicted"})
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
