"""The five zero-shot benchmarks of the paper (NYUv2, KITTI, ETH3D, ScanNet, DIODE) in Marigold's layout.

Distill Any Depth evaluates on Marigold's test sets, so reading the same files with the same split lists,
GT decoding, depth ranges and crops (`prs-eth/Marigold` `src/dataset/*_dataset.py`, `data_split/*`) is
what makes the numbers comparable. The preprocessed tars come from Marigold's
`script/download_eval_data.sh`; put the split file beside them or pass it as `split_file` or as PATH.
Ranges, crops and splits: docs/evaluation.md.
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.datasets.evalbase import (
    EvalDataset,
    EvalSample,
    join,
    range_mask,
    read_bytes,
    read_npy,
    read_png_depth,
    read_rgb,
    read_split,
    resolve_split,
    strip_ext,
)

NYU_RANGE, KITTI_RANGE, ETH3D_RANGE = (1e-3, 10.0), (1e-5, 80.0), (1e-5, float("inf"))
SCANNET_RANGE, DIODE_RANGE = (1e-3, 10.0), (0.6, 350.0)
NYU_SHAPE, NYU_EIGEN_CROP = (480, 640), (slice(45, 471), slice(41, 601))
KB_CROP_HW = (352, 1216)
# KITTI evaluation masks as fractions of the (KB-cropped) GT size: rows lo, rows hi, cols lo, cols hi
KITTI_MASKS = {"eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
               "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229)}


def _sample(row, rgb, gt, valid, family) -> EvalSample:
    return EvalSample(id=strip_ext(row[0]), rgb=rgb, gt=gt, gt_type="depth", valid=valid, family=family)


# -- NYUv2 -------------------------------------------------------------------------------------
def _load_nyu(root: str, row: list[str]) -> EvalSample:
    gt = read_png_depth(join(root, row[1]), 1000.0)  # raw depth (row[2] is the filled one: unused)
    if gt.shape != NYU_SHAPE:
        raise ValueError(f"{row[1]}: NYU GT must be {NYU_SHAPE} for the Eigen crop, got {gt.shape}")
    crop = np.zeros(gt.shape, bool)
    crop[NYU_EIGEN_CROP] = True
    return _sample(row, read_rgb(join(root, row[0])), gt, range_mask(gt, *NYU_RANGE) & crop, "nyu")


def open_nyu(path: str, split_file: str | None = None) -> EvalDataset:
    """NYUv2 test, 654 images (`nyu_labeled_extracted/`, `filename_list_test.txt`):
    16-bit PNG / 1000, valid (1e-3, 10) m, Eigen crop rows 45–470, cols 41–600 of 480×640."""
    root, split = resolve_split(path, "filename_list_test.txt", split_file)
    return EvalDataset("nyu", read_split(split), functools.partial(_load_nyu, root), *NYU_RANGE)


# -- KITTI Eigen test --------------------------------------------------------------------------
def kb_crop(a: np.ndarray) -> np.ndarray:
    """KITTI benchmark crop 352×1216: bottom-aligned, horizontally centred (Marigold)."""
    h, w = a.shape[:2]
    if h < KB_CROP_HW[0] or w < KB_CROP_HW[1]:
        raise ValueError(f"KITTI image {h}x{w} is smaller than the benchmark crop {KB_CROP_HW}")
    top, left = h - KB_CROP_HW[0], int((w - KB_CROP_HW[1]) / 2)
    return a[top:top + KB_CROP_HW[0], left:left + KB_CROP_HW[1]]


def kitti_eval_mask(shape: tuple[int, int], kind: str) -> np.ndarray:
    r0, r1, c0, c1 = KITTI_MASKS[kind]
    h, w = shape
    m = np.zeros(shape, bool)
    m[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)] = True
    return m


def _load_kitti(root: str, mask_kind: str | None, row: list[str]) -> EvalSample:
    gt = kb_crop(read_png_depth(join(root, row[1]), 256.0))
    valid = range_mask(gt, *KITTI_RANGE)
    if mask_kind is not None:
        valid &= kitti_eval_mask(gt.shape, mask_kind)
    return _sample(row, np.ascontiguousarray(kb_crop(read_rgb(join(root, row[0])))),
                   np.ascontiguousarray(gt), valid, "kitti")


def open_kitti(path: str, split_file: str | None = None, mask: str | None = "eigen") -> EvalDataset:
    """KITTI Eigen test (`eigen_test_files_with_gt.txt`: rgb, gt, focal; gt "None" = no GT, skipped
    and counted: 697 listed, 652 kept). Annotated GT PNG / 256, valid (1e-5, 80) m, KB crop, then the
    eigen (default) or garg evaluation mask."""
    if mask is not None and mask not in KITTI_MASKS:
        raise ValueError(f"KITTI mask must be one of {sorted(KITTI_MASKS)} or None, got {mask!r}")
    root, split = resolve_split(path, "eigen_test_files_with_gt.txt", split_file)
    rows = read_split(split)
    kept = [r for r in rows if len(r) > 1 and r[1] != "None"]
    skipped = [(strip_ext(r[0]), "kitti", "no ground truth in the split file")
               for r in rows if not (len(r) > 1 and r[1] != "None")]
    return EvalDataset("kitti", kept, functools.partial(_load_kitti, root, mask), *KITTI_RANGE,
                       skipped=len(rows) - len(kept), skipped_items=skipped)


# -- ETH3D -------------------------------------------------------------------------------------
def _load_eth3d(root: str, row: list[str]) -> EvalSample:
    rgb = read_rgb(join(root, row[0]))
    raw = np.frombuffer(read_bytes(join(root, row[1])), dtype="<f4")
    h, w = rgb.shape[:2]
    if raw.size != h * w:
        raise ValueError(f"{row[1]}: {raw.size} floats, expected {h}x{w} (the RGB's size)")
    gt = raw.reshape(h, w).astype(np.float32)
    gt[~np.isfinite(gt)] = 0.0  # ETH3D marks missing depth as inf
    return _sample(row, rgb, gt, range_mask(gt, *ETH3D_RANGE), "eth3d")


def open_eth3d(path: str, split_file: str | None = None) -> EvalDataset:
    """ETH3D, 454 DSLR images (`eth3d_filename_list.txt`). GT: raw little-endian float32, row-major,
    4032×6048 in the release (read at the RGB's size), inf = missing; valid (1e-5, inf) m."""
    root, split = resolve_split(path, "eth3d_filename_list.txt", split_file)
    return EvalDataset("eth3d", read_split(split), functools.partial(_load_eth3d, root), *ETH3D_RANGE)


# -- ScanNet -----------------------------------------------------------------------------------
def _load_scannet(root: str, row: list[str]) -> EvalSample:
    gt = read_png_depth(join(root, row[1]), 1000.0)
    return _sample(row, read_rgb(join(root, row[0])), gt, range_mask(gt, *SCANNET_RANGE), "scannet")


def open_scannet(path: str, split_file: str | None = None) -> EvalDataset:
    """ScanNet val, 800 sampled frames (`scannet_val_sampled_list_800_1.txt`): PNG / 1000,
    valid (1e-3, 10) m, no crop."""
    root, split = resolve_split(path, "scannet_val_sampled_list_800_1.txt", split_file)
    return EvalDataset("scannet", read_split(split), functools.partial(_load_scannet, root), *SCANNET_RANGE)


# -- DIODE -------------------------------------------------------------------------------------
def _load_diode(root: str, row: list[str]) -> EvalSample:
    gt = np.asarray(read_npy(join(root, row[1])), dtype=np.float32).squeeze()
    mask = np.asarray(read_npy(join(root, row[2]))).squeeze().astype(bool)
    if mask.shape != gt.shape:
        raise ValueError(f"{row[2]}: mask {mask.shape} does not match depth {gt.shape}")
    return _sample(row, read_rgb(join(root, row[0])), gt, mask & range_mask(gt, *DIODE_RANGE), "diode")


def open_diode(path: str, split_file: str | None = None) -> EvalDataset:
    """DIODE val, 771 images (325 indoors + 446 outdoors; `diode_val_all_filename_list.txt`: rgb,
    `_depth.npy` (H×W×1, metres), `_depth_mask.npy`). valid = dataset mask AND (0.6, 350) m
    (Marigold uses the mask alone; the range only matters where the mask keeps depth < 0.6 m)."""
    root, split = resolve_split(path, "diode_val_all_filename_list.txt", split_file)
    return EvalDataset("diode", read_split(split), functools.partial(_load_diode, root), *DIODE_RANGE)
