"""Rendered 3-D scenes with exact metric depth: the embedded default corpus and its exact-label twin.

The embedded default needs images whose true depth is known, with no GPU and nothing to download.
``render_view(seed)`` shows camera ``seed % 4`` of scene ``seed // 4`` (``layouts.build_scene``), drawn by
pybullet's CPU TinyRenderer in a fresh client: depth is z along the optical axis in metres, 0 = no surface.
Shadows, ambient occlusion (``shading``), sky and haze (``photometric``) come from exact depth.
``supersample=2`` anti-aliases at ~3x the cost (default 1). Pools restart workers every
``RECYCLE_AFTER_SCENES`` scenes: pybullet leaks natively what ``bullet_args`` cannot prevent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from multiprocessing import get_context

import numpy as np

from scenes import layouts, meshes, photometric, shading
from scenes.bullet_args import arg_pool
from scenes.layouts import VIEWS_PER_SCENE, Camera, Scene
from scenes.props import build_mesh
from scenes.textures import texture_files

RECYCLE_AFTER_SCENES = 256  # pool workers restart after this many scenes: bounds pybullet's native leak
MIN_OBJECT_PIXELS = 0.0005  # fraction of the image an object must cover to count as "in view"
SHADOW_MAP_SIZE = 128  # pixels of the light's view used for cast shadows
LINKS_PER_BODY = 120  # pybullet's createMultiBody takes at most 128 links
MAX_BODIES = 16


@dataclass
class View:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres along the optical axis; 0 = no surface
    K: np.ndarray  # (3, 3) float64 intrinsics, pixel (u, v) = column, row index of pixel centres
    kind: str  # "room" | "tabletop" | "outdoor"
    seed: int
    floor: tuple[np.ndarray, float] | None = None  # (n, d) with n·X + d = 0 in camera coordinates
    floor_mask: np.ndarray | None = None  # (H, W) bool: pixels showing the floor / ground
    n_objects: int = 0  # distinct objects (not floor, walls or ceiling) covering > MIN_OBJECT_PIXELS
    textures: tuple[str, ...] = field(default_factory=tuple)  # texture names used by the scene


def split_seed(seed: int) -> tuple[int, int]:
    """View seed -> (scene seed, camera index)."""
    return seed // VIEWS_PER_SCENE, seed % VIEWS_PER_SCENE


def intrinsics(fov_deg: float, size: int, supersample: int = 1) -> np.ndarray:
    """K for pixel (u, v) = (column, row) index, of an image rendered at ``size * supersample`` and
    block-averaged down to ``size``.

    TinyRenderer samples pixel i at continuous coordinate i (not i + 0.5) in a y-up buffer that is
    flipped on read-out, so at full resolution cx = W/2 and cy = H/2 - 1 (fitted on floor pixels:
    residual ~2 µm; the textbook (W-1)/2 is off by half a pixel). An s×s block average moves the
    sample to the block's mean position.
    """
    s = supersample
    f = (size / 2) / np.tan(np.radians(fov_deg) / 2)
    cx = size / 2 - (s - 1) / (2 * s)
    cy = size / 2 - (s + 1) / (2 * s)
    return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])


def _merged_meshes(scene: Scene) -> list[tuple[tuple[int, str, tuple], meshes.Mesh]]:
    """One world-space mesh per (object, texture, tint), smallest objects first, floor and walls last.

    Why: each pybullet body costs ~0.5 ms to create, and TinyRenderer shades a fragment fully
    unless an earlier-drawn surface already hides it; drawing small near things before the big
    surfaces behind them saves most of the shading.
    """
    merged: dict[tuple, list[meshes.Mesh]] = {}
    for part, group in zip(scene.parts, scene.groups):
        m = build_mesh(part)
        world = meshes.Mesh(m.vertices @ part.rot.T + part.pos, m.normals @ part.rot.T, m.uvs, m.indices)
        merged.setdefault((group, part.texture, part.tint), []).append(world)
    out = [(key, meshes.merge(ms)) for key, ms in merged.items()]
    extent = lambda m: float(np.ptp(m.vertices, axis=0).max())
    return sorted(out, key=lambda item: (item[0][0] <= 0, extent(item[1])))


class _Client:
    """One pybullet DIRECT client holding one built scene; disconnects on exit."""

    def __init__(self, scene: Scene):
        import pybullet as p

        self.p, self.scene = p, scene
        self.cid = p.connect(p.DIRECT)
        files = texture_files()
        tex_ids = {name: p.loadTexture(files[name], physicsClientId=self.cid)
                   for name in sorted({part.texture for part in scene.parts})}
        pool, shapes, centres = arg_pool(), [], []
        merged = _merged_meshes(scene)
        for _, mesh in merged:
            centre = (mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0)) / 2
            args = pool.mesh_kwargs(mesh.vertices - centre, mesh.normals, mesh.uvs, mesh.indices)
            shapes.append(p.createVisualShape(p.GEOM_MESH, physicsClientId=self.cid, **args))
            centres.append(centre.tolist())
        # one fixed link per mesh in a few multibodies (pybullet allows 128 links each): ~3x faster than
        # a body per mesh. Segmentation then reports body + ((link + 1) << 24) per pixel.
        self.lut = np.full((MAX_BODIES + 1, LINKS_PER_BODY + 1), -100, np.int64)  # last row/col: nothing
        for start in range(0, len(shapes), LINKS_PER_BODY):
            body = self._multibody(shapes[start : start + LINKS_PER_BODY], centres[start : start + LINKS_PER_BODY])
            for link, ((group, texture, tint), _) in enumerate(merged[start : start + LINKS_PER_BODY]):
                p.changeVisualShape(body, link, textureUniqueId=tex_ids[texture], rgbaColor=[*tint, 1.0],
                                    physicsClientId=self.cid)
                self.lut[body, link] = group

    def _multibody(self, shapes: list[int], centres: list[list[float]]) -> int:
        p, n = self.p, len(shapes)
        body = p.createMultiBody(
            baseVisualShapeIndex=-1, linkMasses=[0.0] * n, linkCollisionShapeIndices=[-1] * n,
            linkVisualShapeIndices=shapes, linkPositions=centres, linkOrientations=[[0.0, 0.0, 0.0, 1.0]] * n,
            linkInertialFramePositions=[[0.0, 0.0, 0.0]] * n, linkInertialFrameOrientations=[[0.0, 0.0, 0.0, 1.0]] * n,
            linkParentIndices=[0] * n, linkJointTypes=[p.JOINT_FIXED] * n, linkJointAxis=[[0.0, 0.0, 1.0]] * n,
            physicsClientId=self.cid)
        if not 0 <= body < MAX_BODIES:
            raise RuntimeError(f"pybullet refused a multibody of {n} links (id {body})")
        return body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.p.disconnect(self.cid)

    def render(self, cam: Camera, size: int, light: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb uint8, metric depth float64 with 0 = empty, group id per pixel with -100 = empty)."""
        p = self.p
        view = p.computeViewMatrix(cam.eye.tolist(), (cam.eye + cam.R[:, 2]).tolist(), (-cam.R[:, 1]).tolist())
        proj = p.computeProjectionMatrixFOV(cam.fov_deg, 1.0, cam.near, cam.far)
        _, _, rgba, zbuf, seg = p.getCameraImage(size, size, view, proj, renderer=p.ER_TINY_RENDERER,
                                                 flags=p.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
                                                 physicsClientId=self.cid, **light)
        rgb = np.asarray(rgba, np.uint8).reshape(size, size, 4)[:, :, :3]
        zbuf = np.asarray(zbuf, np.float64).reshape(size, size)
        seg = np.asarray(seg, np.int64).reshape(size, size)
        depth = cam.far * cam.near / (cam.far - (cam.far - cam.near) * zbuf)
        hit = seg >= 0
        body = np.where(hit, seg & 0xFFFFFF, -1)  # -1 indexes the lut's "nothing" row/column
        link = np.where(hit, (seg >> 24) - 1, -1)
        groups = self.lut[body, link]
        return rgb, np.where(groups > -100, depth, 0.0), groups


