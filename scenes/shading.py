"""Cast shadows and ambient occlusion for TinyRenderer views, computed from exact geometry.

TinyRenderer shades each surface by its own normal only (its ``shadow=1`` drew no visible shadows and
doubled the render time), so objects seemed to float. Two real depth cues are added, to RGB only: cast
shadows by shadow mapping (a second render from the sun or the lamp; points farther from the light than
what it sees are shadowed, edges softened by a 3x3 blur) and screen-space ambient occlusion (pixels whose
neighbourhood is nearer to the camera are darkened a little). Depth stays exact.
"""

from __future__ import annotations

import numpy as np

from scenes.layouts import Camera, look


def camera_points(depth: np.ndarray, K: np.ndarray, cam: Camera) -> np.ndarray:
    """(H, W, 3) world points of each pixel (garbage where depth is 0)."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    return cam.eye + (rays * depth[..., None]) @ cam.R.T


def sun_camera(points: np.ndarray, to_light: np.ndarray) -> Camera:
    """A distant narrow camera looking along -to_light that covers the given world points."""
    points = points[:: max(1, len(points) // 4000)]  # a subsample locates the view's footprint well enough
    centre = np.median(points, axis=0)
    radius = float(np.clip(np.percentile(np.linalg.norm(points - centre, axis=1), 98), 0.5, 80.0)) * 1.1
    dist = 8 * radius + 20
    fov = float(np.degrees(2 * np.arctan(radius / dist)))
    azim = float(np.degrees(np.arctan2(-to_light[1], -to_light[0])))
    pitch = float(np.degrees(np.arcsin(-to_light[2])))
    return look(centre + to_light * dist, azim, pitch, 0.0, fov, dist - 4 * radius, dist + 4 * radius)


def lamp_camera(lamp: np.ndarray, points: np.ndarray) -> Camera:
    """A camera at an indoor lamp aimed at (and just wide enough for) the given world points."""
    points = points[:: max(1, len(points) // 4000)]
    rays = points - lamp
    rays = rays[np.linalg.norm(rays, axis=1) > 1e-3]
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    axis = rays.mean(axis=0)
    axis /= np.linalg.norm(axis)
    spread = float(np.degrees(np.arccos(np.clip(np.percentile(rays @ axis, 1), -1, 1))))
    fov = float(np.clip(2 * spread * 1.1, 10.0, 140.0))
    yaw = float(np.degrees(np.arctan2(axis[1], axis[0])))
    pitch = float(np.clip(np.degrees(np.arcsin(axis[2])), -89.9, 89.9))
    return look(lamp, yaw, pitch, 0.0, fov, 0.02, 30.0)


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
    # slope-scaled bias: how much the light's depth changes across one shadow-map texel there
    pad = np.pad(light_depth, 1, mode="edge")
    slope = np.maximum.reduce([np.abs(pad[1:-1, 2:] - light_depth), np.abs(pad[1:-1, :-2] - light_depth),
                               np.abs(pad[2:, 1:-1] - light_depth), np.abs(pad[:-2, 1:-1] - light_depth)])
    ui, vi = np.clip(np.round(u).astype(np.int64), 0, n - 1), np.clip(np.round(v).astype(np.int64), 0, n - 1)
    inside = ok & (np.abs(u - n / 2 + 0.5) < n / 2) & (np.abs(v - n / 2 + 0.5) < n / 2)
    seen = light_depth[vi, ui]
    bias = 0.005 + 0.005 * z + 1.5 * slope[vi, ui]
    occluded = (inside & (seen > 0) & (z > seen + bias)).astype(np.float64)
    return box_mean(occluded, 3)  # soft edges


def box_mean(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over a size x size window (zero outside the image), via integral images: O(pixels)."""
    h, w = a.shape
    r = size // 2
    c = np.zeros((h + 1, w + 1))
    c[1:, 1:] = np.cumsum(np.cumsum(a, axis=0), axis=1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    total = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
    return total / (size * size)


def ambient_occlusion(depth: np.ndarray, strength: float = 0.35) -> np.ndarray:
    """Multiplicative darkening in [1 - strength, 1] from how much nearer the neighbourhood is.

    The neighbourhood average is taken at half resolution (occlusion varies slowly), the comparison
    at full resolution so edges stay sharp.
    """
    valid = depth > 0
    inv = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)  # inverse depth: far things matter little
    half_inv, half_valid = inv[::2, ::2], valid[::2, ::2].astype(np.float64)
    size = max(3, depth.shape[0] // 48) | 1
    local = box_mean(half_inv, size) / np.maximum(box_mean(half_valid, size), 1e-6)
    local = np.repeat(np.repeat(local, 2, axis=0), 2, axis=1)[: depth.shape[0], : depth.shape[1]]
    occlusion = np.clip((local - inv) / np.maximum(inv, 1e-6) * 4.0, 0.0, 1.0)
    return np.where(valid, 1.0 - strength * occlusion, 1.0)
