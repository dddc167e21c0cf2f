"""Tests for the rendered-scene generator: exact depth, determinism, variety, texture provenance, files."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from scenes import layouts, meshes, render, textures
from scenes.bullet_args import QUANTUM, ArgPool

# one view of 20 different scenes (scene = seed // 4), cameras cycling 0..3
VARIETY_SEEDS = [4 * i + i % 4 for i in range(20)]


@pytest.fixture(scope="module")
def variety_views():
    return list(render.render_views(VARIETY_SEEDS, size=96))


def _floor_residuals(view: render.View) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of back-projected floor pixels to the known floor plane, and their depths."""
    mask = view.floor_mask & (view.depth > 0)
    v, u = np.nonzero(mask)
    z = view.depth[mask].astype(np.float64)
    K = view.K
    X = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
    n, d = view.floor
    return X @ n + d, z


@pytest.mark.parametrize("kind,seed", [("room", 2), ("tabletop", 9), ("outdoor", 13)])
def test_floor_pixels_back_project_onto_the_floor_plane(kind, seed):
    hits = 0
    for s in range(4 * seed, 4 * seed + 4):  # the four cameras of one scene; some may not see the floor
        view = render.render_view(s, kind=kind)
        assert view.kind == kind
        res, z = _floor_residuals(view)
        if len(z) < 200:
            continue
        hits += 1
        # measured error is ~1e-5 of depth; a half-pixel error in K gives ~3e-3, so this tolerance bites
        assert np.all(np.abs(res) < 0.002 + 5e-4 * z), (s, np.abs(res).max())
    assert hits >= 1


def test_floor_plane_holds_with_supersampling():
    view = render.render_view(8, size=96, supersample=2)
    res, z = _floor_residuals(view)
    assert len(z) > 100
    assert np.all(np.abs(res) < 0.002 + 5e-4 * z)


def test_intrinsics_principal_point_is_calibrated():
    """The textbook centre (W-1)/2 misplaces floor points; our K must beat it by a wide margin."""
    view = render.render_view(8, size=128)
    res, _ = _floor_residuals(view)
    textbook = dataclasses.replace(view, K=view.K.copy())
    textbook.K[:2, 2] = (128 - 1) / 2
    res_textbook, _ = _floor_residuals(textbook)
    assert np.abs(res).mean() * 20 < np.abs(res_textbook).mean()


def test_same_seed_same_view_and_batch_equals_single():
    a = render.render_view(5, size=96)
    b = render.render_view(5, size=96)
    batch = list(render.render_views([4, 5, 6], size=96))
    assert [v.seed for v in batch] == [4, 5, 6]
    for x in (b, batch[1]):
        np.testing.assert_array_equal(a.rgb, x.rgb)
        np.testing.assert_array_equal(a.depth, x.depth)
        np.testing.assert_array_equal(a.K, x.K)


def test_different_seeds_differ():
    a, b, c = (render.render_view(s, size=96) for s in (4, 5, 40))
    assert not np.array_equal(a.rgb, b.rgb)  # other camera, same scene
    assert not np.array_equal(a.depth, c.depth)  # other scene
    assert a.textures == b.textures


def test_two_processes_match_one():
    seeds = [3, 4, 5, 17]
    one = list(render.render_views(seeds, size=64, processes=1))
    two = list(render.render_views(seeds, size=64, processes=2))
    assert [v.seed for v in two] == seeds
    for x, y in zip(one, two):
        np.testing.assert_array_equal(x.rgb, y.rgb)
        np.testing.assert_array_equal(x.depth, y.depth)


def test_kind_is_honoured_and_validated():
    assert render.render_view(0, size=64, kind="outdoor").kind == "outdoor"
    with pytest.raises(ValueError):
        layouts.build_scene(0, "underwater")