@dataclass
class Light:
    renderer_kwargs: dict  # TinyRenderer's directional lighting
    to_light: np.ndarray  # unit vector towards the sun, or towards the lamp from the view's centre
    lamp: np.ndarray | None  # indoor point light position
    shadow_strength: float  # 0 = no cast shadows


def _light(rng: np.random.Generator, scene: Scene, cam: Camera) -> Light:
    if scene.lamp is not None:
        to_light = scene.lamp - (cam.eye + 2.0 * cam.R[:, 2])
        to_light /= np.linalg.norm(to_light)
        strength = float(rng.uniform(0.25, 0.55)) if rng.random() < 0.7 else 0.0  # else: diffuse light
    else:
        elev, azim = np.radians(rng.uniform(20, 75)), rng.uniform(0, 2 * np.pi)
        to_light = np.array([np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
        strength = float(rng.uniform(0.35, 0.6)) if rng.random() < 0.75 else 0.0  # sun / overcast
    warmth = rng.uniform(-0.12, 0.12)
    kwargs = {
        "lightDirection": to_light.tolist(),
        "lightColor": [float(1 + warmth), 1.0, float(1 - warmth)],
        "lightDistance": 10.0,
        "lightAmbientCoeff": float(rng.uniform(0.45, 0.7)),
        "lightDiffuseCoeff": float(rng.uniform(0.35, 0.6)),
        "lightSpecularCoeff": float(rng.uniform(0.0, 0.3)),
        "shadow": 0,  # TinyRenderer's own shadows: no visible effect here, twice the cost (see shading.py)
    }
    return Light(kwargs, to_light, scene.lamp, strength)


def _shade(client: _Client, cam: Camera, light: Light, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Per-pixel multiplicative shading: ambient occlusion and cast shadows (see shading.py)."""
    shade = shading.ambient_occlusion(depth)
    valid = depth > 0
    if light.shadow_strength > 0 and valid.any():
        points = shading.camera_points(depth, K, cam)
        light_cam = (shading.lamp_camera(light.lamp, points[valid]) if light.lamp is not None
                     else shading.sun_camera(points[valid], light.to_light))
        _, light_depth, _ = client.render(light_cam, SHADOW_MAP_SIZE, {})
        shade *= 1 - light.shadow_strength * shading.shadow_mask(points, valid, light_cam, light_depth)
    return shade


def _downsample(rgb, depth, groups, s: int):
    """Average (float) RGB over s×s blocks; depth = harmonic mean over the block's majority surface."""
    if s == 1:
        return rgb, depth, groups
    h = rgb.shape[0] // s
    blocks = lambda a: a.reshape(h, s, h, s, *a.shape[2:]).swapaxes(1, 2).reshape(h, h, s * s, *a.shape[2:])
    rgb_lo = blocks(rgb).mean(axis=2)
    g, z = blocks(groups), blocks(depth)
    counts = (g[..., :, None] == g[..., None, :]).sum(-1)
    major = np.take_along_axis(g, counts.argmax(-1)[..., None], -1)[..., 0]
    same = g == major[..., None]
    inv = np.where(same & (z > 0), 1 / np.where(z > 0, z, 1), 0).sum(-1)
    depth_lo = np.where(inv > 0, same.sum(-1) / np.where(inv > 0, inv, 1), 0.0)
    groups_lo = np.where(same.all(-1), major, np.where(major == 0, -50, major))  # floor only if pure
    return rgb_lo, depth_lo, groups_lo


def _view(client: _Client, seed: int, size: int, augment: bool, supersample: int) -> View:
    scene, (_, cam_index) = client.scene, split_seed(seed)
    cam = scene.cameras[cam_index]
    rng = np.random.default_rng([seed, 11])
    light = _light(rng, scene, cam)
    rgb, depth, groups = client.render(cam, size * supersample, light.renderer_kwargs)
    shade = _shade(client, cam, light, depth, intrinsics(cam.fov_deg, size * supersample))
    img, depth, groups = _downsample(rgb * (shade / 255)[..., None], depth, groups, supersample)
    K = intrinsics(cam.fov_deg, size, supersample)
    rgb = photometric.finish(img, depth, K, cam.R, scene.haze_m, scene.sky, rng)
    if augment:
        rgb = photometric.augment(rgb, np.random.default_rng([seed, 12]))
    _, counts = np.unique(groups[groups > 0], return_counts=True)
    floor_mask = groups == 0
    return View(
        rgb=rgb,
        depth=depth.astype(np.float32),
        K=K,
        kind=scene.kind,
        seed=seed,
        floor=(cam.R.T @ np.array([0.0, 0.0, 1.0]), float(cam.eye[2])),
        floor_mask=floor_mask,
        n_objects=int((counts >= MIN_OBJECT_PIXELS * size * size).sum()),
        textures=tuple(sorted({p.texture for p in scene.parts})),
    )


def _render_group(args) -> list[View]:
    seeds, size, kind, augment, supersample = args
    scene = layouts.build_scene(split_seed(seeds[0])[0], kind)
    with _Client(scene) as client:
        return [_view(client, s, size, augment, supersample) for s in seeds]


def render_view(seed: int, size: int = 256, kind: str | None = None, augment: bool = False,
                supersample: int = 1) -> View:
    """Render view ``seed`` (camera ``seed % 4`` of scene ``seed // 4``); a pure function of its arguments."""
    return _render_group(([int(seed)], size, kind, augment, supersample))[0]


def _groups(seeds: Iterable[int], size, kind, augment, supersample):
    for _, grp in groupby((int(s) for s in seeds), key=lambda s: split_seed(s)[0]):
        yield list(grp), size, kind, augment, supersample


def render_views(seeds: Iterable[int], size: int = 256, processes: int = 1, kind: str | None = None,
                 augment: bool = False, supersample: int = 1) -> Iterator[View]:
    """Render many views in order; consecutive seeds of one scene share its build. ``processes > 1``
    uses a spawn-context multiprocessing pool (order kept, results identical to one process)."""
    jobs = _groups(seeds, size, kind, augment, supersample)
    if processes <= 1:
        for job in jobs:
            yield from _render_group(job)
        return
    with get_context("spawn").Pool(processes, maxtasksperchild=RECYCLE_AFTER_SCENES) as pool:
        for views in pool.imap(_render_group, jobs):
            yield from views


def view_id(seed: int) -> str:
    return f"scene_{int(seed):06d}"
