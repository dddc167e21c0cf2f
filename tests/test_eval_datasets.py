"""pipeline/datasets: every evaluation format on a tiny fixture written in its exact layout."""

import csv
import io
import pickle
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import EvalDataset, EvalSample, open_dataset

REALEVAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "realeval"


def _png16(path: Path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint16)).save(path)


def _rgb(path: Path, h: int, w: int, marker=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((h, w, 3), np.uint8)
    if marker is not None:
        img[marker] = (255, 0, 0)
    Image.fromarray(img).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def _split(path: Path, rows) -> None:
    path.write_text("".join(" ".join(r) + "\n" for r in rows))


# -- realeval ----------------------------------------------------------------------------------
def test_realeval_real_data_loads_all_15():
    ds = open_dataset(f"realeval:{REALEVAL}")
    with open(REALEVAL / "manifest.csv", newline="") as f:
        manifest = {r["id"]: r for r in csv.DictReader(f)}
    assert len(ds) == 15 and ds.skipped == 0
    seen = set()
    for s in ds:
        row = manifest[s.id]
        seen.add(s.id)
        assert s.gt_type == row["gt_type"] and s.family == row["group_family"]
        assert s.rgb.shape == (int(row["height"]), int(row["width"]), 3) and s.rgb.dtype == np.uint8
        gt = np.load(REALEVAL / row["gt_path"])
        np.testing.assert_array_equal(s.gt, gt)
        np.testing.assert_array_equal(s.valid, gt > 0)
        assert s.valid.mean() == pytest.approx(float(row["valid_fraction"]), abs=1e-4)
    assert seen == set(manifest)
    assert {s.gt_type for s in ds} == {"depth", "disparity"}


def test_realeval_through_fsspec_memory():
    fs = fsspec.filesystem("memory")
    root = "memory://evalsets/realeval_fixture"
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 3, 3), 7, np.uint8)).save(buf, format="PNG")
    fs.pipe(f"{root}/rgb/a.png", buf.getvalue())
    gt = np.array([[0.0, 2.0, 3.0], [4.0, 0.0, 6.0]], np.float32)
    npy = io.BytesIO()
    np.save(npy, gt)
    fs.pipe(f"{root}/gt/a.npy", npy.getvalue())
    fs.pipe(f"{root}/manifest.csv", b"id,rgb_path,gt_path,gt_type,group_family\na,rgb/a.png,gt/a.npy,disparity,midd\n")
    (s,) = list(open_dataset(f"realeval:{root}"))
    assert s.gt_type == "disparity" and s.family == "midd" and s.rgb[0, 0, 0] == 7
    np.testing.assert_array_equal(s.valid, [[False, True, True], [True, False, True]])


# -- NYUv2 -------------------------------------------------------------------------------------
def _nyu_fixture(root: Path) -> None:
    depth = np.zeros((480, 640), np.uint16)
    depth[45, 41] = 2000      # 2 m, first row/col inside the Eigen crop → valid
    depth[44, 41] = 2000      # row 44: outside the crop
    depth[45, 40] = 2000      # col 40: outside
    depth[470, 600] = 3000    # last row/col inside
    depth[471, 600] = 3000    # outside
    depth[100, 100] = 1       # 1 mm = 1e-3 m: not > 1e-3
    depth[200, 200] = 10000   # 10 m: not < 10
    depth[201, 201] = 9999    # 9.999 m: valid
    for scene, idx in (("kitchen_0004", "0001"), ("office_0005", "0009")):
        _png16(root / "test" / scene / f"depth_{idx}.png", depth)
        _png16(root / "test" / scene / f"filled_{idx}.png", np.full((480, 640), 1234))
        _rgb(root / "test" / scene / f"rgb_{idx}.png", 480, 640, marker=(0, 0))
    _split(root / "filename_list_test.txt",
           [[f"test/{s}/rgb_{i}.png", f"test/{s}/depth_{i}.png", f"test/{s}/filled_{i}.png"]
            for s, i in (("kitchen_0004", "0001"), ("office_0005", "0009"))])


