"""Every synthetic image the tests and benchmarks use. Tests assert exact values from these: change none.

* `image_array` / `image_bytes` / `write_photos` — a smooth seeded pattern plus noise: decodes and
  compresses like a photo, distinct per seed, any size.
* `ramp_image` / `write_ramps` / `write_sources` — colour ramps whose pixels are known analytically,
  so a teacher that is a function of the pixel colour has a known answer.
* `png_bomb`, `exif_jpeg` — a decompression bomb and an EXIF-rotated JPEG.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth seeded RGB pattern plus a little noise: compresses like a photo, distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
    chans = [127 + 100 * np.sin(xx * fx[c] + yy * fy[c] + phase[c]) for c in range(3)]
    arr = np.stack(chans, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def image_bytes(width: int, height: int, fmt: str = "jpeg", seed: int = 0, mode: str = "RGB",
                quality: int = 90) -> bytes:
    """Encoded bytes of `image_array` in a PIL format ('jpeg', 'png', 'webp' …) and mode."""
    img = Image.fromarray(image_array(width, height, seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt.lower() in ("jpeg", "jpg", "webp") else {}
    img.save(buf, format="JPEG" if fmt.lower() == "jpg" else fmt.upper(), **kwargs)
    return buf.getvalue()


def write_photos(folder: Path, n: int, sizes=((256, 192),), seed: int = 0) -> Path:
    """n `image_array` PNGs (sizes cycled) in folder: a photo-like corpus for the loader's real costs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(image_array(w, h, seed * 1000 + i)).save(folder / f"photo{i:03d}.png")
    return folder


def ramp_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """R = 2·x + b, G = 2·y + d (exact integers: no rounding), B seeded noise (makes images distinct)."""
    assert width <= 128 and height <= 128, "slope 2 fits 128 px in uint8"
    rng = np.random.default_rng(seed)
    b = int(rng.integers(0, 256 - 2 * (width - 1)))
    d = int(rng.integers(0, 256 - 2 * (height - 1)))
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (2 * np.arange(width) + b)[None, :]
    img[..., 1] = (2 * np.arange(height) + d)[:, None]
    img[..., 2] = rng.integers(0, 256, (height, width))
    return img


def write_ramps(folder: Path, n: int, sizes=((96, 72), (80, 80), (72, 90)), seed: int = 0) -> Path:
    """n `ramp_image` PNGs (sizes cycled) in folder: a corpus with analytically known pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(ramp_image(w, h, seed * 1000 + i)).save(folder / f"ramp{i:03d}.png")
    return folder


def write_sources(folder: Path, n: int = 6, size=(64, 64)) -> Path:
    """The fault runs' corpus: n ramps of one size (64²: one crop region each, quick to teach)."""
    return write_ramps(Path(folder), n, sizes=(size,))


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width×height (all black) in a few tens of KB: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 500) for _ in range(height // 500))
    idat += comp.compress(row * (height % 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_jpeg(arr: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """JPEG of the stored pixels `arr` with an EXIF Orientation tag (6 = rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()
