"""Texture bank for the rendered scenes: real photographs from scikit-image plus procedural materials.

A student trained on flat-coloured renders learns nothing about texture gradients. Photographs that ship
inside scikit-image (no download; made seamless by mirror tiling) give natural image statistics;
procedural materials (wood, tiles, plaster, stripes, checkers) give regular patterns. Everything comes
from fixed seeds, so every render stays a pure function of its seed. Evaluation material is never a
texture: ``stereo_motorcycle`` (it has GT disparity) is in ``FORBIDDEN_SOURCES``, checked at build time.
"""

from __future__ import annotations

import colorsys
import hashlib
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image

TEXTURE_SIZE = 256
FORBIDDEN_SOURCES = frozenset({"stereo_motorcycle"})

# skimage.data loader name -> material roles it serves ("floor", "wall", "ground", "object", "poster").
PHOTO_SOURCES: dict[str, tuple[str, ...]] = {
    "astronaut": ("object", "poster"),
    "brick": ("wall", "ground", "object"),
    "camera": ("object", "poster"),
    "chelsea": ("object", "poster"),
    "clock": ("object",),
    "coffee": ("object", "poster"),
    "coins": ("object", "floor"),
    "grass": ("ground", "object"),
    "gravel": ("ground", "floor", "object"),
    "hubble_deep_field": ("object", "poster"),
    "immunohistochemistry": ("object",),
    "moon": ("ground", "object", "wall"),
    "page": ("object", "poster"),
    "rocket": ("object", "poster"),
    "text": ("object",),
}

PROCEDURAL_KINDS: dict[str, tuple[str, ...]] = {
    "checker": ("floor", "object"),
    "noise": ("wall", "floor", "ground", "object"),
    "stripes": ("wall", "object"),
    "wood": ("floor", "object"),
    "tiles": ("floor", "wall", "ground"),
}
VARIANTS_PER_KIND = 4


# photographs without colour (a test checks this list against the pixels)
GREY_PHOTOS = frozenset({"brick", "camera", "clock", "coins", "grass", "gravel", "moon", "page", "text"})


