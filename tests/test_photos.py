"""Issue 10: every photo a phone or a shop sends is read right, every price comes back as sent.

Table-driven over the real decode path (deployments.core.images) and the real service: each photo
variant is made here from a demo catalogue photo (no third-party data); prices and strings go
through POST /products, GET and the filters, and through the store on Milvus Lite and on the
Milvus Lite server process.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from pymilvus import DataType, MilvusClient

from deployments.core.colour import colour_descriptor, grey_layout, layout_similarity
from deployments.core.demo import draw_product
from deployments.core.errors import IncompatibleStore, InvalidInput
from deployments.core.filters import Filters, filters_from_params
from deployments.core.images import (
    ACCEPTED_FORMATS,
    ACCEPTED_TEXT,
    check_image,
    decode_image,
    has_colour,
)
from deployments.core.media import MediaStore
from deployments.core.products import PRICE_MAX, STRING_LIMITS, Product
from deployments.core.ranking import Candidate, query_signals, rerank, signal_matrix
from deployments.core.settings import MilvusSettings
from deployments.core.store import ProductStore, filter_expression
from tests.support import LiteServer, free_port, jpeg_bytes

# -- photo variants -------------------------------------------------------------------------
BACKGROUND = 24  # max channel distance from the border colour that counts as background


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _grey(src: Image.Image) -> np.ndarray:
    return np.asarray(src.convert("L"))


def _background(src: Image.Image) -> np.ndarray:
    """Mask of the studio background (close to the photo's border colour)."""
    arr = np.asarray(src, dtype=np.int16)
    border = np.median(np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]), axis=0)
    return np.abs(arr - border).max(axis=2) <= BACKGROUND


def _cut_out(src: Image.Image) -> Image.Image:
    """RGBA: the product opaque, the background fully transparent and BLACK underneath (so a
    decoder that ignores alpha sees a black background, not the white it must composite on)."""
    arr = np.dstack([np.asarray(src), np.full(src.size[::-1], 255, np.uint8)])
    arr[_background(src)] = (0, 0, 0, 0)
    return Image.fromarray(arr, "RGBA")


def _on_white(src: Image.Image) -> np.ndarray:
    arr = np.asarray(src).copy()
    arr[_background(src)] = 255
    return arr


