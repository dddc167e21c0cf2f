"""Random scene layouts (rooms, tabletops, outdoor lots) and their cameras, as plain data.

The whole scene, cameras included, is drawn from one numpy generator seeded by the scene seed before any
renderer exists: a scene is a pure function of its seed, countable without rendering, shared by its views.
Cameras are drawn before the clutter, which is dropped where camera rays meet supporting surfaces, so every
view sees 10-30 objects; pitch, roll and field of view vary, so "bottom of the image is near" is not the
only lesson. World frame: z up, floor at z = 0. Camera frame: OpenCV (x right, y down, z forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scenes import props
from scenes.props import Part, Prop, material, part, rot_x, rot_z

KINDS = ("room", "tabletop", "outdoor")
KIND_WEIGHTS = (0.35, 0.35, 0.30)
VIEWS_PER_SCENE = 4


@dataclass
class Camera:
    eye: np.ndarray  # (3,) world position
    R: np.ndarray  # (3, 3) columns: camera x (right), y (down), z (forward) in world coordinates
    fov_deg: float  # vertical field of view
    near: float
    far: float


@dataclass
class Support:
    """A horizontal rectangle objects can stand on."""

    centre: np.ndarray  # (2,)
    half: np.ndarray  # (2,) half extents along the rotated axes
    yaw: float
    z: float
    clutter_size: tuple[float, float]  # typical object size range (metres) on this support

    def contains(self, xy: np.ndarray, margin: float = 0.0) -> bool:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        dx, dy = xy[0] - self.centre[0], xy[1] - self.centre[1]
        return abs(c * dx + s * dy) <= self.half[0] - margin and abs(-s * dx + c * dy) <= self.half[1] - margin

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        return self.centre + rot_z(self.yaw)[:2, :2] @ (rng.uniform(-1, 1, 2) * self.half)


@dataclass
class Scene:
    kind: str
    seed: int
    parts: list[Part] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # object id per part; 0 = floor, < 0 = walls etc.
    cameras: list[Camera] = field(default_factory=list)
    supports: list[Support] = field(default_factory=list)
    footprints: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, base z, radius
    sky: bool = False
    haze_m: float = np.inf
    lamp: np.ndarray | None = None  # indoor point light (world position); None = sunlight
    n_groups: int = 0

    def add(self, parts: list[Part], group: int | None = None) -> int:
        if group is None:
            self.n_groups += 1
            group = self.n_groups
        self.parts += parts
        self.groups += [group] * len(parts)
        return group

    def place(self, prop: Prop, xy, z: float, yaw: float) -> int:
        R = rot_z(yaw)
        moved = [Part(p.shape, p.size, R @ p.pos + [xy[0], xy[1], z], R @ p.rot, p.texture, p.tint, p.tile)
                 for p in prop.parts]
        self.footprints.append((float(xy[0]), float(xy[1]), z, prop.radius))
        for h, half in prop.tops:
            if half > 0.03:
                self.supports.append(Support(np.array(xy[:2], float), np.array([half, half]) * 0.8, yaw, z + h,
                                             (0.03, min(0.15, half))))
        return self.add(moved)

    def is_free(self, xy, z: float, prop: Prop, eye_clearance: float) -> bool:
        """No overlap with props on the same support, and no camera inside the prop's bounding sphere."""
        for x, y, fz, r in self.footprints:
            if abs(fz - z) < 0.05 and np.hypot(xy[0] - x, xy[1] - y) < r + prop.radius:
                return False
        centre = np.array([xy[0], xy[1], z + prop.height / 2])
        bound = np.hypot(prop.radius, prop.height / 2)
        return all(np.linalg.norm(cam.eye - centre) > bound + eye_clearance for cam in self.cameras)


