"""The native image pipeline (``csrc/``) against transformers' ``Qwen2VLImageProcessorPil``.

Tolerance: none. The native resampler reproduces Pillow's fixed-point bicubic filter and every
value is the processor's own rescale/normalize of the 8-bit level, so ``pixel_values`` and
``image_grid_thw`` must be equal bit for bit, on every image here: random, gradients, sharp
edges, text, odd and extreme sizes, below ``min_pixels`` and above ``max_pixels``, both of
Pillow's pass orders, RGBA, LA, grayscale and palette images, alone and in mixed batches, on 1
and 2 threads.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from visurf_engine.models import image_processor as ip
from visurf_engine.models.hf import image_processor_for

native_only = pytest.mark.skipif(ip._native is None, reason="csrc/ not built (see test_extension_is_built)")
SETTINGS = {
    "default": {},  # min 56*56, max 28*28*1280
    "small": {"min_pixels": 56 * 56 * 4, "max_pixels": 28 * 28 * 64},  # most images shrink a lot
}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _images() -> dict[str, Image.Image]:
    """Fresh test images; the size is (width, height)."""
    rgb = lambda a: Image.fromarray(a.astype(np.uint8), "RGB")  # noqa: E731
    y, x = np.mgrid[0:389, 0:517]
    grad = np.stack([x * 255 / 516, y * 255 / 388, (x + y) % 256], axis=-1)
    edges = np.kron(_rng(1).integers(0, 2, (100, 43, 3)) * 255, np.ones((7, 7, 1)))  # 7 px blocks, 0 / 255
    text = Image.new("RGB", (800, 200), "white")
    draw = ImageDraw.Draw(text)
    for i in range(8):
        draw.text((10, 5 + 24 * i), "Qwen2-VL grounding: [12, 34, 567, 890] the red circle " * 2, fill=(0, 0, 0))
    rgba = np.concatenate([_rng(2).integers(0, 256, (200, 300, 3)), _rng(3).integers(0, 256, (200, 300, 1))], -1)
    return {
        "random": rgb(_rng(0).integers(0, 256, (480, 640, 3))),  # -> 476 x 644: Pillow 13 goes vertical first
        "gradient": rgb(grad),
        "edges": rgb(edges),
        "text": text,
        "odd_57x913": rgb(_rng(4).integers(0, 256, (913, 57, 3))),
        "ratio_199": rgb(_rng(5).integers(0, 256, (999, 5, 3))),  # round(5 / 28) = 0: falls to min_pixels
        "below_min": rgb(_rng(6).integers(0, 256, (30, 20, 3))),  # upsampled
        "above_max": rgb(_rng(7).integers(0, 256, (2200, 3000, 3))),  # ~3x down: long filters
        "tall": rgb(_rng(10).integers(0, 256, (1900, 700, 3))),  # height shrinks most: vertical first
        "rgba": Image.fromarray(rgba.astype(np.uint8), "RGBA"),  # composited on white, as HF does
        "la": Image.fromarray(rgba.astype(np.uint8), "RGBA").convert("LA"),
        "gray": Image.fromarray(_rng(8).integers(0, 256, (222, 333)).astype(np.uint8), "L"),
        "palette": Image.fromarray(rgba.astype(np.uint8), "RGBA").convert("P"),
        "palette_transparency": rgb(grad).quantize(64),
    }


IMAGES = _images()
IMAGES["palette_transparency"].info["transparency"] = 3


def _pair(setting: str):
    kw = SETTINGS[setting]
    return ip.NativeQwen2VLImageProcessor(**kw), Qwen2VLImageProcessorPil(**kw)


def _assert_same(ours, ref):
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])


def test_extension_is_built():
    assert ip._native is not None, f"csrc/ is not built ({ip._NATIVE_ERROR}): pip install -e . needs a C++17 compiler"


@native_only
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", IMAGES)
def test_one_image_matches_hf_exactly(name, setting):
    ours, ref = _pair(setting)
    _assert_same(ours(IMAGES[name], return_tensors="pt"), ref(IMAGES[name], return_tensors="pt"))


@native_only
@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_batch_matches_hf_exactly(threads):
    ours, ref = _pair("default")
    images = list(IMAGES.values())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ours(images, return_tensors="pt")
    finally:
        torch.set_num_threads(before)
    _assert_same(out, ref(images, return_tensors="pt"))


@native_only
def test_smart_resize_matches_transformers():
    sizes = [(h, w) for h in (1, 2, 13, 14, 27, 28, 29, 42, 55, 56, 57, 333, 840, 913, 1000) for w in (1, 5, 28, 57, 199, 960)]
    sizes += [tuple(int(v) for v in s) for s in _rng(9).integers(1, 8000, (300, 2))]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (28, 200_000, 12_845_056), (32, 1024, 16384)]:
        for h, w in sizes:
            try:
                expected = smart_resize(h, w, factor, lo, hi)
            except ValueError as e:
                with pytest.raises(ValueError) as got:
                    ip._native.smart_resize(h, w, factor, lo, hi)
                assert str(got.value) == str(e)
                continue
            assert ip._native.smart_resize(h, w, factor, lo, hi) == expected, (h, w, factor, lo, hi)


@native_only
def test_extreme_aspect_ratio_raises_like_hf():
    image = Image.fromarray(np.zeros((1, 1000, 3), np.uint8))
    ours, ref = _pair("default")
    with pytest.raises(ValueError) as expected:
        ref(image)
    with pytest.raises(ValueError) as got:
        ours(image)
    assert str(got.value) == str(expected.value) == "absolute aspect ratio must be smaller than 200, got 1000.0"


@native_only
def test_other_settings_take_hfs_path():
    ours, ref = _pair("small")
    image = IMAGES["gradient"]
    _assert_same(ours(image, resample=Image.BILINEAR, return_tensors="pt"), ref(image, resample=Image.BILINEAR, return_tensors="pt"))
    floats = np.asarray(image, np.float32) / 255
    _assert_same(ours(floats, do_rescale=False, return_tensors="pt"), ref(floats, do_rescale=False, return_tensors="pt"))


def _unpatchify(pixel_values: np.ndarray, grid: np.ndarray, p: int = 14, m: int = 2) -> np.ndarray:
    """One image's [patches, 3 * 2 * p * p] back to [H, W, 3] (first temporal copy)."""
    _, gh, gw = (int(v) for v in grid[0])
    x = pixel_values.reshape(gh // m, gw // m, m, m, 3, 2, p, p)[:, :, :, :, :, 0]
    return x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)


