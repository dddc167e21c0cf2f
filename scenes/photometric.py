"""Image-space finishing for rendered views: sky, aerial haze, and photometric augmentation.

TinyRenderer paints empty pixels white and has no atmosphere; a sky that follows the camera's true horizon
and haze that grows with exact depth give the aerial-perspective cue of outdoor photographs. Augmentation
(colour jitter, gamma, blur, sensor noise, JPEG artefacts, dark frames) touches RGB only, never depth, so
the labels stay exact. Every random choice comes from the generator passed in (seeded by the view).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def ray_elevation(K: np.ndarray, R: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """sin(elevation) of the viewing rays of the given pixels; R has camera axes as columns (world)."""
    rays = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones(len(rows))], -1)
    return (rays @ R[2]) / np.sqrt((rays**2).sum(-1))


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


def sky(elev: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int, horizon: np.ndarray,
        zenith: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) sky colours for N pixels: a horizon-to-zenith gradient with soft clouds."""
    t = np.clip(elev, 0, 1) ** 0.5
    img = horizon * (1 - t[:, None]) + zenith * t[:, None]
    coarse = rng.random((6, 6))  # bilinear upsampling of a coarse random grid: soft blobs
    gy, gx = rows / size * 5, cols / size * 5
    y0, x0 = np.minimum(gy.astype(int), 4), np.minimum(gx.astype(int), 4)
    fy, fx = gy - y0, gx - x0
    blob = (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
            + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)
    clouds = np.clip((blob - 0.55) * 2.5, 0, 1) * rng.uniform(0, 0.5) * t
    return img * (1 - clouds[:, None]) + 0.97 * clouds[:, None]


def finish(img: np.ndarray, depth: np.ndarray, K: np.ndarray, R: np.ndarray, haze_m: float, outdoor: bool,
           rng: np.random.Generator) -> np.ndarray:
    """Float RGB in [0, 1] -> uint8: aerial haze from exact depth outdoors, sky in empty pixels (depth 0)."""
    horizon, zenith = sky_colours(rng)
    if not outdoor:
        horizon = zenith = np.full(3, 0.9)
    if outdoor and np.isfinite(haze_m):
        a = np.exp(-depth / haze_m)[..., None]
        img = img * a + horizon * (1 - a)
    rows, cols = np.nonzero(depth <= 0)
    if len(rows):
        elev = ray_elevation(K, R, rows, cols)
        img[rows, cols] = sky(elev, rows, cols, depth.shape[0], horizon, zenith, rng)
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