def look(eye, yaw: float, pitch: float, roll: float, fov: float, near: float, far: float) -> Camera:
    """Camera at ``eye`` looking along (yaw, pitch) in degrees, rolled about its optical axis."""
    y, p, r = np.radians([yaw, pitch, roll])
    fwd = np.array([np.cos(p) * np.cos(y), np.cos(p) * np.sin(y), np.sin(p)])
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    right, down = np.cos(r) * right + np.sin(r) * down, -np.sin(r) * right + np.cos(r) * down
    return Camera(np.asarray(eye, float), np.stack([right, down, fwd], axis=1), float(fov), near, far)


def pixel_ray(cam: Camera, u: float, v: float) -> np.ndarray:
    """World direction through normalised image coordinates (u, v) in [0, 1]^2."""
    t = np.tan(np.radians(cam.fov_deg) / 2)
    d = cam.R @ np.array([(2 * u - 1) * t, (2 * v - 1) * t, 1.0])
    return d / np.linalg.norm(d)


def ray_support_hit(scene: Scene, cam: Camera, u: float, v: float, max_dist: float):
    """First support a pixel ray meets (within max_dist): (support, xy) or None."""
    d = pixel_ray(cam, u, v)
    best = None
    for s in scene.supports:
        if d[2] >= -1e-3 or cam.eye[2] <= s.z:
            continue
        t = (s.z - cam.eye[2]) / d[2]
        xy = cam.eye[:2] + t * d[:2]
        if t < max_dist and s.contains(xy, 0.02) and (best is None or t < best[0]):
            best = (t, s, xy)
    return None if best is None else best[1:]


def _roll(rng) -> float:
    return float(rng.uniform(-20, 20) if rng.random() < 0.5 else rng.normal(0, 2))


def _drop_clutter(scene: Scene, rng, n: int, max_dist: float, bottom_bias: float = 0.0) -> int:
    """Drop up to ``n`` clutter props where camera rays meet supports; returns how many were placed."""
    placed = 0
    for i in range(n * 4):
        if placed >= n:
            break
        cam = scene.cameras[i % len(scene.cameras)]
        v = rng.uniform(0.75, 1.0) if rng.random() < bottom_bias else rng.uniform(0.05, 0.95)
        hit = ray_support_hit(scene, cam, rng.uniform(0.05, 0.95), v, max_dist)
        if hit is None:
            continue
        support, xy = hit
        prop = props.clutter(rng, float(rng.uniform(*support.clutter_size)))
        if support.contains(xy, prop.radius * 0.5) and scene.is_free(xy, support.z, prop, 0.05):
            scene.place(prop, xy, support.z, rng.uniform(0, 2 * np.pi))
            placed += 1
    return placed


def _room_shell(scene: Scene, rng, w: float, d: float, h: float) -> Support:
    floor_mat = material(rng, "floor", 1.0)
    scene.add([part(rng, "quad", (w, d), [0, 0, 0], mat=floor_mat)], group=0)
    wall = material(rng, "wall", 1.5)
    walls = []
    for sign in (-1, 1):
        walls.append(part(rng, "box", (w / 2 + 0.1, 0.05, h / 2), [0, sign * (d / 2 + 0.05), h / 2], mat=wall))
        walls.append(part(rng, "box", (0.05, d / 2 + 0.1, h / 2), [sign * (w / 2 + 0.05), 0, h / 2], mat=wall))
    if rng.random() < 0.4:  # an accent wall
        walls[int(rng.integers(4))].texture, _, _ = material(rng, "wall", 1.5)
    scene.add(walls, group=-1)
    ceiling = ("noise:" + str(int(rng.integers(4))), (0.95, 0.95, 0.93), 2.0)
    scene.add([part(rng, "box", (w / 2, d / 2, 0.05), [0, 0, h + 0.05], mat=ceiling)], group=-2)
    skirting = material(rng, "object", 0.5)
    scene.add([part(rng, "box", (w / 2, 0.01, 0.04), [0, s * (d / 2 - 0.01), 0.04], mat=skirting) for s in (-1, 1)]
              + [part(rng, "box", (0.01, d / 2, 0.04), [s * (w / 2 - 0.01), 0, 0.04], mat=skirting)
                 for s in (-1, 1)], group=-3)
    for _ in range(int(rng.integers(1, 5))):  # posters and pictures on the walls
        side = int(rng.integers(4))
        facing = np.radians(90 * side)  # inward normal of wall `side`: +x, +y, -x, -y
        along = rng.uniform(-0.35, 0.35) * (d if side % 2 == 0 else w)
        centre = -np.array([np.cos(facing), np.sin(facing)]) * (np.array([w, d]) / 2 - 0.005)
        centre += np.array([-np.sin(facing), np.cos(facing)]) * along
        size = rng.uniform([0.3, 0.3], [1.4, 1.0])
        R = rot_z(facing + np.pi / 2) @ rot_x(np.pi / 2)
        scene.add([part(rng, "poster", size, [centre[0], centre[1], rng.uniform(1.2, 1.8)], role="poster", rot=R)])
    return Support(np.zeros(2), np.array([w / 2, d / 2]), 0.0, 0.0, (0.08, 0.45))


