"""Cast shadows and ambient occlusion for TinyRenderer views, computed from exact geometry.

Why: pybullet's TinyRenderer shades each surface by its own normal only. Its ``shadow=1`` option
drew no visible cast shadows here (checked with pybullet_data's plane and cube) and doubled the
render time, so scenes had objects that seem to float: no contact darkening, no shadow on the floor
next to a box. Shadows and occlusion are real depth cues that photographs carry, so we add them:

- Cast shadows by shadow mapping: the scene is rendered a second time from the light (a distant,
  narrow-angle camera for the sun; a wide camera at the lamp for indoor scenes), and every pixel's
  exact 3-D point (from the depth buffer) is projected into that light view; points farther from
  the light than the surface the light sees are in shadow (a 3x3 blur of the mask softens the
  edges).
- Screen-space ambient occlusion: pixels whose neighbourhood is nearer to the camera than they are
  (creases, the floor around an object's base) are darkened a little.

Both change RGB only; depth stays exact.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.datasets.layouts import Camera, look


def camera_points(depth: np.ndarray, K: np.ndarray, cam: Camera) -> np.ndarray:
    """(H, W, 3) world points of each pixel (garbage where depth is 0)."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return cam.eye + (rays * depth[..., None]) @ cam.R.T


def sun_camera(points: np.ndarray, to_light: np.ndarray) -> Camera:
    """A distant narrow camera looking along -to_light that covers the given world points."""
    centre = np.median(points, axis=0)
    radius = float(np.clip(np.percentile(np.linalg.norm(points - centre, axis=1), 98), 0.5, 80.0)) * 1.1
    dist = 8 * radius + 20
    fov = float(np.degrees(2 * np.arctan(radius / dist)))
    azim = float(np.degrees(np.arctan2(-to_light[1], -to_light[0])))
    pitch = float(np.degrees(np.arcsin(-to_light[2])))
    return look(centre + to_light * dist, azim, pitch, 0.0, fov, dist - 4 * radius, dist + 4 * radius)


def lamp_camera(lamp: np.ndarray) -> Camera:
    """A wide camera at an indoor lamp looking straight down."""
    return look(lamp, 0.0, -89.9, 0.0, 150.0, 0.02, 30.0)


def shadow_mask(points: np.ndarray, valid: np.ndarray, light_cam: Camera, light_depth: np.ndarray) -> np.ndarray:
    """Fraction in [0, 1] of each pixel that the light cannot see (one tap, then a 3x3 blur)."""
    n = light_depth.shape[0]
    f = (n / 2) / np.tan(np.radians(light_cam.fov_deg) / 2)
    local = (points - light_cam.eye) @ light_cam.R
    z = local[..., 2]
    ok = valid & (z > light_cam.near)
    safe_z = np.where(ok, z, 1.0)
    u = f * local[..., 0] / safe_z + n / 2
    v = f * local[..., 1] / safe_z + n / 2 - 1
    bias = 0.01 + 0.01 * z + 1.5 * z / f  # about one texel of the shadow map, plus a little
    ui, vi = np.round(u).astype(np.int64), np.round(v).astype(np.int64)
    inside = ok & (ui >= 0) & (ui < n) & (vi >= 0) & (vi < n)
    seen = light_depth[np.clip(vi, 0, n - 1), np.clip(ui, 0, n - 1)]
    occluded = (inside & (seen > 0) & (z > seen + bias)).astype(np.float64)
    return ndimage.uniform_filter(occluded, 3)  # soft edges


def ambient_occlusion(depth: np.ndarray, strength: float = 0.35) -> np.ndarray:
    """Multiplicative darkening in [1 - strength, 1] from how much nearer the neighbourhood is."""
    valid = depth > 0
    inv = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)  # inverse depth: far things matter little
    size = max(3, depth.shape[0] // 24)
    weight = ndimage.uniform_filter(valid.astype(np.float64), size)
    local = ndimage.uniform_filter(inv, size) / np.maximum(weight, 1e-6)
    occlusion = np.clip((local - inv) / np.maximum(inv, 1e-6) * 4.0, 0.0, 1.0)
    return np.where(valid, 1.0 - strength * occlusion, 1.0)


def apply(rgb: np.ndarray, shade: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.float64) * shade[..., None] + 0.5, 0, 255).astype(np.uint8)
