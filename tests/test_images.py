"""Decoding untrusted bytes (every mode to RGB, every failure a `Rejected` reason), encoding, and the crop plan."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.crops import PLAN_VERSION, box_pixels, grid_starts, plan_crops
from pipeline.images import Rejected, decode_rgb, decode_trusted, encode, resize, to_rgb8

BIG = 40_000_000


def _png(arr_or_img, **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _halves(h: int, w: int) -> np.ndarray:
    """Left half black, right half white."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, w // 2:] = 255
    return a


# -- decoding: modes ----------------------------------------------------------------------------

def test_rgb_png_decodes_exactly(media):
    arr = media.image_array(37, 23, seed=4)
    out = decode_rgb(_png(arr), BIG)
    assert out.dtype == np.uint8 and out.shape == (23, 37, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(media):
    gray = media.image_array(40, 32, seed=1)[..., 0]
    out = decode_rgb(_png(gray), BIG)
    assert out.shape == (32, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_16bit_png_is_scaled_not_clipped():
    vals = np.array([[0, 257, 65535, 128 * 257 + 128]] * 40, dtype=np.uint16)  # 40×4 → pad to 40×40
    arr = np.tile(vals, (1, 10))
    data = _png(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_rgb(data, BIG)
    np.testing.assert_array_equal(out[0, :4, 0], [0, 1, 255, 128])
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_int_and_float_modes_are_min_max_scaled(mode):
    arr = np.array([[0, 40, 100]], dtype=np.int32 if mode == "I" else np.float32)
    out = to_rgb8(Image.fromarray(arr, mode=mode))
    np.testing.assert_array_equal(out[0, :, 1], [0, 102, 255])
    flat = to_rgb8(Image.fromarray(np.full((2, 2), 7, np.int32 if mode == "I" else np.float32), mode=mode))
    assert (flat == 0).all()


def test_alpha_is_composited_on_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200                      # red-ish
    rgba[:, :10, 3] = 0                     # transparent
    rgba[:, 10:20, 3] = 255                 # opaque
    rgba[:, 20:, 3] = 128                   # half
    out = decode_rgb(_png(rgba), BIG)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 15], [200, 0, 0])
    # 200·a + 255·(1−a), a = 128/255 → 227.4; 0·a + 255·(1−a) → 127.0
    assert abs(int(out[0, 25, 0]) - 227) <= 1 and abs(int(out[0, 25, 1]) - 127) <= 1
    la = Image.fromarray(rgba).convert("LA")
    assert (decode_rgb(_png(la), BIG)[:, :10] == 255).all()


def test_palette_with_transparency_uses_white():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([10, 20, 30] + [250, 0, 0] + [0] * (254 * 3))
    img.paste(1, (16, 0, 32, 32))
    data = _png(img, transparency=0)
    out = decode_rgb(data, BIG)
    np.testing.assert_array_equal(out[5, 5], [255, 255, 255])
    np.testing.assert_array_equal(out[5, 20], [250, 0, 0])
    out = decode_rgb(_png(img), BIG)  # no transparency: the palette colour
    np.testing.assert_array_equal(out[5, 5], [10, 20, 30])


def test_cmyk_jpeg_becomes_rgb():
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:32] = (200, 40, 90)
    arr[32:] = (20, 160, 240)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    out = decode_rgb(buf.getvalue(), BIG)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[8:24].astype(int) - (200, 40, 90)).max() <= 8
    assert np.abs(out[40:56].astype(int) - (20, 160, 240)).max() <= 8


@pytest.mark.parametrize("orientation, top, left", [
    (1, None, 0), (6, 0, None), (8, 255, None), (3, None, 255),
])
def test_exif_orientation_is_applied(media, orientation, top, left):
    """Stored: 160 wide × 96 high, left half black. 6 = rotate 90° CW: the left column becomes the top row."""
    out = decode_rgb(media.exif_jpeg(_halves(96, 160), orientation), BIG)
    if orientation in (6, 8):
        assert out.shape == (160, 96, 3)
        assert abs(int(np.median(out[:70])) - top) <= 3 and abs(int(np.median(out[90:])) - (255 - top)) <= 3
    else:
        assert out.shape == (96, 160, 3)
        assert abs(int(np.median(out[:, :70])) - left) <= 3
        assert abs(int(np.median(out[:, 90:])) - (255 - left)) <= 3