def _check_nyu(ds: EvalDataset) -> None:
    assert ds.name == "nyu" and len(ds) == 2 and (ds.min_depth, ds.max_depth) == (1e-3, 10.0)
    s = ds[0]
    assert s.id == "test/kitchen_0004/rgb_0001" and s.family == "nyu" and s.gt_type == "depth"
    assert s.gt[45, 41] == 2.0 and s.gt[470, 600] == 3.0 and s.gt[201, 201] == np.float32(9.999)
    assert s.gt[0, 0] == 0.0  # raw depth, not the filled map (1.234 everywhere)
    assert s.rgb.shape == (480, 640, 3) and tuple(s.rgb[0, 0]) == (255, 0, 0)
    assert set(zip(*np.nonzero(s.valid))) == {(45, 41), (470, 600), (201, 201)}


def test_nyu_layout_and_eigen_crop(tmp_path):
    _nyu_fixture(tmp_path / "nyu_labeled_extracted")
    _check_nyu(open_dataset(f"nyu:{tmp_path / 'nyu_labeled_extracted'}"))
    # the split file itself may be given as PATH
    _check_nyu(open_dataset(f"nyu:{tmp_path / 'nyu_labeled_extracted' / 'filename_list_test.txt'}"))


def test_nyu_from_marigold_tar(tmp_path):
    src = tmp_path / "src"
    _nyu_fixture(src)
    tar_path = tmp_path / "nyuv2" / "nyu_labeled_extracted.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:  # Marigold's tars store members as ./test/...
        tar.add(src / "test", arcname="./test")
    (src / "filename_list_test.txt").rename(tar_path.parent / "filename_list_test.txt")
    ds = open_dataset(f"nyu:{tar_path}")
    _check_nyu(ds)
    _check_nyu(pickle.loads(pickle.dumps(ds)))


def test_nyu_rejects_other_sizes(tmp_path):
    _png16(tmp_path / "d.png", np.ones((48, 64)))
    _rgb(tmp_path / "r.png", 48, 64)
    _split(tmp_path / "filename_list_test.txt", [["r.png", "d.png", "f.png"]])
    with pytest.raises(ValueError, match="Eigen crop"):
        open_dataset(f"nyu:{tmp_path}")[0]


# -- KITTI -------------------------------------------------------------------------------------
def _kitti_fixture(root: Path) -> None:
    # 375×1242 → KB crop 352×1216 starts at row 23, col 13. Eigen mask on the crop:
    # rows int(0.3324324·352)=117 .. int(0.91351351·352)=321 (excl.), cols 43 .. 1172 (excl.)
    depth = np.zeros((375, 1242), np.uint16)
    for r, c, v in ((117, 43, 5 * 256), (116, 43, 5 * 256), (320, 1171, 256), (321, 1171, 256),
                    (320, 1172, 256), (130, 500, 20479), (131, 500, 20480), (0, 0, 256)):
        depth[23 + r, 13 + c] = v
    depth[0, 0] = 256 * 7  # above the KB crop: dropped
    for d in ("2011_09_26_drive_0002_sync", "2011_09_26_drive_0009_sync"):
        _png16(root / d / "proj_depth/groundtruth/image_02/0000000069.png", depth)
        _rgb(root / "2011_09_26" / d / "image_02/data/0000000069.png", 375, 1242, marker=(23, 13))
    rows = [[f"2011_09_26/{d}/image_02/data/0000000069.png",
             f"{d}/proj_depth/groundtruth/image_02/0000000069.png", "721.5377"]
            for d in ("2011_09_26_drive_0002_sync", "2011_09_26_drive_0009_sync")]
    rows.insert(1, ["2011_09_26/2011_09_26_drive_0005_sync/image_02/data/0000000001.png", "None", "721.5377"])
    _split(root / "eigen_test_files_with_gt.txt", rows)


