"""Image-space finishing for rendered views: sky, aerial haze, and photometric augmentation.

Why: pybullet's TinyRenderer paints empty pixels white and has no atmosphere, so outdoor renders
show a white void above a hard ground edge. A sky that follows the camera's true horizon and haze
that grows with exact depth give the aerial-perspective cue real outdoor photographs carry.
Augmentation (colour jitter, gamma, blur, sensor noise, JPEG artefacts, dark frames) touches RGB
only and never depth, so the labels stay exact; it narrows the gap between clean renders and
camera photographs. Every random choice comes from the generator passed in (seeded by the view).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def ray_elevation(K: np.ndarray, R: np.ndarray, size: int) -> np.ndarray:
    """sin(elevation) of each pixel's viewing ray; R has camera axes as columns in world coordinates."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    world_z = rays @ R[2]  # z component of R @ ray
    return world_z / np.linalg.norm(rays, axis=-1)


def sky_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(horizon, zenith) colours in [0, 1]: clear blue, hazy white, overcast grey or dusk."""
    styles = [
        ([0.78, 0.85, 0.92], [0.32, 0.52, 0.82]),
        ([0.85, 0.87, 0.88], [0.6, 0.7, 0.82]),
        ([0.72, 0.73, 0.75], [0.55, 0.57, 0.6]),
        ([0.95, 0.72, 0.5], [0.35, 0.4, 0.62]),
    ]
    horizon, zenith = styles[int(rng.integers(len(styles)))]
    jitter = rng.uniform(0.9, 1.08, 3)
    return np.clip(np.array(horizon) * jitter, 0, 1), np.clip(np.array(zenith) * jitter, 0, 1)


def sky(elev: np.ndarray, horizon: np.ndarray, zenith: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = np.clip(elev, 0, 1) ** 0.5
    img = horizon * (1 - t[..., None]) + zenith * t[..., None]
    # soft clouds: smooth noise brightening the upper sky
    h = elev.shape[0]
    coarse = rng.random((6, 6))
    clouds = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((h, h), Image.Resampling.BICUBIC))
    clouds = np.clip((clouds / 255.0 - 0.55) * 2.5, 0, 1) * rng.uniform(0, 0.5) * t
    return img * (1 - clouds[..., None]) + 0.97 * clouds[..., None]


def finish(rgb: np.ndarray, depth: np.ndarray, elev: np.ndarray, haze_m: float, outdoor: bool,
           rng: np.random.Generator) -> np.ndarray:
    """Fill empty pixels (depth 0) with sky, and add aerial haze, from exact depth, outdoors."""
    img = rgb.astype(np.float64) / 255.0
    horizon, zenith = sky_colours(rng)
    if not outdoor:
        horizon = zenith = np.full(3, 0.9)
    empty = depth <= 0
    if outdoor and np.isfinite(haze_m):
        a = np.exp(-depth / haze_m)[..., None]
        img = img * a + horizon * (1 - a)
    if empty.any():
        img[empty] = sky(elev, horizon, zenith, rng)[empty]
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random photometric degradations of an RGB uint8 image (depth untouched)."""
    img = rgb.astype(np.float64) / 255.0
    if rng.random() < 0.8:  # colour jitter: brightness, contrast, saturation, per-channel gains
        img = img * rng.uniform(0.7, 1.3)
        mean = img.mean()
        img = (img - mean) * rng.uniform(0.7, 1.3) + mean
        grey = img.mean(axis=2, keepdims=True)
        img = grey + (img - grey) * rng.uniform(0.6, 1.4)
        img = img * rng.uniform(0.9, 1.1, 3)
    if rng.random() < 0.3:
        img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.1:  # dark frame: underexposed with strong sensor noise
        img = img * rng.uniform(0.05, 0.3)
        img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.5))))
    if rng.random() < 0.4:
        noisy = out + rng.normal(0, rng.uniform(1, 8), out.shape)
        out = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.4:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(15, 80)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