def test_variety_over_twenty_scenes(variety_views):
    kinds = {v.kind for v in variety_views}
    assert kinds == {"room", "tabletop", "outdoor"}
    for v in variety_views:
        valid = v.depth[v.depth > 0]
        assert valid.size > 0.3 * v.depth.size
        assert valid.min() > 0.01
        if v.kind == "room":
            assert valid.max() < 12.0  # rooms are at most 8 x 8 x 3.2 m
        if v.kind == "tabletop":
            assert np.median(valid) < 3.0
    outdoor_far = [v.depth.max() for v in variety_views if v.kind == "outdoor"]
    assert max(outdoor_far) > 20.0
    assert np.mean([v.n_objects for v in variety_views]) >= 10


def test_camera_angles_cover_the_specified_ranges():
    cams = [c for s in range(40) for c in layouts.build_scene(s).cameras]
    pitch = np.degrees(np.arcsin(np.array([c.R[2, 2] for c in cams])))
    roll = np.degrees(np.arctan2(np.array([-c.R[2, 0] for c in cams]), np.array([-c.R[2, 1] for c in cams])))
    assert pitch.min() >= -89 and pitch.max() <= 30.5
    assert pitch.min() < -65  # top-down tabletop views exist
    assert pitch.max() > 10
    assert np.abs(roll).max() <= 20.5 and np.abs(roll).max() > 12


def test_textures_never_use_evaluation_material(variety_views):
    sources = textures.texture_sources()
    assert "stereo_motorcycle" not in sources
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera", "brick"} <= set(sources)
    assert {"checker", "noise", "stripes", "wood"} <= set(sources)
    names = {t.name for t in textures.texture_bank()}
    for v in variety_views:
        assert set(v.textures) <= names
        assert not any("motorcycle" in t for t in v.textures)
    with pytest.raises(ValueError):
        textures.load_photo("stereo_motorcycle")


def test_augmentation_changes_rgb_only():
    clean = render.render_view(6, size=96)
    aug = render.render_view(6, size=96, augment=True)
    aug2 = render.render_view(6, size=96, augment=True)
    np.testing.assert_array_equal(clean.depth, aug.depth)
    np.testing.assert_array_equal(aug.rgb, aug2.rgb)
    assert aug.rgb.shape == clean.rgb.shape and aug.rgb.dtype == np.uint8
    changed = [not np.array_equal(render.render_view(s, size=64, augment=True).rgb,
                                  render.render_view(s, size=64).rgb) for s in (0, 1, 2)]
    assert any(changed)


@pytest.mark.parametrize("shape,size", [("box", (0.3, 0.2, 0.1)), ("sphere", (0.2,)), ("ellipsoid", (0.3, 0.2, 0.1)),
                                        ("cylinder", (0.1, 0.5)), ("cone", (0.2, 0.3)), ("capsule", (0.1, 0.4)),
                                        ("torus", (0.3, 0.05))])
def test_mesh_winding_matches_outward_normals(shape, size):
    m = meshes.make(shape, size, tile=0.25)
    tri = m.vertices[m.indices.reshape(-1, 3)]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(face_n, axis=1)
    keep = area > 1e-9  # degenerate triangles at poles and cone tips carry no orientation
    vertex_n = m.normals[m.indices.reshape(-1, 3)].mean(axis=1)
    assert np.all((face_n[keep] * vertex_n[keep]).sum(1) > 0)
    assert np.isclose(meshes.half_height(shape, size), m.vertices[:, 2].max(), rtol=0.06)  # polygonal approximation


def test_uvs_are_metric():
    """A texture repeats every `tile` metres whatever the face size: density falls with distance."""
    big, small = meshes.box((2.0, 1.0, 0.5), tile=0.5), meshes.box((0.2, 0.1, 0.05), tile=0.5)
    assert np.ptp(big.uvs[:, 0]) == pytest.approx(8.0)
    assert np.ptp(small.uvs[:, 0]) == pytest.approx(0.8)


