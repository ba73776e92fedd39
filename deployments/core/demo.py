"""A synthetic demo catalogue the project makes itself: drawn products in several types and colours.

`generate_demo_catalog(dir, n)` writes `images/*.jpg` and `products.csv` in the layout of the
fashion-dev CSV (id, title, category, subcategory, article_type, colour, size, gender, season,
usage, price, image), deterministically, so tests and the demo see the same products every time.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from deployments.core.files import write_atomically

Draw = Callable[[ImageDraw.ImageDraw, tuple[int, int, int], float, float, float], None]

COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (200, 30, 40), "Blue": (30, 70, 200), "Green": (30, 150, 60), "Black": (25, 25, 25),
    "White": (250, 250, 250), "Yellow": (240, 200, 30), "Pink": (240, 120, 170),
    "Grey": (128, 128, 128), "Brown": (120, 70, 35), "Purple": (120, 50, 160),
}
BRANDS = ["Northwind", "Aurora", "Kestrel", "Lumen", "Marlow", "Tidewell"]
PATTERNS = ["Solid", "Striped", "Dotted"]
NOUNS = {"Tshirts": "T-shirt", "Dresses": "Dress", "Trousers": "Trousers",
         "Sports Shoes": "Sports Shoes", "Handbags": "Handbag", "Caps": "Cap", "Watches": "Watch",
         "Mugs": "Mug"}


def _tshirt(d, c, x, y, s):
    pts = [(-40, -45), (-15, -50), (15, -50), (40, -45), (60, -20), (42, -8), (35, -22),
           (35, 50), (-35, 50), (-35, -22), (-42, -8), (-60, -20)]
    d.polygon([(x + px * s, y + py * s) for px, py in pts], fill=c, outline=(40, 40, 40))


def _dress(d, c, x, y, s):
    pts = [(-18, -55), (18, -55), (22, -20), (55, 55), (-55, 55), (-22, -20)]
    d.polygon([(x + px * s, y + py * s) for px, py in pts], fill=c, outline=(40, 40, 40))


def _trousers(d, c, x, y, s):
    pts = [(-35, -55), (35, -55), (40, 55), (12, 55), (0, -10), (-12, 55), (-40, 55)]
    d.polygon([(x + px * s, y + py * s) for px, py in pts], fill=c, outline=(40, 40, 40))


def _shoe(d, c, x, y, s):
    pts = [(-60, 10), (-55, -25), (-30, -28), (-10, -5), (40, 5), (60, 20), (60, 30), (-60, 30)]
    d.polygon([(x + px * s, y + py * s) for px, py in pts], fill=c, outline=(40, 40, 40))
    d.rectangle([x - 60 * s, y + 30 * s, x + 60 * s, y + 38 * s], fill=(235, 235, 235),
                outline=(40, 40, 40))


def _handbag(d, c, x, y, s):
    d.arc([x - 28 * s, y - 60 * s, x + 28 * s, y - 5 * s], 180, 360, fill=(60, 40, 20),
          width=max(2, int(6 * s)))
    d.rounded_rectangle([x - 50 * s, y - 30 * s, x + 50 * s, y + 45 * s], radius=int(10 * s),
                        fill=c, outline=(40, 40, 40))


def _cap(d, c, x, y, s):
    d.pieslice([x - 45 * s, y - 40 * s, x + 45 * s, y + 40 * s], 180, 360, fill=c,
               outline=(40, 40, 40))
    d.ellipse([x - 10 * s, y - 4 * s, x + 70 * s, y + 12 * s], fill=c, outline=(40, 40, 40))


def _watch(d, c, x, y, s):
    d.rectangle([x - 14 * s, y - 60 * s, x + 14 * s, y + 60 * s], fill=c, outline=(40, 40, 40))
    d.ellipse([x - 30 * s, y - 30 * s, x + 30 * s, y + 30 * s], fill=(210, 210, 215),
              outline=(40, 40, 40), width=max(2, int(5 * s)))
    d.line([x, y, x, y - 20 * s], fill=(20, 20, 20), width=2)
    d.line([x, y, x + 14 * s, y], fill=(20, 20, 20), width=2)


def _mug(d, c, x, y, s):
    d.ellipse([x + 20 * s, y - 25 * s, x + 55 * s, y + 25 * s], outline=c, width=max(3, int(8 * s)))
    d.rectangle([x - 40 * s, y - 45 * s, x + 30 * s, y + 45 * s], fill=c, outline=(40, 40, 40))


# article type -> (category, subcategory, drawing, sizes, usage)
TYPES: dict[str, tuple[str, str, Draw, list[str], str]] = {
    "Tshirts": ("Apparel", "Topwear", _tshirt, ["S", "M", "L", "XL"], "Casual"),
    "Dresses": ("Apparel", "Dress", _dress, ["S", "M", "L"], "Party"),
    "Trousers": ("Apparel", "Bottomwear", _trousers, ["30", "32", "34", "36"], "Formal"),
    "Sports Shoes": ("Footwear", "Shoes", _shoe, ["40", "41", "42", "43", "44"], "Sports"),
    "Handbags": ("Accessories", "Bags", _handbag, ["One Size"], "Casual"),
    "Caps": ("Accessories", "Headwear", _cap, ["One Size"], "Sports"),
    "Watches": ("Accessories", "Watches", _watch, ["One Size"], "Casual"),
    "Mugs": ("Home", "Kitchen", _mug, ["350 ml"], "Home"),
}


def _pattern(img: Image.Image, mask: Image.Image, pattern: str, rng: random.Random) -> None:
    """Overlay stripes or dots inside the product's silhouette."""
    if pattern == "Solid":
        return
    layer = Image.new("RGB", img.size, (245, 245, 245))
    draw = ImageDraw.Draw(layer)
    step = rng.randint(12, 18)
    for i in range(-img.height, img.width + img.height, step):
        if pattern == "Striped":
            draw.line([(i, 0), (i + img.height // 3, img.height)], fill=(250, 250, 250), width=3)
        else:
            for j in range(0, img.height, step):
                draw.ellipse([i, j, i + 4, j + 4], fill=(250, 250, 250))
    img.paste(layer, (0, 0), Image.eval(mask, lambda v: 110 if v else 0))


def draw_product(article_type: str, colour: str, pattern: str, seed: int) -> Image.Image:
    """Render one product photo: a drawn product on a light studio background."""
    rng = random.Random(seed)
    width, height = rng.choice([(240, 320), (256, 256), (300, 300)])
    background = tuple(rng.randint(232, 252) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    mask_rgb = Image.new("RGB", (width, height), (0, 0, 0))
    jitter = [rng.randint(-8, 8) for _ in range(3)]
    fill = tuple(max(0, min(255, v + j)) for v, j in zip(COLOURS[colour], jitter, strict=True))
    x = width / 2 + rng.uniform(-12, 12)
    y = height / 2 + rng.uniform(-12, 12)
    scale = min(width, height) / 150 * rng.uniform(0.9, 1.1)
    drawing = TYPES[article_type][2]
    drawing(ImageDraw.Draw(img), fill, x, y, scale)
    drawing(ImageDraw.Draw(mask_rgb), (255, 255, 255), x, y, scale)
    mask = mask_rgb.convert("L").point(lambda v: 255 if v > 0 else 0)
    _pattern(img, mask, pattern, rng)
    return img.filter(ImageFilter.SMOOTH)


def demo_rows(n: int, seed: int = 7) -> list[dict[str, str]]:
    """Attributes of n demo products, cycling through every type x colour."""
    rng = random.Random(seed)
    combos = [(t, c) for t in TYPES for c in COLOURS]
    rows = []
    for i in range(n):
        article_type, colour = combos[i % len(combos)]
        category, subcategory, _, sizes, usage = TYPES[article_type]
        pattern = PATTERNS[(i // len(combos)) % len(PATTERNS)]
        gender = "Women" if article_type in ("Dresses", "Handbags") else rng.choice(
            ["Men", "Women", "Unisex"])
        brand = rng.choice(BRANDS)
        pattern_word = "" if pattern == "Solid" else f"{pattern} "
        rows.append({
            "id": f"demo-{i:04d}",
            "title": f"{brand} {gender} {pattern_word}{colour} {NOUNS[article_type]}",
            "category": category, "subcategory": subcategory, "article_type": article_type,
            "colour": colour, "size": rng.choice(sizes), "gender": gender,
            "season": rng.choice(["Summer", "Winter", "Spring", "Fall"]), "usage": usage,
            "price": f"{rng.uniform(5, 150):.2f}", "pattern": pattern,
            "image": f"images/demo-{i:04d}.jpg",
        })
    return rows


def generate_demo_catalog(out_dir: str | Path, n: int = 240, seed: int = 7) -> Path:
    """Write n demo products (images + products.csv) under out_dir; returns the CSV path."""
    out = Path(out_dir)
    csv_path = out / "products.csv"
    rows = demo_rows(n, seed)
    if csv_path.exists() and sum(1 for _ in csv_path.open()) == n + 1:
        return csv_path
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        image = draw_product(row["article_type"], row["colour"], row["pattern"], seed * 100003 + i)
        image.save(out / row["image"], "JPEG", quality=90)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)
    return write_atomically(csv_path, table.getvalue().encode("utf-8"))  # csv's own \r\n
