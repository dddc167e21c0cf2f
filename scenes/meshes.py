"""Triangle meshes with metric texture coordinates for the scene renderer.

pybullet stretches one copy of a texture over each primitive face whatever its size, which loses the
texture-gradient depth cue. Here UVs are metres divided by a tile size, so a pattern repeats every
``tile`` metres on every surface and its image density falls with distance, as in photographs.
All meshes are centred on their own origin; ``z`` is up for cylinders, capsules and cones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mesh:
    vertices: np.ndarray  # (N, 3) float
    normals: np.ndarray  # (N, 3) unit
    uvs: np.ndarray  # (N, 2)
    indices: np.ndarray  # (M,) int, triangles counter-clockwise seen from outside


def merge(parts: list[Mesh]) -> Mesh:
    offset, idx = 0, []
    for m in parts:
        idx.append(m.indices + offset)
        offset += len(m.vertices)
    return Mesh(
        np.concatenate([m.vertices for m in parts]),
        np.concatenate([m.normals for m in parts]),
        np.concatenate([m.uvs for m in parts]),
        np.concatenate(idx),
    )


def _grid_indices(rows: int, cols: int) -> np.ndarray:
    """Two triangles per cell of a (rows+1) x (cols+1) vertex grid laid out row-major."""
    r, c = np.mgrid[0:rows, 0:cols]
    a = (r * (cols + 1) + c).ravel()
    b, d, e = a + 1, a + cols + 1, a + cols + 2
    return np.stack([a, b, e, a, e, d], axis=1).ravel()


def quad(width: float, height: float, tile: float, uv_offset=(0.0, 0.0)) -> Mesh:
    """A rectangle in the z=0 plane facing +z, UVs in units of ``tile`` metres."""
    x = np.array([-1, 1, -1, 1]) * width / 2
    y = np.array([-1, -1, 1, 1]) * height / 2
    v = np.stack([x, y, np.zeros(4)], axis=1)
    uv = np.stack([x / tile + uv_offset[0], y / tile + uv_offset[1]], axis=1)
    n = np.tile([0.0, 0.0, 1.0], (4, 1))
    return Mesh(v, n, uv, np.array([0, 1, 3, 0, 3, 2]))


FACE_ROTATIONS = {  # rotation taking +z to each face normal
    "+z": np.eye(3),
    "-z": np.diag([1.0, -1.0, -1.0]),
    "+x": np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float),
    "-x": np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]], float),
    "+y": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float),
    "-y": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float),
}


def _box_template():
    """Unit-box faces: corner signs, normals, and the two in-face axes (for metric UVs)."""
    corners, normals, u_axes, v_axes = [], [], [], []
    for rot in FACE_ROTATIONS.values():
        for x, y in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            corners.append(rot @ np.array([x, y, 1.0]))
            normals.append(rot[:, 2])
            u_axes.append(rot[:, 0])
            v_axes.append(rot[:, 1])
    idx = np.concatenate([np.array([0, 1, 3, 0, 3, 2]) + 4 * f for f in range(6)])
    return np.array(corners), np.array(normals), np.array(u_axes), np.array(v_axes), idx


_BOX = _box_template()


def box(half: tuple[float, float, float], tile: float) -> Mesh:
    corners, normals, u_axes, v_axes, idx = _BOX
    v = corners * np.asarray(half, float)
    uv = np.stack([(v * u_axes).sum(1), (v * v_axes).sum(1)], 1) / tile
    return Mesh(v, normals.copy(), uv, idx.copy())


def _surface_of_revolution(profile: np.ndarray, normals2d: np.ndarray, segments: int, tile: float) -> Mesh:
    """Revolve (r, z) profile points around z. UVs: arc length around / along the profile, metres/tile."""
    theta = np.linspace(0, 2 * np.pi, segments + 1)
    r, z = profile[:, 0], profile[:, 1]
    ct, st = np.cos(theta), np.sin(theta)
    v = np.stack([r[:, None] * ct, r[:, None] * st, np.broadcast_to(z[:, None], (len(r), segments + 1))], -1)
    n = np.stack(
        [normals2d[:, :1] * ct, normals2d[:, :1] * st, np.broadcast_to(normals2d[:, 1:], (len(r), segments + 1))],
        -1,
    )
    along = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(profile, axis=0), axis=1))])
    u = theta[None, :] * max(float(r.max()), 1e-3)
    uv = np.stack([np.broadcast_to(u, v.shape[:2]), np.broadcast_to(along[:, None], v.shape[:2])], -1) / tile
    return Mesh(v.reshape(-1, 3), n.reshape(-1, 3), uv.reshape(-1, 2), _grid_indices(len(r) - 1, segments))


def _disc(radius: float, z: float, up: bool, segments: int, tile: float) -> Mesh:
    theta = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    rim = np.stack([radius * np.cos(theta), radius * np.sin(theta), np.full(segments, z)], 1)
    v = np.concatenate([[[0, 0, z]], rim])
    n = np.tile([0, 0, 1.0 if up else -1.0], (segments + 1, 1))
    i = np.arange(segments)
    tri = np.stack([np.zeros(segments, int), 1 + i, 1 + (i + 1) % segments], 1)
    if not up:
        tri = tri[:, ::-1]
    return Mesh(v, n, v[:, :2] / tile, tri.ravel())


def cylinder(radius: float, height: float, tile: float, segments: int = 18) -> Mesh:
    prof = np.array([[radius, -height / 2], [radius, height / 2]])
    side = _surface_of_revolution(prof, np.array([[1.0, 0.0], [1.0, 0.0]]), segments, tile)
    return merge(
        [side, _disc(radius, height / 2, True, segments, tile), _disc(radius, -height / 2, False, segments, tile)]
    )


def cone(radius: float, height: float, tile: float, segments: int = 18) -> Mesh:
    prof = np.array([[radius, -height / 2], [1e-4, height / 2]])
    slope = np.array([height, radius]) / np.hypot(height, radius)
    side = _surface_of_revolution(prof, np.array([slope, slope]), segments, tile)
    return merge([side, _disc(radius, -height / 2, False, segments, tile)])


def ellipsoid(radii: tuple[float, float, float], tile: float, segments: int = 18, rings: int = 10) -> Mesh:
    phi = np.linspace(-np.pi / 2, np.pi / 2, rings + 1)
    unit = _surface_of_revolution(
        np.stack([np.cos(phi) + 1e-4, np.sin(phi)], 1), np.stack([np.cos(phi), np.sin(phi)], 1), segments, 1.0
    )
    radii = np.asarray(radii, float)
    nrm = unit.normals / radii
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    return Mesh(unit.vertices * radii, nrm, unit.uvs * radii.max() / tile, unit.indices)


def capsule(radius: float, length: float, tile: float, segments: int = 18, rings: int = 8) -> Mesh:
    """A cylinder of ``length`` between two hemispherical caps (total height length + 2 radius)."""
    phi = np.concatenate([np.linspace(-np.pi / 2, 0, rings // 2 + 1), np.linspace(0, np.pi / 2, rings // 2 + 1)])
    z = radius * np.sin(phi) + np.where(np.arange(len(phi)) <= rings // 2, -length / 2, length / 2)
    prof = np.stack([radius * np.cos(phi) + 1e-4, z], 1)
    return _surface_of_revolution(prof, np.stack([np.cos(phi), np.sin(phi)], 1), segments, tile)


def torus(major: float, minor: float, tile: float, segments: int = 20, rings: int = 10) -> Mesh:
    a = np.linspace(0, 2 * np.pi, rings + 1)
    prof = np.stack([major + minor * np.cos(a), minor * np.sin(a)], 1)
    return _surface_of_revolution(prof, np.stack([np.cos(a), np.sin(a)], 1), segments, tile)


def make(shape: str, size: tuple[float, ...], tile: float) -> Mesh:
    """Build a mesh by name: box (hx,hy,hz), sphere/ellipsoid (rx,ry,rz), cylinder/cone (r,h),
    capsule (r,length), torus (R,r), quad (w,h), poster (w,h)."""
    if shape == "box":
        return box(size, tile)
    if shape in ("sphere", "ellipsoid"):
        return ellipsoid(size if len(size) == 3 else (size[0],) * 3, tile)
    if shape == "cylinder":
        return cylinder(size[0], size[1], tile)
    if shape == "cone":
        return cone(size[0], size[1], tile)
    if shape == "capsule":
        return capsule(size[0], size[1], tile)
    if shape == "torus":
        return torus(size[0], size[1], tile)
    if shape == "quad":
        return quad(size[0], size[1], tile)
    if shape == "poster":  # one unwrapped copy of the image, centred
        return quad(size[0], size[1], max(size[0], size[1]), uv_offset=(0.5, 0.5))
    raise ValueError(f"unknown shape {shape!r}")


def half_height(shape: str, size: tuple[float, ...]) -> float:
    """Half extent along local z: how high the centre sits above a support the mesh stands on."""
    return {
        "box": lambda: size[2],
        "sphere": lambda: size[-1],
        "ellipsoid": lambda: size[2],
        "cylinder": lambda: size[1] / 2,
        "cone": lambda: size[1] / 2,
        "capsule": lambda: size[1] / 2 + size[0],
        "torus": lambda: size[1],
        "quad": lambda: 0.0,
        "poster": lambda: 0.0,
    }[shape]()
