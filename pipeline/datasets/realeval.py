"""The project's small real-photograph set: `manifest.csv` + `rgb/<id>.png` + `gt/<id>.npy`.

15 photos from Kinect, RealSense, KITTI LiDAR and Middlebury/KITTI-2015 stereo, the only real GT the
project evaluates on. GT is float32 depth in metres or stereo disparity in pixels (`gt_type` column),
0 = no measurement, so `valid = gt > 0`; no crop or range is applied. `family` is `group_family`, the unit
averaged over first. Use it for zero-shot evaluation only, never for training or tuning.
"""

from __future__ import annotations

import csv
import functools

import fsspec
import numpy as np

from pipeline.datasets.evalbase import EvalDataset, EvalSample, join, read_npy, read_rgb


def _load(root: str, row: dict) -> EvalSample:
    gt = np.asarray(read_npy(join(root, row["gt_path"])), dtype=np.float32)
    valid = np.isfinite(gt) & (gt > 0)
    return EvalSample(id=row["id"], rgb=read_rgb(join(root, row["rgb_path"])), gt=np.where(valid, gt, 0.0)
                      .astype(np.float32), gt_type=row["gt_type"], valid=valid, family=row["group_family"])


def open_realeval(path: str, manifest: str = "manifest.csv") -> EvalDataset:
    """All rows of `PATH/manifest.csv` (columns id, rgb_path, gt_path, gt_type, group_family, …)."""
    root = path.rstrip("/")
    with fsspec.open(join(root, manifest), "rt", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {"id", "rgb_path", "gt_path", "gt_type", "group_family"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{join(root, manifest)}: missing columns {sorted(missing)}")
    return EvalDataset("realeval", rows, functools.partial(_load, root), 0.0, float("inf"))