def _free_distance(eye: np.ndarray, direction: np.ndarray, half: np.ndarray, height: float) -> float:
    """Distance from a point inside the room box to the first wall, floor or ceiling along a direction."""
    lo, hi = np.array([-half[0], -half[1], 0.0]), np.array([half[0], half[1], height])
    with np.errstate(divide="ignore"):
        t = np.where(direction > 0, (hi - eye) / direction, np.where(direction < 0, (lo - eye) / direction, np.inf))
    return float(t.min())


def _room_cameras(rng, w, d, h, n, height=(0.5, 2.0)) -> list[Camera]:
    """Cameras inside the room that see at least 1.5 m before hitting a wall (no blank-wall views)."""
    cams = []
    while len(cams) < n:
        eye = np.array([rng.uniform(-1, 1) * (w / 2 - 0.4), rng.uniform(-1, 1) * (d / 2 - 0.4), rng.uniform(*height)])
        target = rng.uniform(-0.5, 0.5, 2) * [w, d]
        yaw = np.degrees(np.arctan2(*(target - eye[:2])[::-1])) + rng.normal(0, 20)
        pitch = rng.uniform(-80, 30) if rng.random() < 0.3 else rng.uniform(-45, 10)
        cam = look(eye, yaw, pitch, _roll(rng), rng.uniform(50, 80), 0.05, 20.0)
        if _free_distance(eye, cam.R[:, 2], np.array([w, d]) / 2, h) > 1.5:
            cams.append(cam)
    return cams


def _furnish(scene: Scene, rng, floor: Support, n: int) -> None:
    for _ in range(n * 5):
        if n <= 0:
            break
        prop = props.FURNITURE[int(rng.integers(len(props.FURNITURE)))](rng)
        if rng.random() < 0.6:  # against a wall, back to it
            side = int(rng.integers(4))
            facing = np.radians(90 * side)
            inward = np.array([np.cos(facing), np.sin(facing)])
            xy = -inward * (floor.half - prop.radius * 0.7) + np.array([-inward[1], inward[0]]) * rng.uniform(-1, 1) * 1.5
            yaw = facing - np.pi / 2
        else:
            xy, yaw = floor.sample(rng) * 0.8, rng.uniform(0, 2 * np.pi)
        if floor.contains(xy, prop.radius * 0.5) and scene.is_free(xy, 0.0, prop, 0.3):
            scene.place(prop, xy, 0.0, yaw)
            n -= 1