# -- decoding: rejects ---------------------------------------------------------------------------

def _reason(data: bytes, **kw) -> str:
    with pytest.raises(Rejected) as info:
        decode_rgb(data, kw.pop("max_pixels", BIG), **kw)
    return str(info.value)


def test_reject_reasons(media):
    jpeg = media.image_bytes(200, 150, "jpeg", seed=3)
    assert _reason(b"") == "zero bytes"
    assert _reason(b"this is a text file, not a JPEG\n") == "not an image (unrecognised format)"
    assert _reason(jpeg[: len(jpeg) // 2]).startswith("truncated or corrupt image data")
    assert _reason(media.png_bomb()) == "too many pixels: 20000x20000 = 400000000 > corpus.max_pixels = 40000000"
    assert _reason(_png(np.zeros((1, 1, 3), np.uint8)), min_side=32) == \
        "too small: short side 1 px < corpus.min_side = 32"
    assert _reason(_png(np.zeros((4000, 1, 3), np.uint8)), min_side=32) == \
        "too small: short side 1 px < corpus.min_side = 32"
    assert _reason(_png(np.zeros((40, 400, 3), np.uint8)), min_side=32, max_aspect=4.0) == \
        "extreme aspect ratio 10.0 > corpus.max_aspect = 4.0"
    # limits apply after EXIF rotation: 64 wide × 40 high stored, shown 40 × 64
    assert _reason(media.exif_jpeg(np.zeros((40, 64, 3), np.uint8), 6), max_pixels=2559).startswith(
        "too many pixels: 64x40")
    assert decode_rgb(media.exif_jpeg(np.zeros((40, 64, 3), np.uint8), 6), 2560).shape == (64, 40, 3)


def test_corrupted_bytes_only_ever_reject(media):
    """Seeded mutations of valid files: each either decodes to RGB uint8 or raises Rejected — nothing else."""
    rng = np.random.default_rng(0)
    seeds = [media.image_bytes(48, 40, "jpeg", seed=1), media.image_bytes(48, 40, "png", seed=2)]
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(160):
        data = bytearray(seeds[i % 2])
        if i % 4 == 3:
            data = data[: int(rng.integers(8, len(data)))]
        else:
            for pos in rng.integers(16, len(data), size=int(rng.integers(1, 12))):
                data[pos] = int(rng.integers(0, 256))
        try:
            out = decode_rgb(bytes(data), BIG, min_side=1)
        except Rejected as why:
            assert str(why)
            outcomes["rejected"] += 1
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            outcomes["ok"] += 1
    assert outcomes["rejected"] > 10 and outcomes["ok"] + outcomes["rejected"] == 160


# -- encoding ----------------------------------------------------------------------------------

def test_encode_is_deterministic_and_png_lossless(media):
    arr = media.image_array(50, 30, seed=9)
    png = encode(arr, "png")
    assert png == encode(arr.copy(), "png") and png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_trusted(png), arr)
    jpg = encode(arr, "jpeg", 90)
    assert jpg == encode(arr, "jpeg", 90) and jpg[:2] == b"\xff\xd8" and jpg != encode(arr, "jpeg", 60)
    assert np.abs(decode_trusted(jpg).astype(int) - arr).mean() < 6


@pytest.mark.parametrize("fmt", ["webp", "ppm"])
def test_stored_views_decode_to_their_pixels_and_agree_with_pillow(media, fmt):
    """The view formats are lossless, and the WebP fast path (libwebp via imagecodecs) reads exactly what
    Pillow reads from the same bytes, a grey and an odd-sized image included."""
    for arr in (media.image_array(61, 37, seed=3), np.repeat(media.image_array(16, 16, seed=4)[..., :1], 3, 2)):
        data = encode(arr, fmt)
        np.testing.assert_array_equal(decode_trusted(data), arr)
        np.testing.assert_array_equal(decode_trusted(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_resize_takes_width_height():
    arr = np.zeros((10, 20, 3), np.uint8)
    assert resize(arr, (20, 10)) is arr
    assert resize(arr, (5, 8)).shape == (8, 5, 3)


# -- crop plan ---------------------------------------------------------------------------------

SID = "0123456789abcdef"


def _corners(s: int, p: int) -> list[tuple[float, float, float, float]]:
    a, b = p / s, (s - p) / s
    return [(0.0, 0.0, a, a), (b, 0.0, 1.0, a), (0.0, b, a, 1.0), (b, b, 1.0, 1.0)]


def test_plan_is_deterministic_from_seed_and_id():
    a = plan_crops(SID, 1600, 1200, seed=0, min_region=644, patch=560, local_count=4)
    assert a == plan_crops(SID, 1600, 1200, seed=0, min_region=644, patch=560, local_count=4)
    assert a.region != plan_crops(SID, 1600, 1200, seed=1, min_region=644, patch=560, local_count=4).region
    assert a.region != plan_crops("fedcba9876543210", 1600, 1200, 0, 644, 560, 4).region
    assert PLAN_VERSION == 1
    row = a.to_row()
    assert (row["region_x0"], row["region_y0"], row["region_side"], row["patch"]) == (*a.region, 560)
    assert row["boxes"] == [list(b) for b in a.boxes]


def test_plan_invariants_over_many_samples():
    rng = np.random.default_rng(1)
    sides = set()
    for i in range(400):
        sid = f"{int(rng.integers(0, 2**63)):016x}"
        w, h = int(rng.integers(100, 3000)), int(rng.integers(100, 3000))
        k = int(rng.integers(1, 10))
        plan = plan_crops(sid, w, h, seed=7, min_region=644, patch=560, local_count=k)
        x0, y0, s = plan.region
        short = min(w, h)
        if short > 644:
            assert 644 <= s <= short and plan.patch == 560
            sides.add(s)
        else:
            assert s == short and plan.patch == max(1, round(560 * short / 644))
        assert 0 <= x0 and x0 + s <= w and 0 <= y0 and y0 + s <= h
        assert len(plan.boxes) == k
        for bx0, by0, bx1, by1 in plan.boxes:
            assert 0 <= bx0 < bx1 <= 1 and 0 <= by0 < by1 <= 1
            assert bx1 - bx0 == pytest.approx(plan.patch / s) and by1 - by0 == pytest.approx(plan.patch / s)
    assert len(sides) > 50  # the side is drawn, not fixed


def test_k4_is_the_four_corners_and_covers_the_region():
    plan = plan_crops(SID, 2000, 900, seed=3, min_region=644, patch=560, local_count=4)
    s = plan.region[2]
    assert plan.boxes == tuple(_corners(s, 560))
    mask = np.zeros((s, s), bool)
    for b in plan.boxes:
        x0, y0, x1, y1 = box_pixels(b, s)
        mask[y0:y1, x0:x1] = True
    assert mask.all()  # s ≤ 2·560: four overlapping corners cover every pixel


def test_small_image_scales_the_patch():
    """322×500 with min_region 644: region = short side 322, patch = round(560·322/644) = 280."""
    plan = plan_crops(SID, 322, 500, seed=0, min_region=644, patch=560, local_count=4)
    x0, y0, s = plan.region
    assert (x0, s, plan.patch) == (0, 322, 280) and 0 <= y0 <= 178
    assert plan.boxes == tuple(_corners(322, 280))
    assert [box_pixels(b, 322) for b in plan.boxes] == [
        (0, 0, 280, 280), (42, 0, 322, 280), (0, 42, 280, 322), (42, 42, 322, 322)]
    exact = plan_crops(SID, 644, 700, seed=0, min_region=644, patch=560, local_count=4)
    assert exact.region[2] == 644 and exact.patch == 560


def test_grid_for_other_k():
    assert grid_starts(1, 700, 560) == [(70, 70)]          # centred
    assert grid_starts(9, 700, 560) == [(x, y) for y in (0, 70, 140) for x in (0, 70, 140)]
    assert grid_starts(2, 700, 560) == [(0, 0), (140, 140)]  # first and last of the 2×2 grid
    assert len(set(grid_starts(5, 1000, 500))) == 5


def test_box_pixels():
    assert box_pixels((0.5, 0.25, 0.75, 1.0), 100) == (50, 25, 75, 100)
    assert box_pixels((0.5, 0.5, 0.5, 0.5), 100) == (50, 50, 51, 51)


def test_unconvertible_mode_is_a_reject_not_a_crash(monkeypatch, media):
    def refuse(self, *a, **k):
        raise ValueError(f"conversion from {self.mode} to RGB not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    assert _reason(media.image_bytes(40, 40, "png", seed=1)) == (
        "unsupported pixel layout (mode RGB): ValueError: conversion from RGB to RGB not supported")