def test_arg_pool_reuses_objects_and_keeps_values():
    pool = ArgPool()
    a = np.random.default_rng(0).normal(size=(50, 3))
    rows = pool.rows("v", a)
    np.testing.assert_allclose(np.array(rows), a, atol=QUANTUM)
    first_row, first_value = rows[0], rows[0][0]
    rows2 = pool.rows("v", a * 0 + a[:1])
    assert rows2[0] is first_row  # same list objects, overwritten in place
    assert rows2[0][0] is first_value  # same interned float object
    assert pool.ints(np.array([3, 300, 3])) == [3, 300, 3]


def test_grey_photo_flags_match_pixels():
    for t in textures.texture_bank():
        if t.name.startswith("photo:"):
            img = textures.texture_image(t.name).astype(np.int16)
            assert (np.abs(img - img.mean(axis=2, keepdims=True)).mean() < 2) == t.grey, t.name


@pytest.mark.slow
def test_scene_builds_do_not_leak_megabytes():
    """pybullet keeps every mesh argument alive; bullet_args must keep that from growing ~5 MB/scene."""

    def rss_kb() -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])

    built = [layouts.build_scene(s) for s in range(500, 560)]
    for scene in built[:20]:  # warm-up: caches and allocator pools
        render._Client(scene).__exit__()
    before = rss_kb()
    for scene in built[20:]:
        render._Client(scene).__exit__()
    assert (rss_kb() - before) / 40 < 2000


def test_meshes_split_over_several_multibodies_render_the_same(monkeypatch):
    """pybullet caps links per multibody; splitting the scene's meshes must not change any output."""
    whole = render.render_view(21, size=64)
    monkeypatch.setattr(render, "LINKS_PER_BODY", 7)
    split = render.render_view(21, size=64)
    np.testing.assert_array_equal(whole.rgb, split.rgb)
    np.testing.assert_array_equal(whole.depth, split.depth)
    np.testing.assert_array_equal(whole.floor_mask, split.floor_mask)
    assert whole.n_objects == split.n_objects > 0


# -- the render memo (pipeline/datasets/generated.py) -------------------------------------------

def test_render_memo_returns_the_renderers_exact_views_and_survives_corruption(tmp_path, monkeypatch):
    from pipeline.datasets import generated

    monkeypatch.setenv("DAD_RENDER_CACHE", str(tmp_path))
    seeds = [40, 41, 47]
    first = generated.rendered(seeds, 48)
    for s, (rgb, depth, kind) in zip(seeds, first):
        v = render.render_view(s, size=48)
        assert np.array_equal(rgb, v.rgb) and np.array_equal(depth, v.depth.astype(np.float32)) and kind == v.kind
    folder = tmp_path / generated.renderer_fingerprint()
    assert sorted(os.listdir(folder)) == ["48-40.npz", "48-41.npz", "48-47.npz"]

    def no_render(seeds, size):  # the second call must come from the memo
        assert not list(seeds), "rendered again despite the memo"
        return iter(())

    monkeypatch.setattr(render, "render_views", no_render)
    again = generated.rendered(seeds, 48)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    monkeypatch.undo()
    monkeypatch.setenv("DAD_RENDER_CACHE", str(tmp_path))
    (folder / "48-41.npz").write_bytes(b"half a file")  # corrupt entry: rendered again, and replaced
    fixed = generated.rendered([41], 48)[0]
    assert np.array_equal(fixed[0], first[1][0]) and np.load(folder / "48-41.npz")["rgb"].shape == (48, 48, 3)


def test_render_memo_can_be_switched_off(monkeypatch):
    from pipeline.datasets import generated

    monkeypatch.setenv("DAD_RENDER_CACHE", "off")
    assert generated.render_cache_dir() is None
    rgb, _, _ = generated.rendered([5], 32)[0]
    assert np.array_equal(rgb, render.render_view(5, size=32).rgb)