def _near_occluders(scene: Scene, rng, p: float, dist: tuple[float, float], top: float) -> None:
    """Thin vertical poles or pillars just in front of some cameras, off to one side."""
    for cam in list(scene.cameras):
        if rng.random() >= p:
            continue
        ray = pixel_ray(cam, rng.choice([rng.uniform(0.05, 0.3), rng.uniform(0.7, 0.95)]), rng.uniform(0.3, 0.7))
        xy = cam.eye[:2] + ray[:2] / max(np.linalg.norm(ray[:2]), 1e-6) * rng.uniform(*dist)
        r = float(rng.uniform(0.01, 0.12))
        shape = "cylinder" if rng.random() < 0.6 else "box"
        size = (r, top) if shape == "cylinder" else (r, r * rng.uniform(1, 3), top / 2)
        scene.add([part(rng, shape, size, [xy[0], xy[1], top / 2], scale=0.3, rot=rot_z(rng.uniform(0, 6)))])


def _hang_lamp(scene: Scene, rng, xy: np.ndarray, ceiling: float) -> None:
    """A lamp hanging from the ceiling (cord + shade); the point light sits just under the shade.

    Skipped (light only) where the shade would come near a camera.
    """
    drop = float(rng.uniform(0.3, 0.9))
    r, hgt = float(rng.uniform(0.12, 0.3)), float(rng.uniform(0.12, 0.3))
    rim = ceiling - drop - hgt
    scene.lamp = np.array([xy[0], xy[1], rim - 0.03])
    if all(np.linalg.norm(cam.eye - [xy[0], xy[1], rim + hgt / 2]) > r + 0.4 for cam in scene.cameras):
        shade = material(rng, "object", 0.3)
        scene.add([part(rng, "cylinder", (0.006, drop), [xy[0], xy[1], ceiling - drop / 2], mat=shade),
                   part(rng, "cone", (r, hgt), [xy[0], xy[1], rim + hgt / 2], mat=shade)])


def room(scene: Scene, rng) -> None:
    w, d, h = rng.uniform(3, 8), rng.uniform(3, 8), rng.uniform(2.4, 3.2)
    floor = _room_shell(scene, rng, w, d, h)
    scene.supports.append(floor)
    scene.cameras = _room_cameras(rng, w, d, h, VIEWS_PER_SCENE)
    _furnish(scene, rng, floor, int(rng.integers(2, 7)))
    _drop_clutter(scene, rng, int(rng.integers(15, 40)), max_dist=8.0)
    _near_occluders(scene, rng, 0.35, (0.3, 1.2), h)
    _hang_lamp(scene, rng, floor.sample(rng) * 0.6, h)


def tabletop(scene: Scene, rng) -> None:
    w, d, h = rng.uniform(3.5, 7), rng.uniform(3.5, 7), rng.uniform(2.4, 3.0)
    floor = _room_shell(scene, rng, w, d, h)
    scene.supports.append(floor)
    tab = props.table(rng, size=rng.uniform([0.8, 0.6], [2.0, 1.2]), height=rng.uniform(0.6, 0.9))
    tab_yaw = rng.uniform(0, np.pi)
    table_xy = rng.uniform(-0.2, 0.2, 2) * [w, d]
    scene.place(tab, table_xy, 0.0, tab_yaw)
    top = scene.supports[-1]
    top.half = np.array([tab.parts[0].size[0], tab.parts[0].size[1]]) - 0.02
    top.clutter_size = (0.03, 0.15)
    tries = 0
    while len(scene.cameras) < VIEWS_PER_SCENE:
        tries += 1
        target = np.append(top.centre + rot_z(top.yaw)[:2, :2] @ (rng.uniform(-0.7, 0.7, 2) * top.half), top.z)
        pitch = rng.uniform(-88, -65) if rng.random() < 0.3 else rng.uniform(-65, -15)
        cam = look([0, 0, 0], rng.uniform(0, 360), pitch, _roll(rng), rng.uniform(45, 75), 0.02, 12.0)
        cam.eye = target - cam.R[:, 2] * rng.uniform(0.3, 1.5 if tries < 100 else 0.5)
        if floor.contains(cam.eye[:2], 0.2) and top.z + 0.08 < cam.eye[2] < h - 0.1:
            scene.cameras.append(cam)
    _furnish(scene, rng, floor, int(rng.integers(1, 4)))
    _drop_clutter(scene, rng, int(rng.integers(12, 31)), max_dist=3.0, bottom_bias=0.2)
    _drop_clutter(scene, rng, int(rng.integers(2, 6)), max_dist=3.0)  # stacked or on the floor
    _hang_lamp(scene, rng, top.centre + rng.normal(0, 0.3, 2), h)


