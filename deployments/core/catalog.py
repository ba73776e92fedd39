"""Reading a catalogue (a CSV with image paths, or a bare folder of images) into valid rows and
rejects with reasons. No Ray here: the pipeline parallelises what comes out."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from deployments.core.errors import validation_message
from deployments.core.products import STRING_FIELDS, Product

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
PRODUCT_COLUMNS = {"id", "title", "price", "image", *STRING_FIELDS}


@dataclass
class CatalogRow:
    """A valid row: the product (as JSON) and the photo file to embed."""

    row: int
    id: str
    product_json: str
    image_path: str


@dataclass
class Reject:
    """A row that was not indexed, and why."""

    row: int
    id: str
    reason: str

    def as_json(self) -> str:
        """One JSONL line."""
        return json.dumps(asdict(self), ensure_ascii=False)


def parse_mapping(spec: str | None) -> dict[str, str]:
    """`ours=theirs,...` (e.g. `title=productDisplayName,colour=baseColour`) -> {theirs: ours}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or ours.strip() not in PRODUCT_COLUMNS:
            raise ValueError(f"bad column mapping {part!r}: use field=column with a field among "
                             f"{sorted(PRODUCT_COLUMNS)}")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def read_csv_catalog(
    csv_path: str | Path, images_dir: str | Path | None = None, columns: str | None = None,
) -> tuple[list[CatalogRow], list[Reject]]:
    """Valid rows and rejects of a CSV catalogue; image paths are relative to `images_dir`
    (default: the CSV's folder). Unknown columns become JSON attributes."""
    csv_path = Path(csv_path)
    base = Path(images_dir) if images_dir else csv_path.parent
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False).rename(
        columns=parse_mapping(columns))
    missing = {"id", "image"} - set(frame.columns)
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; map them with "
                         "--columns id=...,image=...")
    rows, rejects, seen = [], [], {}
    for number, record in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        result = _row(number, record, base, seen)
        (rejects if isinstance(result, Reject) else rows).append(result)
    return rows, rejects


def _row(number: int, record: dict[str, str], base: Path, seen: dict[str, int]):
    product_id = record.get("id", "").strip()
    if not product_id:
        return Reject(number, "", "empty id")
    if product_id in seen:
        return Reject(number, product_id, f"duplicate id (first on line {seen[product_id]})")
    image = record.get("image", "").strip()
    if not image:
        return Reject(number, product_id, "no image path")
    try:
        product = _product(product_id, record)
    except (ValidationError, ValueError) as exc:
        return Reject(number, product_id, _reason(exc))
    seen[product_id] = number
    return CatalogRow(number, product_id, product.model_dump_json(), str(base / image))


def _product(product_id: str, record: dict[str, str]) -> Product:
    fields = {k: v.strip() for k, v in record.items() if k in PRODUCT_COLUMNS - {"image"}}
    fields["id"] = product_id
    fields["title"] = fields.get("title") or product_id
    price = fields.pop("price", "")
    if price:
        try:
            value = float(price)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"price {price!r} is not a number")
        fields["price"] = value
    extra = {k: v for k, v in record.items() if k not in PRODUCT_COLUMNS and v != ""}
    return Product(**fields, attributes=extra)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return validation_message(exc.errors())
    return str(exc)


def read_folder_catalog(images_dir: str | Path) -> tuple[list[CatalogRow], list[Reject]]:
    """Every image file in a folder (recursively): id and title from the file name."""
    rows, rejects, seen = [], [], {}
    files = sorted(p for p in Path(images_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for number, path in enumerate(files, start=1):
        product_id = re.sub(r"[^A-Za-z0-9._:-]", "-", path.stem).strip("-._:")[:64]
        title = re.sub(r"[_-]+", " ", path.stem).strip() or product_id
        result = _row(number, {"id": product_id, "title": title, "image": str(path)},
                      Path("/"), seen)
        (rejects if isinstance(result, Reject) else rows).append(result)
    return rows, rejects
