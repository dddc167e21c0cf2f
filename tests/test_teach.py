"""The teach stage: cache layout, geometry of local targets, adding/changing teachers, kill -9, CLI."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from teach_fixtures import alive, descendants, subprocess_env, tiny_hf_models, tree_hashes

from bench.kit.configs import dad_config
from bench.kit.images import write_ramps
from bench.kit.teach import cache_arrays
from pipeline.cache import ARRAYS, as_disparity, open_cache
from pipeline.config import ConfigError
from pipeline.corpus import manifest
from pipeline.crops import global_input, local_inputs
from pipeline.ledger import Ledger
from pipeline.storage import Root
from stages import shard, teach
from stages.teachers import build_teacher, lineage_for, spec_for

PX = {"adapter": "pixel", "model": "r+2g"}
DAD = str(Path(sys.executable).with_name("dad"))


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """5 colour-ramp PNGs of three sizes → 3 corpus shards of 2, 2 and 1 samples."""
    return write_ramps(tmp_path_factory.mktemp("ramps"), 5)


def sharded(tmp_path, ramps, teachers, name="root", **kw):
    cfg = dad_config(tmp_path / name, ramps, teachers, preset="teach", **kw)
    shard.run(cfg)
    return cfg


def rows_of(cfg) -> list[dict]:
    return manifest(Root(cfg.run.root)).to_pylist()


# -- layout ---------------------------------------------------------------------------------------

def test_cache_layout_shapes_grid_and_attributes(tmp_path, ramps):
    cfg = sharded(tmp_path, ramps, {"px": {**PX, "license": "CC0-1.0"}})
    summary = teach.run(cfg)
    assert (summary["cells"], summary["samples"], summary["skipped"], summary["invalid_px"]) == (3, 5, 0, 0)
    root = Root(cfg.run.root)
    group = open_cache(root, "px")
    n, g, k, l = 3 * 2, 56, 4, 28
    expect = {"global": ((n, g, g), np.float16), "local": ((n, k, l, l), np.float16),
              "global_valid": ((n, g, g), np.bool_), "local_valid": ((n, k, l, l), np.bool_)}
    assert set(group.array_keys()) == set(ARRAYS)
    for name, (shape, dtype) in expect.items():
        arr = group[name]
        assert arr.shape == shape and arr.dtype == dtype, name
        assert arr.chunks == (1, *shape[1:]), name            # one sample per inner chunk
        assert arr.shards == (2, *shape[1:]), name            # one corpus shard per Zarr shard
        # exactly one shard object per corpus shard: c/<shard>/0/0[/0]
        files = sorted(str(p.relative_to(tmp_path / "root" / "cache" / "px" / name))
                       for p in (tmp_path / "root" / "cache" / "px" / name / "c").rglob("*") if p.is_file())
        assert files == [f"c/{s}/" + "/".join(["0"] * (len(shape) - 1)) for s in range(3)], name

    spec = spec_for("px", cfg.teachers["px"])
    fp = lineage_for(cfg).teach("px")
    attrs = group.attrs.asdict()
    assert attrs["teacher"] == spec.as_attrs()
    assert (attrs["output_space"], attrs["license"], attrs["fingerprint"], attrs["shard_size"]) == (
        "disparity", "CC0-1.0", fp, 2)
    assert attrs["crops"] == cfg.crops.model_dump()
    ledger = Ledger(root)
    assert ledger.done("teach", "px", fp) == {"000000", "000001", "000002"}
    assert [ledger.info("teach", "px", f"{s:06d}", fp)["samples"] for s in range(3)] == [2, 2, 1]

    # slot = manifest row; the padding slot of the short last shard is empty and invalid
    arrays = cache_arrays(root, "px")
    assert sorted(r["row"] for r in rows_of(cfg)) == [0, 1, 2, 3, 4]
    assert arrays["global_valid"][:5].all() and arrays["local_valid"][:5].all()
    assert not arrays["global_valid"][5].any() and np.isnan(arrays["global"][5]).all()
    assert not arrays["local_valid"][5].any() and np.isnan(arrays["local"][5]).all()

    again = teach.run(cfg)
    assert (again["cells"], again["skipped"]) == (0, 3)


# -- geometry: a teacher that is a known function of the pixels ------------------------------------

def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample img (H,W) at pixel coordinates (pixel centres at integers), edges clamped."""
    h, w = img.shape
    y, x = np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = y - y0, x - x0
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def _truth(src: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1 + R + 2G of a ramp image at continuous source coordinates (R depends on x only, G on y only)."""
    return (1 + np.interp(x, np.arange(src.shape[1]), src[0, :, 0]) / 255
            + 2 * np.interp(y, np.arange(src.shape[0]), src[:, 0, 1]) / 255)


def _centres(start: float, length: float, n: int) -> np.ndarray:
    """Continuous pixel coordinates of n output pixels covering [start, start+length) (centres at +0.5)."""
    return start + (np.arange(n) + 0.5) * length / n - 0.5


def test_local_predictions_line_up_with_boxes_and_global(tmp_path, ramps):
    cfg = sharded(tmp_path, ramps, {"px": PX})
    teach.run(cfg)
    arrays = cache_arrays(cfg.run.root, "px")
    G, L, B = cfg.crops.global_size, cfg.crops.local_store, 2  # B: border px where edge clamping may bias
    inner_g, inner_l = slice(B, G - B), slice(B, L - B)
    worst = {"global": 0.0, "local": 0.0, "cross": 0.0}
    for row in rows_of(cfg):
        src = np.asarray(Image.open(row["source_uri"]).convert("RGB")).astype(np.float64)
        truth = partial(_truth, src)
        x0, y0, s = row["region_x0"], row["region_y0"], row["region_side"]
        assert row["stored_side"] == s
        glob = arrays["global"][row["row"]].astype(np.float64)
        gy, gx = np.meshgrid(_centres(y0, s, G), _centres(x0, s, G), indexing="ij")
        err = np.abs(glob - truth(gy, gx))
        worst["global"] = max(worst["global"], err[inner_g, inner_g].max())
        assert err.mean() < 0.004

        for k, (fx0, fy0, fx1, fy1) in enumerate(row["boxes"]):
            bx0, by0, side = fx0 * s, fy0 * s, (fx1 - fx0) * s
            assert abs((fy1 - fy0) * s - side) < 1e-9 and abs(side - row["patch"]) < 1e-9
            local = arrays["local"][row["row"], k].astype(np.float64)
            ly, lx = np.meshgrid(_centres(y0 + by0, side, L), _centres(x0 + bx0, side, L), indexing="ij")
            err = np.abs(local - truth(ly, lx))
            worst["local"] = max(worst["local"], err[inner_l, inner_l].max())
            assert err.mean() < 0.004
            # the same patch cut from the cached global prediction and resampled to L×L
            cy, cx = np.meshgrid(_centres(by0 * G / s, side * G / s, L), _centres(bx0 * G / s, side * G / s, L),
                                 indexing="ij")
            cut = _bilinear(glob, cy, cx)
            err = np.abs(local - cut)
            worst["cross"] = max(worst["cross"], err[inner_l, inner_l].max())
            assert err.mean() < 0.006
    # Sources are exact integer ramps, so the only errors are: float16 storage (half an ulp: ≤ 0.002 for
    # values ≤ 4) and, on the global path, PIL's uint8 rounding after the bicubic resize (≤ 1.5/255 for
    # 1 + R + 2G). A box off by one pixel costs ≥ 2/255 ≈ 0.008 against the truth; a local resample
    # with the wrong pixel-centre convention (align_corners=True) costs ≈ 0.006.
    assert worst["global"] < 0.008 and worst["local"] < 0.0025 and worst["cross"] < 0.01, worst


def test_invalid_pixels_are_masked_and_counted(tmp_path, ramps):
    cfg = sharded(tmp_path, ramps, {"holey": {"adapter": "teach_fixtures:HoleyTeacher", "model": "holes"}})
    summary = teach.run(cfg)
    arrays = cache_arrays(cfg.run.root, "holey")
    root = Root(cfg.run.root)
    c = cfg.crops
    total_invalid = 0
    for row in rows_of(cfg):
        i = row["row"]
        region = np.asarray(Image.open(io.BytesIO(_region_png(root, row))).convert("RGB"))
        glob_in = global_input(region, c.global_size)
        x = glob_in.astype(np.float32) / np.float32(255)
        expected_valid = ~((x[..., 0] < 0.3) | (x[..., 1] < 0.2) | (x[..., 2] > 0.9))
        assert 0 < expected_valid.sum() < expected_valid.size
        np.testing.assert_array_equal(arrays["global_valid"][i], expected_valid)
        for name in ("global", "local"):
            np.testing.assert_array_equal(arrays[f"{name}_valid"][i], np.isfinite(arrays[name][i]))
            total_invalid += int((~arrays[f"{name}_valid"][i]).sum())
        ok = arrays["global"][i][expected_valid].astype(np.float64)
        assert np.all((ok >= 1) & (ok <= 4))
    assert summary["invalid_px"] == total_invalid > 0


def _region_png(root: Root, row: dict) -> bytes:
    """The stored region of a sample, straight from its shard's tar."""
    import tarfile

    data = root.read_bytes("corpus", "shards", f"{row['shard']:06d}.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile(f"{row['sample_id']}.png").read()


# -- an hf teacher through the stage ------------------------------------------------------------

def test_hf_teacher_through_the_stage_stores_its_predictions(tmp_path, ramps):
    pytest.importorskip("transformers")
    model_dir = tiny_hf_models(tmp_path / "hf", kinds=("da",))["da"]
    cfg = sharded(tmp_path, ramps, {"da": {"adapter": "hf", "model": str(model_dir), "batch_size": 3}})
    teach.run(cfg)
    arrays = cache_arrays(cfg.run.root, "da")
    teacher = build_teacher("da", cfg.teachers["da"])
    root, c = Root(cfg.run.root), cfg.crops
    for row in rows_of(cfg)[:2]:
        region = np.asarray(Image.open(io.BytesIO(_region_png(root, row))).convert("RGB"))
        glob_in, locs = global_input(region, c.global_size), local_inputs(region, row["boxes"], c.patch)
        with torch.no_grad():
            g = teacher.predict(teach.to_tensor([glob_in])).numpy()[0]
            loc = teach.resample(teacher.predict(teach.to_tensor(locs)).numpy(), c.local_store)
        np.testing.assert_allclose(arrays["global"][row["row"]].astype(np.float32), g.astype(np.float16), rtol=2e-3,
                                   atol=1e-3)
        np.testing.assert_allclose(arrays["local"][row["row"]].astype(np.float32), loc.astype(np.float16),
                                   rtol=2e-3, atol=1e-3)


# -- depth-space teachers -----------------------------------------------------------------------

def test_depth_space_teacher_stores_depth_and_converts_exactly(tmp_path, ramps):
    cfg = sharded(tmp_path, ramps, {"disp": PX, "dep": {**PX, "output_space": "depth"},
                                    "metric": {**PX, "output_space": "metric_depth"}})
    teach.run(cfg)
    disp, dep = cache_arrays(cfg.run.root, "disp"), cache_arrays(cfg.run.root, "dep")
    assert open_cache(Root(cfg.run.root), "dep").attrs["output_space"] == "depth"
    assert open_cache(Root(cfg.run.root), "metric").attrs["output_space"] == "metric_depth"
    for name in ARRAYS:  # stored as predicted: same function, same bytes, whatever the declared space
        np.testing.assert_array_equal(disp[name], dep[name])
    stored = dep["global"][:5]
    inv = as_disparity(stored, "depth")
    assert inv.dtype == np.float32
    np.testing.assert_array_equal(inv, np.float32(1) / stored.astype(np.float32))
    assert np.abs(inv * stored.astype(np.float32) - 1).max() <= 2 ** -23
    np.testing.assert_array_equal(as_disparity(stored, "disparity"), stored.astype(np.float32))
    odd = np.array([2.0, 0.0, -1.0, np.nan, np.inf], np.float16)
    np.testing.assert_array_equal(as_disparity(odd, "metric_depth"), np.array([0.5, np.nan, np.nan, np.nan, 0], np.float32))
    with pytest.raises(ConfigError, match="affine"):
        dad_config(tmp_path / "x", ramps, {"aff": {**PX, "output_space": "affine_depth"}}, preset="teach")


# -- adding and changing teachers ---------------------------------------------------------------

def _snapshot(root: Path, teacher: str) -> dict:
    """sha256 and mtime of every file of one teacher: its cache folder and its ledger markers."""
    out = {}
    for sub in (root / "cache" / teacher, root / "ledger" / "teach" / teacher):
        for rel, digest in tree_hashes(sub).items():
            out[f"{sub.name}/{rel}"] = (digest, os.stat(sub / rel).st_mtime_ns)
    return out


def test_adding_a_teacher_leaves_the_others_untouched(tmp_path, ramps):
    cfg = sharded(tmp_path, ramps, {"a": PX})
    teach.run(cfg)
    root = tmp_path / "root"
    before = _snapshot(root, "a")
    assert len(before) > 10
    time.sleep(0.02)  # mtimes would show any rewrite

    both = dad_config(root, ramps, {"a": PX, "b": {"adapter": "pixel", "model": "luma"}}, preset="teach")
    summary = teach.run(both)  # all configured teachers
    assert (summary["cells"], summary["skipped"], summary["samples"]) == (3, 3, 5)
    assert _snapshot(root, "a") == before
    b_before = _snapshot(root, "b")

    three = dad_config(root, ramps, {"a": PX, "b": {"adapter": "pixel", "model": "luma"}, "c": {**PX, "model": "constant"}},
                       preset="teach")
    summary = teach.run(three, teachers=["c"])  # only the new one
    assert (summary["teachers"], summary["cells"]) == (1, 3)
    assert _snapshot(root, "a") == before and _snapshot(root, "b") == b_before
    assert np.all(cache_arrays(root, "c")["global"][:5] == 1)
    a, b = cache_arrays(root, "a"), cache_arrays(root, "b")
    assert not np.allclose(a["global"][:5], b["global"][:5])


def test_changing_one_teacher_redoes_only_it(tmp_path, ramps):
    teachers = {"a": PX, "b": {"adapter": "pixel", "model": "luma"}}
    cfg = sharded(tmp_path, ramps, teachers)
    teach.run(cfg)
    root = tmp_path / "root"
    a_before, b_before = _snapshot(root, "a"), _snapshot(root, "b")
    old_fp = lineage_for(cfg).teach("b")
    time.sleep(0.02)

    changed = dad_config(root, ramps, {"a": PX, "b": {"adapter": "pixel", "model": "constant"}}, preset="teach")
    new_fp = lineage_for(changed).teach("b")
    assert new_fp != old_fp
    assert [r["note"] for r in teach.status(changed, Root(str(root)))] == [
        "complete", "stale: made with other teacher settings: weights, input rule or output space"]
    summary = teach.run(changed)
    assert (summary["cells"], summary["skipped"]) == (3, 3)
    assert _snapshot(root, "a") == a_before
    b_after = _snapshot(root, "b")
    for name in ("global", "local"):
        for s in range(3):
            rel = f"b/{name}/c/{s}/" + "/".join(["0"] * (2 if name == "global" else 3))
            assert b_after[rel][0] != b_before[rel][0], rel  # rewritten with new values
    ledger = Ledger(Root(str(root)))
    assert ledger.done("teach", "b", new_fp) == ledger.done("teach", "b", old_fp) == {"000000", "000001", "000002"}
    assert ledger.done("teach", "a", new_fp) == set()
    assert np.all(cache_arrays(root, "b")["global"][:5] == 1)
    assert open_cache(Root(str(root)), "b").attrs["fingerprint"] == new_fp
    assert [r["note"] for r in teach.status(changed, Root(str(root)))] == ["complete", "complete"]


# -- real Ray: an actor pool gives the same bytes as the inline executor -------------------------

@pytest.mark.timeout(300)
def test_ray_actor_pool_matches_inline(tmp_path, ramps, ray_session):
    ray_cfg = sharded(tmp_path, ramps, {"px": {**PX, "actors": 2, "num_cpus": 0.5, "batch_size": 3}},
                      name="ray", executor="ray")
    inline_cfg = sharded(tmp_path, ramps, {"px": PX}, name="inline")
    summary = teach.run(ray_cfg)
    assert (summary["cells"], summary["samples"]) == (3, 5)
    teach.run(inline_cfg)
    got, want = cache_arrays(ray_cfg.run.root, "px"), cache_arrays(inline_cfg.run.root, "px")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name])
    assert len(Ledger(Root(ray_cfg.run.root)).markers("teach", "px")) == 3