def outdoor(scene: Scene, rng) -> None:
    scene.sky, scene.haze_m = True, float(rng.uniform(150, 700))
    scene.add([part(rng, "quad", (400, 400), [0, 0, 0], role="ground", scale=1.5)], group=0)
    ground = Support(np.zeros(2), np.array([200.0, 200.0]), 0.0, 0.0, (0.3, 1.8))
    scene.supports.append(ground)
    for _ in range(VIEWS_PER_SCENE):
        eye = np.append(rng.uniform(-10, 10, 2), rng.uniform(1.2, 2.0) if rng.random() < 0.7 else rng.uniform(2, 10))
        r = rng.random()
        pitch = rng.uniform(-30, 15) if r < 0.7 else rng.uniform(-80, -30) if r < 0.9 else rng.uniform(15, 30)
        fov = rng.uniform(45, 80)
        pitch = min(pitch, fov / 2 - 8)  # looking up, keep the ground in the bottom of the image
        scene.cameras.append(look(eye, rng.uniform(0, 360), pitch, _roll(rng), fov, 0.1, 300.0))
    n_build = int(rng.integers(4, 11))
    for _ in range(n_build * 4):  # buildings on a ring around the cameras, fronts facing the centre
        b = props.building(rng)
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(12, 60)
        xy = dist * np.array([np.cos(ang), np.sin(ang)])
        if n_build > 0 and scene.is_free(xy, 0.0, b, 3.0):
            scene.place(b, xy, 0.0, ang - np.pi / 2 + rng.normal(0, 0.2))
            n_build -= 1
    n_struct = int(rng.integers(8, 19))
    for i in range(n_struct * 4):  # trees, lamp posts, fences, cars, benches in front of the cameras
        cam = scene.cameras[i % len(scene.cameras)]
        fwd = cam.R[:, 2][:2] / max(np.linalg.norm(cam.R[:, 2][:2]), 1e-6)
        ang = np.arctan2(fwd[1], fwd[0]) + rng.uniform(-0.6, 0.6)
        xy = cam.eye[:2] + rng.uniform(3, 30) * np.array([np.cos(ang), np.sin(ang)])
        prop = props.OUTDOOR[int(rng.integers(len(props.OUTDOOR)))](rng)
        if n_struct > 0 and scene.is_free(xy, 0.0, prop, 1.0):
            scene.place(prop, xy, 0.0, rng.uniform(0, 2 * np.pi))
            n_struct -= 1
    _drop_clutter(scene, rng, int(rng.integers(15, 36)), max_dist=40.0)
    _near_occluders(scene, rng, 0.3, (0.6, 3.0), 5.0)


BUILDERS = {"room": room, "tabletop": tabletop, "outdoor": outdoor}


def build_scene(scene_seed: int, kind: str | None = None) -> Scene:
    """The scene with this seed (and kind, drawn from the seed when None): a pure function."""
    kind_rng = np.random.default_rng([scene_seed, 7])
    kind = kind or str(kind_rng.choice(KINDS, p=KIND_WEIGHTS))
    if kind not in BUILDERS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    rng = np.random.default_rng([scene_seed, KINDS.index(kind)])
    scene = Scene(kind, scene_seed)
    with props.palette(rng):
        BUILDERS[kind](scene, rng)
    return scene