@native_only
@pytest.mark.parametrize("pillow_major", [12, ip.PILLOW_MAJOR])
def test_resize_follows_pillows_pass_order(pillow_major):
    """Pillow < 13 always resizes horizontally first; 13 goes vertically first when the height
    shrinks by more than twice as many pixels as the width (both orders are exact here)."""
    levels = np.tile(np.arange(256, dtype=np.float32), (3, 1))
    for h, w in [(480, 640), (1900, 700), (913, 57), (2200, 3000), (30, 20)]:
        image = _rng(h * w).integers(0, 256, (h, w, 3)).astype(np.uint8)
        pv, grid = ip._native.encode([image], levels, 14, 2, 2, 56 * 56, 28 * 28 * 1280, pillow_major, 1)
        oh, ow = int(grid[0, 1]) * 14, int(grid[0, 2]) * 14
        pil = Image.fromarray(image)
        if pillow_major < 13:  # two single-axis resizes of the installed Pillow: horizontal, then vertical
            expected = pil.resize((ow, h), Image.BICUBIC).resize((ow, oh), Image.BICUBIC)
        else:
            expected = pil.resize((ow, oh), Image.BICUBIC)
        assert np.array_equal(_unpatchify(pv, grid), np.asarray(expected, np.float32)), (h, w, pillow_major)


def test_saved_as_hfs_processor():
    ours, ref = _pair("small")
    assert ours.to_dict() == ref.to_dict()


def test_missing_extension_falls_back_to_hf_with_one_warning(monkeypatch):
    monkeypatch.setattr(ip, "_native", None)
    monkeypatch.setattr(ip, "_NATIVE_ERROR", ImportError("simulated"))
    monkeypatch.setattr(ip, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        processors = [image_processor_for(56 * 56, kind="native") for _ in range(3)]
    assert [type(p) for p in processors] == [Qwen2VLImageProcessorPil] * 3
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "simulated" in str(caught[0].message)
    image = IMAGES["random"].resize((56, 56))
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    _assert_same(processors[0](image, return_tensors="pt"), ref(image, return_tensors="pt"))


def test_kind_selects_the_class():
    assert type(image_processor_for(56 * 56, kind="hf")) is Qwen2VLImageProcessorPil
    if ip._native is not None:
        assert type(image_processor_for(56 * 56)) is ip.NativeQwen2VLImageProcessor
    with pytest.raises(ValueError, match="not one of native, hf"):
        ip.image_processor_class("fast")