@dataclass(frozen=True)
class Texture:
    """What a scene needs to know about a texture; the pixels come from ``texture_image``."""

    name: str  # unique key, e.g. "photo:brick", "poster:rocket" or "wood:2"
    source: str  # skimage loader name, or the procedural kind
    roles: tuple[str, ...]
    grey: bool


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def _centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def _seamless(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, mirrored 2x2 so the tile repeats without seams, resized to ``size``."""
    sq = _centre_square(img)
    top = np.concatenate([sq, sq[:, ::-1]], axis=1)
    return _resize(np.concatenate([top, top[::-1]], axis=0), size)


def load_photo(name: str) -> np.ndarray:
    if name in FORBIDDEN_SOURCES:
        raise ValueError(f"{name} is evaluation material and must never be used as a texture")
    import skimage.data

    return _to_rgb(getattr(skimage.data, name)())


def _fbm(rng: np.random.Generator, size: int, octaves: int = 5, base: int = 4) -> np.ndarray:
    """Tileable fractal value noise in [0, 1] (periodic low-frequency grids upsampled by FFT-free wrap)."""
    out = np.zeros((size, size))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base * 2**o
        grid = rng.random((cells, cells))
        grid = np.concatenate([grid, grid[:1]], 0)
        grid = np.concatenate([grid, grid[:, :1]], 1)  # wrap so the noise tiles
        t = np.linspace(0, cells, size, endpoint=False)
        i = t.astype(int)
        f = t - i
        f = f * f * (3 - 2 * f)
        a = grid[i][:, i] * (1 - f)[None, :] + grid[i][:, i + 1] * f[None, :]
        b = grid[i + 1][:, i] * (1 - f)[None, :] + grid[i + 1][:, i + 1] * f[None, :]
        out += amp * (a * (1 - f)[:, None] + b * f[:, None])
        total += amp
        amp *= 0.5
    return out / total


def _colour(rng: np.random.Generator, lo: float = 0.15, hi: float = 0.95) -> np.ndarray:
    """A muted colour (real materials are rarely fully saturated): random hue, saturation <= 0.45."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(lo, hi)))


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def procedural(kind: str, variant: int, size: int = TEXTURE_SIZE) -> np.ndarray:
    """One procedural material image, a pure function of (kind, variant); tiles seamlessly."""
    rng = np.random.default_rng([hash_str(kind), variant])
    yy, xx = np.mgrid[0:size, 0:size] / size
    grain = _fbm(rng, size, octaves=4, base=8)
    if kind == "checker":  # floor tiles: one light and one dark colour
        n = int(rng.choice([2, 4, 8]))
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
        img = _mix(_colour(rng, 0.65, 0.95), _colour(rng, 0.1, 0.4), t) * (0.9 + 0.2 * grain[..., None])
    elif kind == "noise":  # plaster, concrete, carpet: one colour with soft mottling
        t = _fbm(rng, size, octaves=6, base=int(rng.choice([2, 4, 8])))
        base = _colour(rng, 0.35, 0.9)
        other = base * rng.uniform(0.7, 0.9) if rng.random() < 0.7 else _colour(rng, 0.35, 0.9)
        img = _mix(base, other, np.clip((t - 0.5) * 1.5 + 0.5, 0, 1))
    elif kind == "stripes":  # wallpaper, fabric
        n = int(rng.choice([4, 8, 16]))
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * n * xx + rng.uniform(0, 6)))
        base = _colour(rng, 0.4, 0.9)
        img = _mix(base, base * rng.uniform(0.6, 0.85), t) * (0.9 + 0.2 * grain[..., None])
    elif kind == "wood":
        rings = int(rng.choice([6, 10, 16]))
        warp = _fbm(rng, size, octaves=4, base=4)
        t = (np.sin(2 * np.pi * (rings * yy + 2.0 * warp + 0.3 * np.sin(2 * np.pi * xx))) + 1) / 2
        light = np.array([0.75, 0.55, 0.35]) * rng.uniform(0.7, 1.2)
        img = _mix(light, light * 0.55, t**2) * (0.85 + 0.3 * grain[..., None])
    elif kind == "tiles":
        n = int(rng.choice([2, 4]))
        gu, gv = (xx * n) % 1, (yy * n) % 1
        grout = (np.minimum(np.minimum(gu, 1 - gu), np.minimum(gv, 1 - gv)) < 0.03).astype(float)
        tile_shade = rng.uniform(0.85, 1.1, (n, n))[(yy * n).astype(int) % n, (xx * n).astype(int) % n]
        base = _colour(rng, 0.4, 0.95) * (tile_shade * (0.9 + 0.2 * grain))[..., None]
        img = base * (1 - grout[..., None]) + _colour(rng, 0.1, 0.4)[None, None] * grout[..., None]
    else:
        raise ValueError(f"unknown procedural texture kind {kind!r}")
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def hash_str(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


@lru_cache(maxsize=1)
def texture_bank() -> tuple[Texture, ...]:
    """Every texture a scene may use, in a fixed order (the order is part of determinism).

    Cheap: no pixels are loaded, so worker processes whose texture files already exist start fast.
    """
    bank = []
    for name, roles in PHOTO_SOURCES.items():
        grey = name in GREY_PHOTOS
        bank.append(Texture(f"photo:{name}", name, tuple(r for r in roles if r != "poster"), grey))
        if "poster" in roles:  # posters show the photograph once, unmirrored
            bank.append(Texture(f"poster:{name}", name, ("poster",), grey))
    for kind, roles in PROCEDURAL_KINDS.items():
        bank += [Texture(f"{kind}:{v}", kind, roles, False) for v in range(VARIANTS_PER_KIND)]
    assert not {t.source for t in bank} & FORBIDDEN_SOURCES
    return tuple(bank)


def texture_image(name: str) -> np.ndarray:
    """(TEXTURE_SIZE, TEXTURE_SIZE, 3) uint8 pixels of a bank texture."""
    kind, _, rest = name.partition(":")
    if kind == "photo":
        return _seamless(load_photo(rest), TEXTURE_SIZE)
    if kind == "poster":
        return _resize(_centre_square(load_photo(rest)), TEXTURE_SIZE)
    return procedural(kind, int(rest))


def texture_sources() -> list[str]:
    """The distinct sources (skimage loader names and procedural kinds) behind the bank."""
    return sorted({t.source for t in texture_bank()})


@cache
def textures_for(role: str) -> tuple[Texture, ...]:
    return tuple(t for t in texture_bank() if role in t.roles)


def _bank_key() -> str:
    """Identifies the bank without building it: this module's source plus the scikit-image version."""
    import skimage

    try:
        source = inspect.getsource(sys.modules[__name__]).encode()
    except OSError:  # no source shipped (frozen install): fall back to the bank's names
        source = "|".join(t.name for t in texture_bank()).encode()
    h = hashlib.sha256(source)
    h.update(skimage.__version__.encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def texture_files() -> dict[str, str]:
    """Texture name -> image file, written once per machine (pybullet loads textures from files only).

    Uncompressed TGA, because pybullet decodes it ~2x faster than PNG. Files live in a folder keyed
    by this module's source, and are written atomically, so concurrent processes never read a
    half-written file.
    """
    folder = os.path.join(tempfile.gettempdir(), f"dad-textures-{_bank_key()}")
    paths = {t.name: os.path.join(folder, t.name.replace(":", "_") + ".tga") for t in texture_bank()}
    os.makedirs(folder, exist_ok=True)
    for name, path in paths.items():
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            Image.fromarray(texture_image(name)).save(tmp, format="TGA")
            os.replace(tmp, path)
    return paths