def test_kitti_kb_crop_eigen_mask_and_skipped_rows(tmp_path):
    _kitti_fixture(tmp_path)
    ds = open_dataset(f"kitti:{tmp_path}")
    assert len(ds) == 2 and ds.skipped == 1 and (ds.min_depth, ds.max_depth) == (1e-5, 80.0)
    s = ds[1]
    assert s.id == "2011_09_26/2011_09_26_drive_0009_sync/image_02/data/0000000069"
    assert s.gt.shape == (352, 1216) and s.rgb.shape == (352, 1216, 3) and tuple(s.rgb[0, 0]) == (255, 0, 0)
    assert s.gt[117, 43] == 5.0 and s.gt[116, 43] == 5.0 and s.gt[0, 0] == 1.0
    assert s.gt[130, 500] == np.float32(20479 / 256) and s.gt[131, 500] == 80.0
    assert set(zip(*np.nonzero(s.valid))) == {(117, 43), (320, 1171), (130, 500)}
    garg = open_dataset(f"kitti:{tmp_path}", mask="garg")[0]  # rows 143 .. 349
    assert set(zip(*np.nonzero(garg.valid))) == {(320, 1171), (321, 1171)}
    assert set(zip(*np.nonzero(open_dataset(f"kitti:{tmp_path}", mask=None)[0].valid))) == {
        (117, 43), (116, 43), (320, 1171), (321, 1171), (320, 1172), (130, 500), (0, 0)}


# -- ETH3D -------------------------------------------------------------------------------------
def test_eth3d_raw_float_binary(tmp_path):
    depth = np.zeros((6, 8), "<f4")
    depth[0, 0], depth[1, 1], depth[2, 2], depth[3, 3] = np.inf, 1e-6, 3.5, 1234.5
    for name in ("DSC_0219", "DSC_0220"):
        rel = f"office_dslr_depth/office/ground_truth_depth/dslr_images/{name}.JPG"
        (tmp_path / "depth" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "depth" / rel).write_bytes(depth.tobytes())
        _rgb(tmp_path / "rgb/office/images/dslr_images" / f"{name}.JPG", 6, 8)
    _split(tmp_path / "eth3d_filename_list.txt",
           [[f"rgb/office/images/dslr_images/{n}.JPG", f"depth/office_dslr_depth/office/ground_truth_depth/dslr_images/{n}.JPG"]
            for n in ("DSC_0219", "DSC_0220")])
    ds = open_dataset(f"eth3d:{tmp_path}")
    assert len(ds) == 2 and ds.max_depth == float("inf")
    s = ds[0]
    assert s.gt[0, 0] == 0.0 and s.gt[2, 2] == 3.5 and s.gt[3, 3] == np.float32(1234.5)
    assert set(zip(*np.nonzero(s.valid))) == {(2, 2), (3, 3)}
    (tmp_path / "depth/office_dslr_depth/office/ground_truth_depth/dslr_images/DSC_0220.JPG").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="expected 6x8"):
        ds[1]


# -- ScanNet -----------------------------------------------------------------------------------
def test_scannet_png_mm(tmp_path):
    depth = np.array([[0, 1, 2], [500, 9999, 10000]], np.uint16)
    for scene in ("scene0406_02", "scene0088_02"):
        _png16(tmp_path / scene / "depth/000300.png", depth)
        _rgb(tmp_path / scene / "color/000300.jpg", 2, 3)
    _split(tmp_path / "scannet_val_sampled_list_800_1.txt",
           [[f"{s}/color/000300.jpg", f"{s}/depth/000300.png"] for s in ("scene0406_02", "scene0088_02")])
    ds = open_dataset(f"scannet:{tmp_path}")
    assert len(ds) == 2 and (ds.min_depth, ds.max_depth) == (1e-3, 10.0)
    s = ds[1]
    assert s.id == "scene0088_02/color/000300" and s.family == "scannet"
    np.testing.assert_array_equal(s.gt, np.array([[0, 0.001, 0.002], [0.5, 9.999, 10.0]], np.float32))
    np.testing.assert_array_equal(s.valid, [[False, False, True], [True, True, False]])