def test_pools_group_teachers_by_what_one_actor_asks_for(tmp_path, ramps):
    half = {**PX, "num_cpus": 0.5, "actors": 2}
    cfg = dad_config(tmp_path / "root", ramps, {"a": half, "b": {**half, "model": "luma"}, "c": {**PX, "num_cpus": 0.5},
                                                "d": {**half, "resources": {"slot": 1}}, "e": {**half, "batch_size": 1},
                                                "f": {**half, "num_gpus": 0.5}}, preset="teach")
    assert teach.pools(cfg, list(cfg.teachers)) == [["a", "b", "e"], ["c"], ["d"], ["f"]]
    assert teach.pools(cfg, ["e", "c", "a"]) == [["e", "a"], ["c"]]  # the order asked for, within and across


@pytest.mark.timeout(300)
def test_teachers_of_one_shape_share_one_ray_actor(tmp_path, ramps, ray_session):
    """One actor serves both teachers, one after the other: the cache is the inline run's, and the second
    teacher pays no process start (every marker names the same process)."""
    teachers = {"px": {**PX, "num_cpus": 0.5}, "luma": {**PX, "model": "luma", "num_cpus": 0.5}}
    ray_cfg = sharded(tmp_path, ramps, teachers, name="ray", executor="ray")
    inline_cfg = sharded(tmp_path, ramps, teachers, name="inline")
    summary = teach.run(ray_cfg)
    assert (summary["cells"], summary["samples"]) == (6, 10) and summary["start_up_s"] > 0
    assert summary["ray_start_s"] == 0  # this process already had Ray (conftest's session): it was not started again
    teach.run(inline_cfg)
    ledger = Ledger(Root(ray_cfg.run.root))
    pids = {t: {ledger.info("teach", t, c, fp)["pid"] for c, fps in ledger.markers("teach", t).items() for fp in fps}
            for t in teachers}
    assert len(pids["px"]) == 1 and pids["px"] == pids["luma"] and os.getpid() not in pids["px"]
    for t in teachers:
        got, want = cache_arrays(ray_cfg.run.root, t), cache_arrays(inline_cfg.run.root, t)
        for name in ARRAYS:
            np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["inline", "ray"])