def _palette_transparent(src: Image.Image) -> Image.Image:
    """Mode P with a transparent palette entry (black) for the background."""
    quantised = src.quantize(colors=255)
    index = np.asarray(quantised).copy()
    index[_background(src)] = 255
    palette = (quantised.getpalette() or [])[: 255 * 3]
    palette += [0, 0, 0] * (256 - len(palette) // 3)
    image = Image.fromarray(index, "P")
    image.putpalette(palette)
    image.info["transparency"] = 255
    return image


def _exif_rotated(src: Image.Image) -> bytes:
    """Pixels stored turned a quarter left, EXIF orientation 6 (turn right to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(src.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)


def _animated(src: Image.Image, fmt: str) -> bytes:
    other = Image.new("RGB", src.size, (200, 30, 40))
    return _save(src, fmt, save_all=True, append_images=[other], duration=100, loop=0)


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[Image.Image], bytes]
    mode: str  # Pillow mode of the file as opened (so the table really covers every mode)
    mime: str  # as stored and served
    colour: bool  # the file carries colour information
    reference: str  # what the decode must equal: rgb, grey, white (cut out on white), none
    tolerance: float  # mean absolute difference allowed (lossy codecs)


VARIANTS = [
    Variant("jpeg-baseline", lambda s: _save(s, "JPEG", quality=92), "RGB", "image/jpeg", True,
            "rgb", 3),
    Variant("jpeg-progressive", lambda s: _save(s, "JPEG", quality=92, progressive=True),
            "RGB", "image/jpeg", True, "rgb", 3),
    Variant("jpeg-mpo", lambda s: _save(s, "MPO", save_all=True,
                                        append_images=[s.resize((64, 64))]),
            "RGB", "image/jpeg", True, "rgb", 3),
    Variant("jpeg-exif-rotated", _exif_rotated, "RGB", "image/jpeg", True, "rgb", 3),
    Variant("jpeg-cmyk", lambda s: _save(s.convert("CMYK"), "JPEG", quality=92), "CMYK",
            "image/jpeg", True, "rgb", 3),
    Variant("jpeg-greyscale", lambda s: _save(s.convert("L"), "JPEG", quality=92), "L",
            "image/jpeg", False, "grey", 3),
    Variant("png-rgb", lambda s: _save(s, "PNG"), "RGB", "image/png", True, "rgb", 0.5),
    Variant("png-1", lambda s: _save(s.convert("1"), "PNG"), "1", "image/png", False, "none",
            0),
    Variant("png-L", lambda s: _save(s.convert("L"), "PNG"), "L", "image/png", False, "grey",
            0.5),
    Variant("png-LA", lambda s: _save(_cut_out(s).convert("LA"), "PNG"), "LA", "image/png",
            False, "none", 0),
    Variant("png-P", lambda s: _save(s.quantize(colors=256), "PNG"), "P", "image/png", True,
            "rgb", 4),
    Variant("png-P-transparent", lambda s: _save(_palette_transparent(s), "PNG"), "P",
            "image/png", True, "white", 4),
    Variant("png-RGBA", lambda s: _save(_cut_out(s), "PNG"), "RGBA", "image/png", True,
            "white", 0.5),
    Variant("png-16bit-grey", lambda s: _save(Image.fromarray(
        _grey(s).astype(np.uint16) * 257), "PNG"), "I;16", "image/png", False, "grey", 0.5),
    Variant("webp", lambda s: _save(s, "WEBP", quality=92), "RGB", "image/webp", True, "rgb",
            3),
    Variant("webp-alpha", lambda s: _save(_cut_out(s), "WEBP", lossless=True), "RGBA",
            "image/webp", True, "white", 0.5),
    Variant("webp-animated", lambda s: _animated(s, "WEBP"), "RGB", "image/webp", True, "rgb",
            3),
    Variant("gif", lambda s: _save(s, "GIF"), "P", "image/gif", True, "rgb", 6),
    Variant("gif-animated", lambda s: _animated(s, "GIF"), "P", "image/gif", True, "rgb", 6),
    Variant("gif-greyscale", lambda s: _save(s.convert("L"), "GIF"), "P", "image/gif", False,
            "grey", 0.5),
    Variant("avif", lambda s: _save(s, "AVIF", quality=90), "RGB", "image/avif", True, "rgb",
            4),
    Variant("bmp", lambda s: _save(s, "BMP"), "RGB", "image/bmp", True, "rgb", 0.5),
    Variant("tiff", lambda s: _save(s, "TIFF"), "RGB", "image/tiff", True, "rgb", 0.5),
    Variant("tiff-cmyk", lambda s: _save(s.convert("CMYK"), "TIFF"), "CMYK", "image/tiff",
            True, "rgb", 2),
    Variant("tiff-ycbcr", lambda s: _save(s.convert("YCbCr"), "TIFF"), "YCbCr", "image/tiff",
            True, "rgb", 2),
    Variant("tiff-16bit-big-endian", lambda s: _save(Image.frombytes(
        "I;16B", s.size, (_grey(s).astype(">u2") * 257).tobytes()), "TIFF"), "I;16B",
        "image/tiff", False, "grey", 0.5),
    Variant("tiff-32bit-int", lambda s: _save(Image.fromarray(
        _grey(s).astype(np.int32) * 257), "TIFF"), "I", "image/tiff", False, "grey", 0.5),
    Variant("tiff-float", lambda s: _save(Image.fromarray(
        _grey(s).astype(np.float32) / 255), "TIFF"), "F", "image/tiff", False, "grey", 0.5),
    Variant("heic", lambda s: _save(s, "HEIF", quality=90), "RGB", "image/heif", True, "rgb",
            4),
    Variant("heic-alpha", lambda s: _save(_cut_out(s), "HEIF", quality=90), "RGBA",
            "image/heif", True, "white", 4),
]
IDS = [v.name for v in VARIANTS]


def _source(seed: int = 5) -> Image.Image:
    return draw_product("Tshirts", "Blue", "Striped", seed=seed)


def _expected(variant: Variant, src: Image.Image) -> np.ndarray | None:
    if variant.reference == "rgb":
        return np.asarray(src)
    if variant.reference == "grey":
        return np.repeat(_grey(src)[:, :, None], 3, axis=2)
    if variant.reference == "white":
        return _on_white(src)
    return None


# -- decode path (no service) -----------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_mode_and_container_decodes_right(variant):
    src = _source()
    data = variant.make(src)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == variant.mode  # the table covers the mode it names
    assert check_image(data, max_pixels=10**7) == variant.mime
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == src.size
    assert has_colour(image) is variant.colour
    expected = _expected(variant, src)
    arr = np.asarray(image, dtype=np.float64)
    if expected is not None:
        assert np.abs(arr - expected).mean() <= variant.tolerance
    else:  # bilevel / grey with alpha: upright, not blank, the background white
        assert arr.std() > 20 and (arr[_background(src)] >= 250).mean() > 0.9


def test_16_bit_grey_is_scaled_not_clamped():
    """Case 2: I;16 reads as its 8-bit grey copy; two photos no longer read alike (white)."""
    first, second = (_grey(_source(seed)) for seed in (5, 6))
    decoded = [np.asarray(decode_image(_save(Image.fromarray(g.astype(np.uint16) * 257),
                                              "PNG")))[:, :, 0] for g in (first, second)]
    assert np.array_equal(decoded[0], first)
    assert decoded[0].shape != decoded[1].shape or not np.array_equal(decoded[0], decoded[1])
    assert decoded[0].mean() < 250


@pytest.mark.parametrize(("payload", "code"), [
    (b"plain text, not a photo", "unsupported_media_type"),
    (_save(Image.new("RGB", (32, 32)), "ICO"), "unsupported_media_type"),
    (_save(Image.new("RGB", (32, 32)), "PPM"), "unsupported_media_type"),
    (b"", "unsupported_media_type"),
])
def test_unsupported_files_name_the_accepted_formats(payload, code):
    with pytest.raises(InvalidInput) as caught:
        check_image(payload, max_pixels=10**7)
    assert caught.value.code == code
    assert all(name in caught.value.message for name in ACCEPTED_FORMATS)
    with pytest.raises(InvalidInput):
        decode_image(payload)


def test_truncated_photo_is_a_clear_invalid_image():
    data = _save(_source(), "JPEG", quality=92)
    with pytest.raises(InvalidInput) as caught:
        decode_image(data[: len(data) // 3])
    assert caught.value.code == "invalid_image" and ACCEPTED_TEXT in caught.value.message


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in (
    "jpeg-mpo", "heic", "avif", "tiff", "bmp", "webp")], ids=lambda v: v.name)
def test_photo_store_keeps_bytes_and_serves_the_sniffed_type(tmp_path, variant):
    data = variant.make(_source())
    media = MediaStore(tmp_path)
    ref = media.put(data, "ab" * 32)
    assert media.get(ref) == (data, variant.mime)


# -- the running service ----------------------------------------------------------------------
# Demo products the photo table searches for: a blue T-shirt (case 3), a green shoe, a yellow bag.
PRODUCTS = ("demo-0001", "demo-0032", "demo-0045")


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def catalogue_photos(client) -> dict[str, Image.Image]:
    photos = {}
    for product_id in PRODUCTS:
        r = client.get(f"/images/{product_id}")
        assert r.status_code == 200
        photos[product_id] = Image.open(io.BytesIO(r.content)).convert("RGB")
    return photos


def _search(client: httpx.Client, data: bytes, **params) -> httpx.Response:
    return client.post("/search/image", files={"image": ("photo", data)},
                       params={"k": 5, **params})


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_variant_finds_its_product_first(client, catalogue_photos, variant):
    for product_id, photo in catalogue_photos.items():
        r = _search(client, variant.make(photo))
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == product_id, (variant.name, r.json()["results"])


@pytest.mark.integration
def test_case1_phone_mpo_is_a_jpeg(client, catalogue_photos, auth_headers):
    photo = catalogue_photos["demo-0045"]
    mpo = _save(photo, "MPO", save_all=True, append_images=[photo.resize((80, 60))])
    plain = _search(client, jpeg_bytes(photo)).json()["results"][0]["id"]
    found = _search(client, mpo)
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["id"] == plain == "demo-0045"
    product = {"id": "photo-mpo-1", "title": "Phone photo listing", "article_type": "Handbags"}
    r = client.post("/products", files={"image": ("IMG_0001.JPG", mpo)},
                    data={"product": json.dumps(product)}, headers=auth_headers)
    assert r.status_code == 201, r.text
    try:
        served = client.get("/images/photo-mpo-1")
        assert served.headers["content-type"] == "image/jpeg" and served.content == mpo
    finally:
        client.delete("/products/photo-mpo-1", headers=auth_headers)


@pytest.mark.integration
def test_case2_16_bit_grey_finds_what_its_8_bit_copy_finds(client, catalogue_photos):
    firsts = set()
    for product_id, photo in catalogue_photos.items():
        grey = _grey(photo)
        wide = _save(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
        narrow = _save(Image.fromarray(grey), "PNG")
        first = _search(client, wide).json()["results"][0]["id"]
        assert first == _search(client, narrow).json()["results"][0]["id"] == product_id
        firsts.add(first)
    assert len(firsts) == len(catalogue_photos)  # no longer one list for every photo


@pytest.mark.integration
def test_case3_greyscale_photo_does_not_vote_on_colour(client, catalogue_photos):
    photo = catalogue_photos["demo-0001"]  # a blue T-shirt
    r = _search(client, _save(photo.convert("L"), "JPEG", quality=90), explain="true")
    top = r.json()["results"][0]
    assert top["id"] == "demo-0001"
    # No colour vote (no colour inferred, no colour-label score); the colour slot holds how
    # alike the candidate's photo looks in grey.
    assert "colour" not in top["explain"]["inferred"] and top["explain"]["colour_label"] == 0
    assert top["explain"]["photo_has_colour"] is False and top["explain"]["colour"] > 0.9
    # The colour photo still votes on colour as before.
    coloured = _search(client, jpeg_bytes(photo), explain="true").json()["results"][0]
    assert coloured["id"] == "demo-0001" and coloured["explain"]["inferred"]["colour"] == "Blue"
    assert coloured["explain"]["colour"] > 0.5


@pytest.mark.integration
def test_upload_routes_document_the_accepted_formats(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/search/image", "/search", "/products"):
        assert ACCEPTED_TEXT in paths[path]["post"]["description"], path
    r = client.post("/search/image", files={"image": ("x.ico", _save(
        Image.new("RGB", (16, 16)), "ICO"))})
    assert r.status_code == 415 and ACCEPTED_TEXT in r.json()["error"]["message"]


# -- prices and strings through the service ---------------------------------------------------
TWO_DECIMALS = [0.01, 0.1, 0.99, 1.005, 9.99, 19.99, 123.45, 999.99, 4321.09, 99999.99,
                1234567.89, 98765432.1, 999999999.99, 999999999999.99]
GOOD_PRICES = [  # (JSON text sent, value read back)
    ("19.99", 19.99), ("0", 0.0), ("-0", 0.0), ("-0.0", 0.0), (repr(PRICE_MAX), PRICE_MAX),
    ("1e12", PRICE_MAX), ("5e-324", 5e-324), *[(repr(p), p) for p in TWO_DECIMALS],
]
BAD_PRICES = ["NaN", "Infinity", "-Infinity", "1e39", "1e400", "-1e400", "-0.01",
              "1000000000000.01", "1e13"]


def _probe_photo() -> bytes:
    return jpeg_bytes(draw_product("Caps", "Purple", "Dotted", seed=9191))


def _post(client, auth_headers, product_json: str) -> httpx.Response:
    return client.post("/products", files={"image": ("p.jpg", _probe_photo())},
                       data={"product": product_json}, headers=auth_headers)


def _eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


@pytest.mark.integration
@pytest.mark.parametrize(("sent", "value"), GOOD_PRICES, ids=[s for s, _ in GOOD_PRICES])
def test_price_reads_back_as_sent_and_bounds_are_inclusive(client, auth_headers, sent, value):
    product_id = f"price-{sent}"
    r = _post(client, auth_headers,
              f'{{"id": "{product_id}", "title": "Price probe cap", "price": {sent}}}')
    assert r.status_code == 201, r.text
    try:
        got = client.get(f"/products/{product_id}")
        assert got.json()["attributes"]["price"] == value
        assert f'"price":{json.dumps(value)}' in got.text.replace(" ", "")  # as sent
        bound = repr(value)

        def hit_by_query() -> bool:  # query-string filters on the photo search
            found = _search(client, _probe_photo(), price_min=bound, price_max=bound, k=20)
            return product_id in [x["id"] for x in found.json()["results"]]

        def hit_by_json() -> bool:  # JSON filters on the text search
            found = client.post("/search/text", json={
                "query": "price probe cap", "k": 20,
                "filters": {"price_min": value, "price_max": value}})
            return product_id in [x["id"] for x in found.json()["results"]]

        assert _eventually(hit_by_query) and _eventually(hit_by_json)
        # The next double above / below the price leaves it out: stored exactly, no rounding.
        for name, neighbour in (("price_min", np.nextafter(value, np.inf)),
                                ("price_max", np.nextafter(value, -np.inf))):
            if 0 <= neighbour <= PRICE_MAX:
                found = _search(client, _probe_photo(), **{name: repr(float(neighbour))}, k=20)
                assert found.status_code == 200, found.text
                assert product_id not in [x["id"] for x in found.json()["results"]]
    finally:
        client.delete(f"/products/{product_id}", headers=auth_headers)


@pytest.mark.integration
@pytest.mark.parametrize("sent", BAD_PRICES)
def test_price_out_of_range_is_a_400_and_nothing_is_stored(client, auth_headers, sent):
    r = _post(client, auth_headers,
              f'{{"id": "bad-price", "title": "Price probe cap", "price": {sent}}}')
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "price" in message and f"{PRICE_MAX:.0f}" in message
    assert client.get("/products/bad-price").status_code == 404


@pytest.mark.integration
@pytest.mark.parametrize("bound", ["nan", "inf", "-inf", "1e39", "1e400", "-1", "1e13"])
def test_price_filter_out_of_range_is_a_400(client, bound):
    for name in ("price_min", "price_max"):
        r = _search(client, _probe_photo(), **{name: bound})
        assert r.status_code == 400, r.text
        assert name in r.json()["error"]["message"]
        token = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(bound, bound)
        t = client.post("/search/text", headers={"content-type": "application/json"},
                        content=f'{{"query": "cap", "filters": {{"{name}": {token}}}}}')
        assert t.status_code == 400 and name in t.json()["error"]["message"], t.text


VIETNAMESE = "Xanh ngọc bích đậm phối vàng nghệ và đỏ đô nhạt."  # 48 characters, 67 bytes


@pytest.mark.integration
def test_long_utf8_colour_is_stored_and_filterable(client, auth_headers):
    assert (len(VIETNAMESE), len(VIETNAMESE.encode())) == (48, 67)
    product = {"id": "utf8-colour", "title": "ụ" * STRING_LIMITS["title"],
               "colour": VIETNAMESE, "usage": "🙂" * STRING_LIMITS["usage"]}
    r = _post(client, auth_headers, json.dumps(product))
    assert r.status_code == 201, r.text
    try:
        got = client.get("/products/utf8-colour").json()
        assert got["attributes"]["colour"] == VIETNAMESE and got["title"] == product["title"]
        assert got["attributes"]["usage"] == "🙂" * 64

        def found() -> bool:
            r = client.post("/search/text", json={"query": "silk scarf", "k": 5,
                                                  "filters": {"colour": [VIETNAMESE]}})
            return [x["id"] for x in r.json()["results"]] == ["utf8-colour"]

        assert _eventually(found)
    finally:
        client.delete("/products/utf8-colour", headers=auth_headers)
    too_long = _post(client, auth_headers, json.dumps(
        {"id": "utf8-long", "title": "x", "colour": "ạ" * 65}))
    assert too_long.status_code == 400 and "colour" in too_long.json()["error"]["message"]


# -- the store on Milvus Lite and on the Milvus Lite server process ---------------------------
IMAGE_DIM, TEXT_DIM = 8, 4


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory):
    server = LiteServer(tmp_path_factory.mktemp("lite-server"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["lite", "server"])
def milvus(request, tmp_path) -> MilvusSettings:
    """Settings of an empty collection on embedded Milvus Lite or on the server process."""
    if request.param == "lite":
        uri = str(tmp_path / "m.db")
    else:
        uri = request.getfixturevalue("lite_server").uri
    name = f"photos_{request.node.name.split('[')[0][-20:]}_{free_port()}"
    return MilvusSettings(uri=uri, collection=name, index_type="FLAT", index_params={})


@pytest.fixture
def store(milvus):
    s = ProductStore(milvus)
    s.drop()
    s.ensure_collection(IMAGE_DIM, TEXT_DIM)
    yield s
    s.drop()
    s.close()


def _unit(n: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(n + dim).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_store_keeps_prices_and_utf8_strings_exactly(store):
    prices = [value for _, value in GOOD_PRICES] + [None]
    products = [Product(id=f"p{i}", title=f"Product {i}", price=p, colour=VIETNAMESE,
                        usage="🙂" * STRING_LIMITS["usage"])
                for i, p in enumerate(prices)]
    store.upsert(products, _unit(len(products), IMAGE_DIM), _unit(len(products), TEXT_DIM))
    got = store.get([p.id for p in products])
    assert [p.price for p in got] == prices
    assert all(p.colour == VIETNAMESE and p.usage == "🙂" * 64 for p in got)
    for product in products:
        if product.price is None:
            continue
        bounds = Filters(price_min=product.price, price_max=product.price)
        expression = filter_expression(bounds)
        matched = {p.id for p in store.list(limit=100, filter=expression)}
        assert product.id in matched, (product.price, expression)
        assert all(store.get([i])[0].price == product.price for i in matched)
    assert store.count(filter_expression(Filters(colour=[VIETNAMESE]))) == len(products)


@pytest.mark.parametrize("price", [float("nan"), float("inf"), -float("inf"), 1e39, -0.01,
                                   PRICE_MAX * 1.000001])
def test_bad_prices_never_reach_the_store(price):
    with pytest.raises(ValidationError, match="price"):
        Product(id="x", title="t", price=price)
    with pytest.raises(InvalidInput, match="price_max"):
        filters_from_params([("price_max", repr(price))], set())


def test_strings_over_the_limit_are_rejected_naming_field_and_limit():
    with pytest.raises(ValidationError) as caught:
        Product(id="x", title="t", colour="ạ" * (STRING_LIMITS["colour"] + 1))
    assert "colour" in str(caught.value) and str(STRING_LIMITS["colour"]) in str(caught.value)
    with pytest.raises(ValidationError, match="attributes"):
        Product(id="x", title="t", attributes={"weight": float("inf")})
    with pytest.raises(ValidationError, match="attributes"):
        Product(id="x", title="t", attributes={"n": [1, {"big": 2**70}]})


def test_store_of_the_earlier_schema_stops_with_the_rebuild_command(milvus):
    """A collection made before prices were DOUBLE (FLOAT price, VARCHARs sized in characters)
    is refused with a message naming the command that rebuilds it."""
    client = MilvusClient(milvus.uri)
    if client.has_collection(milvus.collection):
        client.drop_collection(milvus.collection)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("title", DataType.VARCHAR, max_length=512)
    for name in ("category", "subcategory", "article_type", "colour", "size", "gender",
                 "season", "usage"):
        schema.add_field(name, DataType.VARCHAR, max_length=64, default_value="")
    schema.add_field("price", DataType.FLOAT, nullable=True)
    schema.add_field("attributes", DataType.JSON)
    for name in ("image_ref", "image_hash", "fingerprint"):
        schema.add_field(name, DataType.VARCHAR, max_length=256)
    for name, dim in (("image_vector", IMAGE_DIM), ("text_vector", TEXT_DIM),
                      ("colour_vector", 54)):
        schema.add_field(name, DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    for name in ("image_vector", "text_vector", "colour_vector"):
        index.add_index(name, index_type="FLAT", metric_type="COSINE")
    client.create_collection(milvus.collection, schema=schema, index_params=index)
    client.close()
    store = ProductStore(milvus)
    try:
        with pytest.raises(IncompatibleStore) as caught:
            store.ensure_collection(IMAGE_DIM, TEXT_DIM)
        message = caught.value.message
        assert "python -m batch_index drop" in message and "price is FLOAT" in message
        store.drop()
        store.ensure_collection(IMAGE_DIM, TEXT_DIM)  # rebuilt: accepted
    finally:
        store.drop()
        store.close()


# -- ranking of a photo without colour (core, no service) --------------------------------------
def test_photo_without_colour_gets_no_colour_vote_and_is_compared_in_grey():
    red, blue = (colour_descriptor(np.asarray(draw_product("Tshirts", c, "Solid", seed=3)))
                 for c in ("Red", "Blue"))
    candidates = [Candidate(f"c{i}", 0.9 - i / 100, {"article_type": "Tshirts",
                                                    "colour": ("Red", "Blue")[i % 2]},
                            (red, blue)[i % 2]) for i in range(6)]
    for colourless in (None, np.zeros_like(red)):
        query = query_signals(candidates, colourless)
        assert "colour" not in query.attributes and query.colour is None
        assert not signal_matrix(candidates, query)[:, [1, 3]].any()
    query = query_signals(candidates, None)
    query.appearance = np.array([0, 0, 0, 1.0, 0, 0])
    assert rerank(candidates, query)[0][0].id == "c3"  # the one that looks alike in grey
    src = _source()
    grey = decode_image(_save(src.convert("L"), "JPEG", quality=90))
    assert layout_similarity(grey_layout(src), grey_layout(grey)) > 0.95
    other = _source(seed=11)
    assert layout_similarity(grey_layout(other), grey_layout(grey)) < 0.9
