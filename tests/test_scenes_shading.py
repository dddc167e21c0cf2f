"""Shadow mapping and ambient occlusion of rendered scenes, checked against hand-computed geometry."""

from __future__ import annotations

import numpy as np

from scenes import render, shading
from scenes.layouts import Scene, look
from scenes.props import Part

SIZE = 128


def _scene_with_floating_box() -> Scene:
    """A 20 m floor and a 1 m cube whose bottom is 0.5 m above it, seen straight from above."""
    scene = Scene("outdoor", 0)
    eye = np.eye(3)
    scene.add([Part("quad", (20.0, 20.0), np.zeros(3), eye, "noise:0", (0.8, 0.8, 0.8), 1.0)], group=0)
    scene.add([Part("box", (0.5, 0.5, 0.5), np.array([0.0, 0.0, 1.0]), eye, "wood:0", (1.0, 1.0, 1.0), 0.5)])
    scene.cameras = [look([0.0, 0.0, 6.0], 0.0, -89.9, 0.0, 60.0, 0.1, 50.0)]
    return scene


def test_sun_shadow_falls_where_geometry_says():
    scene = _scene_with_floating_box()
    cam = scene.cameras[0]
    to_light = np.array([1.0, 0.0, 1.0]) / np.sqrt(2)  # sun at 45 degrees towards +x
    with render._Client(scene) as client:
        _, depth, groups = client.render(cam, SIZE, {})
        K = render.intrinsics(cam.fov_deg, SIZE)
        points = shading.camera_points(depth, K, cam)
        valid = depth > 0
        light_cam = shading.sun_camera(points[valid], to_light)
        _, light_depth, _ = client.render(light_cam, 160, {})
    mask = shading.shadow_mask(points, valid, light_cam, light_depth)
    floor = groups == 0
    x, y = points[..., 0], points[..., 1]
    # a point at height h of the cube shades the floor at x - h: the shadow spans x in [-2, 0], |y| <= 0.5
    inside = floor & (x > -1.85) & (x < -0.65) & (np.abs(y) < 0.4)
    outside = floor & ((x > 0.75) | (x < -2.3) | (np.abs(y) > 0.75))
    assert inside.sum() > 50 and outside.sum() > 1000
    assert mask[inside].mean() > 0.9
    assert mask[outside].mean() < 0.02


def test_ambient_occlusion_leaves_open_floor_alone_and_darkens_corners():
    depth_plane = np.tile(np.linspace(2.0, 6.0, SIZE)[:, None], (1, SIZE))  # a tilted plane
    ao = shading.ambient_occlusion(depth_plane)
    assert ao[8:-8, 8:-8].min() > 0.97
    step = depth_plane.copy()
    step[:, : SIZE // 2] *= 0.5  # a near object beside the plane: the plane next to it is occluded
    ao_step = shading.ambient_occlusion(step)
    assert ao_step[40:80, SIZE // 2 + 1 : SIZE // 2 + 3].mean() < 0.9
    assert ao_step[40:80, SIZE - 20 : SIZE - 10].min() > 0.97


def test_box_mean_matches_a_direct_window_sum():
    a = np.random.default_rng(0).random((20, 17))
    got = shading.box_mean(a, 5)
    padded = np.pad(a, 2)
    want = np.array([[padded[i : i + 5, j : j + 5].sum() / 25 for j in range(17)] for i in range(20)])
    np.testing.assert_allclose(got, want)