def test_a_failing_teacher_in_a_shared_pool_is_named_and_the_others_cells_are_kept(tmp_path, ramps, executor,
                                                                                  request):
    if executor == "ray":
        request.getfixturevalue("ray_session")
    teachers = {"px": {**PX, "num_cpus": 0.5},
                "boom": {"adapter": "bench.kit.teach:ExplodingTeacher", "model": "luma", "num_cpus": 0.5}}
    cfg = sharded(tmp_path, ramps, teachers, executor=executor)
    with pytest.raises(RuntimeError) as err:
        teach.run(cfg)
    assert str(err.value).startswith("teacher 'boom' failed (0/3 shards finished and kept): "
                                     "ZeroDivisionError: the teacher's own bug; rerun `dad teach --teacher boom`")
    assert len(Ledger(Root(cfg.run.root)).done("teach", "px", lineage_for(cfg).teach("px"))) == 3


# -- kill -9 mid-stage, rerun: the same cache as an uninterrupted run ----------------------------

@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_mid_stage_then_rerun_gives_identical_cache(tmp_path):
    src = write_ramps(tmp_path / "src", 8)  # 4 shards of 2
    slow = {"adapter": "bench.kit.teach:SlowPixelTeacher", "model": "r+2g@0.6", "batch_size": 8, "num_cpus": 0.5}
    cfg = dad_config(tmp_path / "killed", src, {"slow": slow}, preset="teach", executor="ray")
    shard.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": "inline"})}))
    path = tmp_path / "killed.toml"
    path.write_text(cfg.to_toml())
    markers = tmp_path / "killed" / "ledger" / "teach" / "slow"
    env = subprocess_env()

    proc = subprocess.Popen([DAD, "teach", "-c", str(path)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started: set[int] = set()
    try:
        deadline = time.time() + 300
        while not (markers.is_dir() and any(markers.iterdir())):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no teach marker within 300 s"
            started.update(descendants(proc.pid))
            time.sleep(0.05)
        started.update(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = len(list(markers.iterdir()))
        assert 1 <= at_kill < 4, "the stage must be interrupted mid-way"
    finally:
        # Ray's processes outlive a killed driver for a few seconds (an orphaned actor may finish the
        # shard it holds); wait for them, then end the ones we started that are left.
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in started):
            time.sleep(0.2)
        for p in started:
            if alive(p):
                os.kill(p, signal.SIGKILL)
    done_before = {p.name: p.read_bytes() for p in markers.iterdir()}

    rerun = subprocess.run([DAD, "teach", "-c", str(path)], env=env, capture_output=True, text=True, check=False,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert f"skipped={len(done_before)}" in rerun.stdout and f"cells={4 - len(done_before)}" in rerun.stdout
    done_after = {p.name: p.read_bytes() for p in markers.iterdir()}
    assert len(done_after) == 4
    assert {n: done_after[n] for n in done_before} == done_before  # finished cells were not redone

    clean = dad_config(tmp_path / "clean", src, {"slow": {**slow, "model": "r+2g@0"}}, preset="teach")
    shard.run(clean)
    teach.run(clean)
    got, want = cache_arrays(tmp_path / "killed", "slow"), cache_arrays(tmp_path / "clean", "slow")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name])
    assert sorted(os.listdir(tmp_path / "clean" / "ledger" / "teach" / "slow")) == sorted(done_after)


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_lists_adapters_and_teachers_and_names_missing_teacher(tmp_path, ramps):
    cfg = dad_config(tmp_path / "root", ramps, {"px": {**PX, "license": "CC0-1.0"},
                                                "deep": {**PX, "model": "luma", "output_space": "depth"}},
                     preset="teach")
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    env = {**subprocess_env(), "COLUMNS": "250"}
    listed = subprocess.run([DAD, "teachers", "-c", str(path)], env=env, capture_output=True, text=True, check=False,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for adapter, target in (("hf", "stages.teachers.hf:HFTeacher"), ("checkpoint", "stages.teachers.checkpoint"),
                            ("pixel", "stages.teachers.pixel:PixelTeacher")):
        assert any(adapter in ln and target in ln for ln in lines), listed.stdout
    for name, tcfg in cfg.teachers.items():
        spec = spec_for(name, tcfg)
        row = [ln for ln in lines if f" {name} " in ln and spec.fingerprint in ln]
        assert len(row) == 1, listed.stdout
        assert spec.output_space in row[0] and spec.license in row[0] and "pixel" in row[0]

    missing = subprocess.run([DAD, "teach", "-c", str(path), "--teacher", "nope"], env=env, capture_output=True,
                             text=True, check=False, timeout=120)
    assert missing.returncode == 2
    assert "--teacher nope: not configured (configured: px, deep)" in " ".join(missing.stderr.split())
    assert not (tmp_path / "root").exists()  # refused before anything was written
