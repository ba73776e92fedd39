"""Structured filters on searches: what a shopper may narrow by, validated before any query.

Filters arrive as query parameters (`?colour=Red&colour=Blue&price_max=50&attr.material=cotton`)
or as a JSON object in a request body; both become one `Filters` value. The store turns it into
a Milvus expression with every value escaped (store.filter_expression).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator

from deployments.core.errors import InvalidInput, validation_message
from deployments.core.products import PREDICTED_FIELDS, PRICE_SCHEMA, STRING_FIELDS, Price

ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_VALUES = 50
Scalar = str | float | bool


# One list of values per typed product field (products.STRING_FIELDS, the one field list).
_FieldFilters = create_model(
    "_FieldFilters",
    **{name: (list[str], Field(default_factory=list, max_length=MAX_VALUES))
       for name in STRING_FIELDS},
)


class Filters(_FieldFilters):
    """Attribute filters; values within a field are OR-ed, fields are AND-ed. One list of
    values per STRING_FIELDS field (`category`, `colour`, ...), then price bounds and JSON
    attributes."""

    model_config = ConfigDict(extra="forbid")

    # Validated as product prices are (finite, 0..PRICE_MAX); both bounds are inclusive.
    price_min: Price | None = Field(None, json_schema_extra=PRICE_SCHEMA)
    price_max: Price | None = Field(None, json_schema_extra=PRICE_SCHEMA)
    attributes: dict[str, list[Scalar]] = Field(default_factory=dict, max_length=20)
    # What the fitted heads predicted from each product's photo (stored apart from its labels).
    predicted: dict[str, list[str]] = Field(
        default_factory=dict, description="values predicted from the photo, per field "
        f"({', '.join(PREDICTED_FIELDS)})")
    predicted_confidence_min: float | None = Field(
        None, ge=0, le=1, description="with `predicted`: only predictions at least this sure")

    @field_validator("predicted", mode="before")
    @classmethod
    def _predicted(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("predicted must be an object of field -> value(s)")
        cleaned = {}
        for name, values in value.items():
            if name not in PREDICTED_FIELDS:
                raise ValueError(f"predicted.{name} is not predicted; predicted fields: "
                                 f"{', '.join(PREDICTED_FIELDS)}")
            cleaned[name] = cls._as_list(values)
            if not cleaned[name] or len(cleaned[name]) > MAX_VALUES:
                raise ValueError(f"predicted.{name} needs 1 to {MAX_VALUES} values")
        return cleaned

    @field_validator(*STRING_FIELDS, mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str) or not v.strip() or len(v) > 64:
                raise ValueError("values must be non-empty strings of at most 64 characters")
        return [v.strip() for v in values]

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("attributes must be an object of name -> value(s)")
        cleaned = {}
        for name, values in value.items():
            if not isinstance(name, str) or not ATTRIBUTE_NAME.match(name):
                raise ValueError(f"attribute name {name!r} must be letters, digits or _")
            values = values if isinstance(values, list) else [values]
            if not values or len(values) > MAX_VALUES:
                raise ValueError(f"attribute {name!r} needs 1 to {MAX_VALUES} values")
            for v in values:
                bad_float = isinstance(v, float) and not math.isfinite(v)
                if not isinstance(v, str | int | float | bool) or bad_float:
                    raise ValueError(f"attribute {name!r}: values must be strings, numbers "
                                     "or booleans")
            cleaned[name] = values
        return cleaned

    def is_empty(self) -> bool:
        """True when nothing is filtered."""
        return self == Filters()

    def used(self) -> dict[str, Any]:
        """The fields actually set (for logs and explanations)."""
        return self.model_dump(exclude_defaults=True)


def parse_filters(data: dict[str, Any] | None) -> Filters:
    """Validate a filters object; InvalidInput names the offending field."""
    try:
        filters = Filters.model_validate(data or {})
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc.errors(), "unknown filter"),
                           code="invalid_filter") from None
    if (filters.price_min is not None and filters.price_max is not None
            and filters.price_min > filters.price_max):
        raise InvalidInput("price_min must be <= price_max", code="invalid_filter")
    return filters


def filters_from_params(items: Iterable[tuple[str, str]], reserved: set[str]) -> Filters:
    """Filters from query parameters: `field=value` (repeatable), `price_min`, `price_max`,
    `attr.<name>=value`, `predicted.<field>=value` (the heads' prediction) and
    `predicted_confidence_min`; names in `reserved` (k, explain, ...) are the route's own."""
    data: dict[str, Any] = {}
    for key, value in items:
        if key in reserved:
            continue
        if key.startswith("attr."):
            data.setdefault("attributes", {}).setdefault(key[5:], []).extend(_scalars(value))
        elif key.startswith("predicted."):
            data.setdefault("predicted", {}).setdefault(key[10:], []).append(value)
        elif key in ("price_min", "price_max", "predicted_confidence_min"):
            data[key] = value
        elif key in STRING_FIELDS:
            data.setdefault(key, []).append(value)
        else:
            fields = ", ".join([*STRING_FIELDS, "price_min", "price_max", "attr.<name>",
                                "predicted.<field>", "predicted_confidence_min"])
            raise InvalidInput(f"unknown filter {key!r}; filter by one of: {fields}",
                               code="invalid_filter")
    return parse_filters(data)


def _scalars(value: str) -> list[Scalar]:
    """A query string matches the same text, or the number / boolean it spells, in JSON."""
    if value in ("true", "false"):
        return [value, value == "true"]
    try:
        number = float(value)
    except ValueError:
        return [value]
    return [value, number] if math.isfinite(number) else [value]

