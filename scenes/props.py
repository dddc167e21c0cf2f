"""Props for the rendered scenes: clutter objects, furniture and outdoor structures, as textured parts.

Depth models must learn occlusion boundaries, thin structures (table legs, poles, fence rails, lamp cords)
and objects standing on others, which isolated primitives do not teach. A prop is a list of parts placed
relative to its base point (footprint centre on the supporting surface, z up), so a layout can stand it on
a floor, table or shelf with any yaw; it is a pure function of the numpy generator it is given.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from scenes import meshes
from scenes.textures import textures_for


@dataclass
class Part:
    shape: str
    size: tuple[float, ...]
    pos: np.ndarray  # (3,) centre, metres
    rot: np.ndarray  # (3, 3) local -> parent rotation
    texture: str
    tint: tuple[float, float, float]
    tile: float  # metres per texture repeat


@dataclass
class Prop:
    parts: list[Part]
    radius: float  # footprint radius on the support
    height: float  # top above the support
    name: str = ""
    tops: list[tuple[float, float]] = field(default_factory=list)  # (height, half-size) of flat tops to stack on


def rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


NATURAL_TINTS = {
    "grass": [(0.45, 0.65, 0.3), (0.55, 0.7, 0.35), (0.6, 0.62, 0.4)],
    "brick": [(0.75, 0.45, 0.35), (0.85, 0.6, 0.45), (0.7, 0.7, 0.7), (0.9, 0.85, 0.75)],
    "gravel": [(0.8, 0.78, 0.72), (0.7, 0.65, 0.55), (0.75, 0.75, 0.78)],
    "moon": [(0.85, 0.8, 0.72), (0.75, 0.75, 0.75), (0.8, 0.7, 0.55)],
}


PALETTE_SIZES = {"floor": 2, "wall": 2, "ground": 2, "object": 6, "poster": 3}
_palette: ContextVar[dict[str, tuple] | None] = ContextVar("palette", default=None)


@contextmanager
def palette(rng: np.random.Generator):
    """Restrict materials to a few textures per role while building one scene.

    Why: real scenes reuse a handful of materials, and every distinct texture costs the renderer a
    file load per scene; tints keep objects varied.
    """
    chosen = {}
    for role, n in PALETTE_SIZES.items():
        options = textures_for(role)
        chosen[role] = tuple(options[i] for i in rng.choice(len(options), min(n, len(options)), replace=False))
    token = _palette.set(chosen)
    try:
        yield chosen
    finally:
        _palette.reset(token)


def material(rng: np.random.Generator, role: str, scale: float) -> tuple[str, tuple, float]:
    """(texture name, tint, tile size) for a surface of the given role and typical size in metres."""
    choices = (_palette.get() or {}).get(role) or textures_for(role)
    tex = choices[rng.integers(len(choices))]
    if tex.source in NATURAL_TINTS:  # grey photographs of natural materials: plausible colours
        palette = NATURAL_TINTS[tex.source]
        tint = np.clip(np.array(palette[rng.integers(len(palette))]) * rng.uniform(0.85, 1.1, 3), 0, 1)
    elif tex.name.startswith("poster:"):
        tint = np.clip(1 - rng.uniform(0, 0.15, 3), 0, 1)
    elif tex.grey:  # other grey photographs: give them a colour
        tint = np.array(rng.uniform(0.45, 1.0, 3))
    else:
        tint = np.clip(rng.uniform(0.7, 1.0) - rng.uniform(0, 0.2, 3), 0.2, 1)
    return tex.name, tuple(float(t) for t in tint), float(scale * rng.uniform(0.5, 2.0))


def part(rng, shape, size, pos, rot=None, role="object", scale=None, mat=None) -> Part:
    texture, tint, tile = mat or material(rng, role, scale or max(size))
    return Part(shape, tuple(float(s) for s in size), np.asarray(pos, float), np.eye(3) if rot is None else rot,
                texture, tint, tile)


# ----- small and medium clutter -------------------------------------------------------------------


def clutter(rng: np.random.Generator, s: float) -> Prop:
    """One clutter object of typical size ``s`` metres (a few cm on a table, decimetres on a floor)."""
    kind = rng.choice(["box", "ball", "can", "cone", "capsule", "ring", "rock", "mug", "bottle", "stack",
                       "lamp", "frame", "rod"])
    d = s * rng.uniform(0.5, 1.5, 3)
    if kind == "box":
        return Prop([part(rng, "box", d / 2, [0, 0, d[2] / 2])], float(np.hypot(*d[:2]) / 2), d[2], kind,
                    [(d[2], min(d[:2]) / 2)])
    if kind == "ball":
        return Prop([part(rng, "sphere", (d[0] / 2,), [0, 0, d[0] / 2])], d[0] / 2, d[0], kind)
    if kind == "can":
        r, h = d[0] / 2, d[2] * rng.uniform(0.8, 2)
        return Prop([part(rng, "cylinder", (r, h), [0, 0, h / 2])], r, h, kind, [(h, r * 0.7)])
    if kind == "cone":
        return Prop([part(rng, "cone", (d[0] / 2, d[2]), [0, 0, d[2] / 2])], d[0] / 2, d[2], kind)
    if kind == "capsule":
        r, length = d[0] / 4, d[1]
        if rng.random() < 0.5:  # lying down
            return Prop([part(rng, "capsule", (r, length), [0, 0, r], rot_y(np.pi / 2))], length / 2 + r, 2 * r, kind)
        return Prop([part(rng, "capsule", (r, length), [0, 0, length / 2 + r])], r, length + 2 * r, kind)
    if kind == "ring":
        big, small = d[0] / 2, d[0] / 2 * rng.uniform(0.15, 0.4)
        return Prop([part(rng, "torus", (big, small), [0, 0, small])], big + small, 2 * small, kind)
    if kind == "rock":
        radii = d / 2 * [1, 1, rng.uniform(0.4, 0.9)]
        return Prop([part(rng, "ellipsoid", radii, [0, 0, radii[2] * 0.85], rot_z(rng.uniform(0, 6)))],
                    float(max(radii[:2])), radii[2] * 1.85, kind)
    if kind == "mug":
        r, h = d[0] / 2, d[0] * rng.uniform(0.9, 1.4)
        mat = material(rng, "object", s)
        return Prop([part(rng, "cylinder", (r, h), [0, 0, h / 2], mat=mat),
                     part(rng, "torus", (h / 3, r / 5), [r + h / 6, 0, h / 2], rot_x(np.pi / 2), mat=mat)],
                    r + h / 3, h, kind)
    if kind == "bottle":
        r, h = d[0] / 3, d[2] * rng.uniform(1.5, 2.5)
        mat = material(rng, "object", s)
        return Prop([part(rng, "cylinder", (r, h * 0.65), [0, 0, h * 0.325], mat=mat),
                     part(rng, "cone", (r, h * 0.2), [0, 0, h * 0.75], mat=mat),
                     part(rng, "cylinder", (r * 0.35, h * 0.2), [0, 0, h * 0.9], mat=mat)], r, h, kind)
    if kind == "stack":
        parts, z, half = [], 0.0, d[:2] / 2
        for _ in range(int(rng.integers(2, 5))):
            h = s * rng.uniform(0.2, 0.7)
            parts.append(part(rng, "box", (half[0], half[1], h / 2), [0, 0, z + h / 2], rot_z(rng.normal(0, 0.15))))
            z += h
            half = half * rng.uniform(0.7, 1.0, 2)
        return Prop(parts, float(np.hypot(*d[:2]) / 2), z, kind)
    if kind == "lamp":
        h, r = s * rng.uniform(1.5, 3), s * rng.uniform(0.3, 0.6)
        return Prop([part(rng, "cylinder", (r * 0.8, h * 0.04), [0, 0, h * 0.02]),
                     part(rng, "cylinder", (r * 0.06, h * 0.8), [0, 0, h * 0.4]),  # thin stem
                     part(rng, "cone", (r, h * 0.3), [0, 0, h * 0.85])], r, h, kind)
    if kind == "frame":  # a standing picture frame: four thin bars around a photo
        w, h, t = d[0], d[2] * 1.2, s * 0.05
        mat = material(rng, "object", s)
        return Prop([part(rng, "box", (w / 2, t, t), [0, 0, t], mat=mat),
                     part(rng, "box", (w / 2, t, t), [0, 0, h - t], mat=mat),
                     part(rng, "box", (t, t, h / 2), [-w / 2, 0, h / 2], mat=mat),
                     part(rng, "box", (t, t, h / 2), [w / 2, 0, h / 2], mat=mat),
                     part(rng, "box", (w / 2, t / 3, h / 2 - t), [0, 0, h / 2], mat=mat),  # backing board
                     # the photograph once, unmirrored, on the front (-y) face
                     part(rng, "poster", (w, h - 2 * t), [0, -t / 3 - 0.002, h / 2], rot_x(np.pi / 2), role="poster")],
                    w / 2 + t, h, kind)
    # rod: a thin pole, upright or lying
    r, length = s * rng.uniform(0.03, 0.08), s * rng.uniform(1.5, 4)
    if rng.random() < 0.5:
        return Prop([part(rng, "cylinder", (r, length), [0, 0, r], rot_y(np.pi / 2))], length / 2, 2 * r, kind)
    return Prop([part(rng, "cylinder", (r * 3, r), [0, 0, r / 2]),
                 part(rng, "cylinder", (r, length), [0, 0, length / 2])], r * 3, length, kind)


# ----- furniture ----------------------------------------------------------------------------------


def table(rng: np.random.Generator, size=None, height=None) -> Prop:
    w, dp = size if size is not None else rng.uniform([0.6, 0.5], [1.8, 1.0])
    h = height if height is not None else rng.uniform(0.65, 0.8)
    t, leg = rng.uniform(0.02, 0.05), rng.uniform(0.02, 0.05)
    top_mat, leg_mat = material(rng, "floor", 0.5), material(rng, "object", 0.3)
    parts = [part(rng, "box", (w / 2, dp / 2, t / 2), [0, 0, h - t / 2], mat=top_mat)]
    round_legs = rng.random() < 0.5
    for sx in (-1, 1):
        for sy in (-1, 1):
            pos = [sx * (w / 2 - 2 * leg), sy * (dp / 2 - 2 * leg), (h - t) / 2]
            size = (leg, h - t) if round_legs else (leg, leg, (h - t) / 2)
            parts.append(part(rng, "cylinder" if round_legs else "box", size, pos, mat=leg_mat))
    return Prop(parts, float(np.hypot(w, dp) / 2), h, "table", [(h, min(w, dp) / 2)])


def chair(rng: np.random.Generator) -> Prop:
    w, h, back = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48), rng.uniform(0.35, 0.5)
    leg, mat = rng.uniform(0.015, 0.03), material(rng, "object", 0.3)
    parts = [part(rng, "box", (w / 2, w / 2, 0.02), [0, 0, h], mat=mat),
             part(rng, "box", (w / 2, 0.015, back / 2), [0, -w / 2, h + back / 2], mat=mat)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(part(rng, "cylinder", (leg, h), [sx * (w / 2 - leg), sy * (w / 2 - leg), h / 2], mat=mat))
    return Prop(parts, w * 0.75, h + back, "chair")


def shelf(rng: np.random.Generator) -> Prop:
    w, dp, h = rng.uniform(0.6, 1.4), rng.uniform(0.25, 0.4), rng.uniform(0.8, 2.0)
    t, mat = 0.02, material(rng, "floor", 0.6)
    parts = [part(rng, "box", (t, dp / 2, h / 2), [sx * w / 2, 0, h / 2], mat=mat) for sx in (-1, 1)]
    levels = int(rng.integers(2, 6))
    for z in np.linspace(0.05, h - t, levels):
        parts.append(part(rng, "box", (w / 2, dp / 2, t / 2), [0, 0, z], mat=mat))
    return Prop(parts, float(np.hypot(w, dp) / 2), h, "shelf", [(h, min(w, dp) / 2)])


def cabinet(rng: np.random.Generator) -> Prop:
    d = rng.uniform([0.4, 0.3, 0.4], [1.6, 0.6, 1.2])
    parts = [part(rng, "box", d / 2, [0, 0, d[2] / 2], role="floor", scale=0.6)]
    return Prop(parts, float(np.hypot(*d[:2]) / 2), d[2], "cabinet", [(d[2], min(d[:2]) / 2)])


def sofa(rng: np.random.Generator) -> Prop:
    w, dp, mat = rng.uniform(1.4, 2.2), rng.uniform(0.7, 0.95), material(rng, "object", 0.4)
    seat, arm = rng.uniform(0.35, 0.45), 0.15
    parts = [part(rng, "box", (w / 2, dp / 2, seat / 2), [0, 0, seat / 2], mat=mat),
             part(rng, "box", (w / 2, 0.1, 0.4), [0, -dp / 2 + 0.1, seat + 0.3], mat=mat)]
    parts += [part(rng, "box", (arm / 2, dp / 2, 0.15), [sx * (w / 2 - arm / 2), 0, seat + 0.1], mat=mat)
              for sx in (-1, 1)]
    return Prop(parts, float(np.hypot(w, dp) / 2), seat + 0.7, "sofa")


FURNITURE = (table, chair, shelf, cabinet, sofa)


# ----- outdoor structures -------------------------------------------------------------------------


def building(rng: np.random.Generator) -> Prop:
    d = rng.uniform([4, 4, 3], [20, 14, 25])
    parts = [part(rng, "box", d / 2, [0, 0, d[2] / 2], role="wall", scale=2.0)]
    if rng.random() < 0.7:  # rows of dark windows on the front facade (thin boxes just proud of the wall)
        win = material(rng, "object", 0.5)
        win = (win[0], (0.25, 0.3, 0.35), win[2])
        for z in np.arange(1.5, d[2] - 1, 3.0):
            for x in np.arange(-d[0] / 2 + 1.5, d[0] / 2 - 1, 2.5):
                parts.append(part(rng, "box", (0.5, 0.05, 0.7), [x, -d[1] / 2 - 0.03, z], mat=win))
    return Prop(parts, float(np.hypot(*d[:2]) / 2), d[2], "building")


def tree(rng: np.random.Generator) -> Prop:
    h, r = rng.uniform(2.5, 9), rng.uniform(0.08, 0.3)
    bark, leaves = material(rng, "object", 0.5), material(rng, "ground", 1.0)
    leaves = (leaves[0], tuple(np.array([0.35, 0.6, 0.3]) * rng.uniform(0.6, 1.2)), leaves[2])
    parts = [part(rng, "cylinder", (r, h * 0.6), [0, 0, h * 0.3], mat=bark)]
    crown = h * rng.uniform(0.2, 0.35)
    for _ in range(int(rng.integers(1, 4))):
        c = [rng.normal(0, crown / 3), rng.normal(0, crown / 3), h * 0.6 + crown * rng.uniform(0.3, 0.9)]
        parts.append(part(rng, "ellipsoid", crown * rng.uniform(0.7, 1.1, 3), c, mat=leaves))
    return Prop(parts, crown * 1.3, h * 0.6 + 2 * crown, "tree")


def lamp_post(rng: np.random.Generator) -> Prop:
    h, mat = rng.uniform(3, 6), material(rng, "object", 0.3)
    arm = rng.uniform(0.5, 1.2)
    return Prop([part(rng, "cylinder", (0.06, h), [0, 0, h / 2], mat=mat),
                 part(rng, "box", (arm / 2, 0.04, 0.04), [arm / 2, 0, h - 0.05], mat=mat),
                 part(rng, "box", (0.2, 0.12, 0.06), [arm, 0, h - 0.12])], arm, h, "lamp_post")


def fence(rng: np.random.Generator) -> Prop:
    n, gap, h = int(rng.integers(4, 12)), rng.uniform(0.8, 2.0), rng.uniform(0.8, 1.5)
    mat, length = material(rng, "object", 0.5), 0.0
    parts = []
    for i in range(n):
        parts.append(part(rng, "box", (0.04, 0.04, h / 2), [i * gap, 0, h / 2], mat=mat))
    length = (n - 1) * gap
    for z in (h * 0.4, h * 0.85):
        parts.append(part(rng, "box", (length / 2, 0.02, 0.04), [length / 2, 0.05, z], mat=mat))
    for p in parts:
        p.pos[0] -= length / 2
    return Prop(parts, length / 2, h, "fence")


def car(rng: np.random.Generator) -> Prop:
    length, w = rng.uniform(3.6, 4.8), rng.uniform(1.6, 1.9)
    body = material(rng, "object", 1.0)
    body = (body[0], tuple(rng.uniform(0.2, 1.0, 3)), body[2])
    wheel_r = 0.32
    parts = [part(rng, "box", (length / 2, w / 2, 0.35), [0, 0, wheel_r + 0.3], mat=body),
             part(rng, "box", (length / 4, w / 2 - 0.08, 0.28), [-0.2, 0, wheel_r + 0.93], mat=body)]
    tyre = ("noise:2", (0.15, 0.15, 0.15), 0.3)
    for sx in (-1, 1):
        for sy in (-1, 1):
            parts.append(part(rng, "cylinder", (wheel_r, 0.22), [sx * length * 0.32, sy * w / 2, wheel_r],
                              rot_x(np.pi / 2), mat=tyre))
    return Prop(parts, length / 2, wheel_r + 1.21, "car")


def bench(rng: np.random.Generator) -> Prop:
    w, mat = rng.uniform(1.2, 2.0), material(rng, "floor", 0.5)
    parts = [part(rng, "box", (w / 2, 0.2, 0.025), [0, 0, 0.45], mat=mat),
             part(rng, "box", (w / 2, 0.02, 0.15), [0, -0.2, 0.75], mat=mat)]
    parts += [part(rng, "box", (0.03, 0.2, 0.22), [sx * (w / 2 - 0.1), 0, 0.22], mat=mat) for sx in (-1, 1)]
    return Prop(parts, w / 2, 0.9, "bench")


OUTDOOR = (tree, lamp_post, fence, car, bench)


def build_mesh(p: Part) -> meshes.Mesh:
    return meshes.make(p.shape, p.size, p.tile)