# -- DIODE -------------------------------------------------------------------------------------
def test_diode_npy_and_mask(tmp_path):
    base = "indoors/scene_00021/scan_00189/00021_00189_indoors_200_010"
    (tmp_path / base).parent.mkdir(parents=True)
    depth = np.array([[0.5, 2.0, 2.0], [400.0, 349.0, 0.0]], np.float32)[..., None]  # H×W×1 as released
    mask = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
    np.save(tmp_path / f"{base}_depth.npy", depth)
    np.save(tmp_path / f"{base}_depth_mask.npy", mask)
    _rgb(tmp_path / f"{base}.png", 2, 3)
    _split(tmp_path / "diode_val_all_filename_list.txt", [[f"{base}.png", f"{base}_depth.npy", f"{base}_depth_mask.npy"]])
    (s,) = list(open_dataset(f"diode:{tmp_path}"))
    assert (s.gt.shape, s.gt[1, 1]) == ((2, 3), 349.0)
    np.testing.assert_array_equal(s.valid, [[False, False, True], [False, True, False]])


# -- folder ------------------------------------------------------------------------------------
def test_folder_pairs_units_and_families(tmp_path):
    _rgb(tmp_path / "kitchen" / "a.jpg", 2, 2)
    np.save(tmp_path / "kitchen" / "a.npy", np.array([[1.5, 0.0], [np.nan, 2.0]], np.float32))
    _rgb(tmp_path / "street" / "deep" / "b.png", 2, 2)              # 8-bit PNG image …
    _png16(tmp_path / "street" / "deep" / "b_gt.png", np.ones((2, 2)))  # (different stem: not a pair)
    np.save(tmp_path / "street" / "deep" / "b.npy", np.full((2, 2), 30.0, np.float32))
    _rgb(tmp_path / "c.jpg", 2, 2)
    _png16(tmp_path / "c.png", [[1000, 0], [2500, 65535]])           # … and a 16-bit PNG GT in mm
    _rgb(tmp_path / "orphan.jpg", 2, 2)
    ds = open_dataset(f"folder:{tmp_path}")
    assert ds.skipped == 2  # orphan.jpg, b_gt.png
    by_id = {s.id: s for s in ds}
    assert set(by_id) == {"c", "kitchen/a", "street/deep/b"}
    a, b, c = by_id["kitchen/a"], by_id["street/deep/b"], by_id["c"]
    assert (a.family, b.family, c.family) == ("kitchen", "street", tmp_path.name)
    np.testing.assert_array_equal(a.gt, np.array([[1.5, 0.0], [0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(a.valid, [[True, False], [False, True]])
    np.testing.assert_array_equal(c.gt, np.array([[1.0, 0.0], [2.5, 65.535]], np.float32))
    assert b.valid.all() and b.rgb.shape == (2, 2, 3)


# -- spec and record ---------------------------------------------------------------------------
def test_spec_errors_and_record_validation():
    for bad in ("bogus:/x", "nyu", "nyu:"):
        with pytest.raises(ValueError, match="kind:PATH"):
            open_dataset(bad)
    ok = {"id": "x", "rgb": np.zeros((2, 2, 3), np.uint8), "gt": np.zeros((2, 2), np.float32), "gt_type": "depth",
              "valid": np.zeros((2, 2), bool), "family": "f"}
    EvalSample(**ok)
    for key, bad in (("gt_type", "meters"), ("gt", np.zeros((2, 2))), ("valid", np.zeros((2, 3), bool)),
                     ("rgb", np.zeros((2, 2), np.uint8))):
        with pytest.raises(ValueError):
            EvalSample(**{**ok, key: bad})
