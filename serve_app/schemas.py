"""Request and response bodies of the HTTP API (they make up the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from deployments.core.products import Prediction, Product
from deployments.core.store import Hit


class TextQuery(BaseModel):
    """A text search: a description of the product wanted."""

    query: str = Field(description="What the shopper typed")
    k: int = Field(10, description="How many results")
    explain: bool = Field(False, description="say why each result ranked")
    filters: dict[str, Any] | None = Field(
        None, description='e.g. {"colour": ["Red"], "gender": "Women", "price_max": 50, '
        '"attributes": {"material": "cotton"}}')


class ResultItem(BaseModel):
    """One product in a result list."""

    id: str
    score: float | None = Field(
        None, description="The score the list is ranked by, descending: a photo search's "
        "re-ranking score (0..1: visual, colour and attribute evidence, weighted), a text "
        "search's text cosine (averaged with the evidence of attribute words it names), a "
        "photo + text search's fused score; `explain=true` shows the similarities beside it")
    title: str
    image_url: str
    attributes: dict[str, Any]
    explain: dict[str, Any] | None = Field(None, description="per-signal scores (explain=true)")
    predicted: dict[str, Prediction] = Field(
        default_factory=dict, description="what the heads fitted on this catalogue predict from "
        "the photo, per field: value and confidence (0..1), kept apart from the shop's own "
        "`attributes`; filter with `predicted.<field>=value`")
    found_by: str | None = Field(None, description='with fitted heads, a text search says what '
                                 'found the product: "text", "photo" (its pixels) or "both"')

    @classmethod
    def of(cls, product: Product, score: float | None = None,
           explain: dict[str, Any] | None = None) -> ResultItem:
        """Build from a stored product."""
        return cls(
            id=product.id, score=score, title=product.title,
            image_url=f"/images/{product.id}", attributes=product.public_attributes(),
            predicted=product.predicted, explain=explain,
        )


class SearchResponse(BaseModel):
    """Results best first, and the server-side time taken."""

    results: list[ResultItem]
    took_ms: float
    heads_version: str | None = Field(None, description="the fitted heads artifact that ranked "
                                      "the results (`python -m batch_index fit`); null: none")

    @classmethod
    def of(cls, hits: list[Hit], took_ms: float) -> SearchResponse:
        """Build from store hits."""
        return cls(results=[ResultItem.of(h.product, h.score, h.signals).model_copy(
                            update={"found_by": h.found_by}) for h in hits],
                   took_ms=round(took_ms, 2),
                   heads_version=next((h.heads_version for h in hits if h.heads_version), None))


class ProductPage(BaseModel):
    """A page of the catalogue."""

    results: list[ResultItem]
    total: int
    limit: int
    offset: int


class ErrorBody(BaseModel):
    """What went wrong and how to fix it."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this shape."""

    error: ErrorBody
