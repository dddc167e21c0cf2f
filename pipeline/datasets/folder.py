"""Any folder of photographs with metric GT next to them: the user's own evaluation set.

For each image `a/b/x.jpg` (jpg, jpeg, png, bmp, tif, tiff, webp) the GT is `a/b/x.npy` (float, metres) or
a 16-bit single-channel `a/b/x.png` (millimetres, divided by 1000); an 8-bit PNG of the same stem is the
image. Unpaired files are skipped and named (`EvalDataset.skipped_items`). Valid: finite GT in (1e-5, inf)
m, no crop. `family` is the first sub-folder under PATH, so a folder per scene type gives per-family means.
"""

from __future__ import annotations

import functools
import io
import posixpath

import fsspec
import numpy as np
from PIL import Image

from pipeline.datasets.evalbase import (
    EvalDataset,
    EvalSample,
    range_mask,
    read_bytes,
    read_npy,
    read_png_depth,
    read_rgb,
)
from pipeline.images import IMAGE_EXTS

FOLDER_RANGE = (1e-5, float("inf"))
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _is_16bit_png(url: str) -> bool:
    with Image.open(io.BytesIO(read_bytes(url))) as img:  # header only; pixels are not decoded
        return img.mode in _16BIT_MODES


def _load(item: tuple[str, str, str, str]) -> EvalSample:
    sid, rgb_url, gt_url, family = item
    if gt_url.endswith(".npy"):
        gt = np.asarray(read_npy(gt_url), dtype=np.float32).squeeze()
    else:
        gt = read_png_depth(gt_url, 1000.0)
    gt = np.where(np.isfinite(gt), gt, 0.0).astype(np.float32)
    return EvalSample(id=sid, rgb=read_rgb(rgb_url), gt=gt, gt_type="depth",
                      valid=range_mask(gt, *FOLDER_RANGE), family=family)


def pair_files(rel_paths: list[str], is_gt_png) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Group relative paths by stem → ([(image, gt)], [(file, reason)] of stems without a complete pair).

    `is_gt_png(rel)` is only asked about PNGs: those that share their stem with another file, and a lone
    PNG (to say whether it is an image without GT or a GT without image)."""
    groups: dict[str, list[str]] = {}
    for rel in sorted(rel_paths):
        stem, ext = posixpath.splitext(rel)
        if ext.lower() in IMAGE_EXTS + (".npy",):
            groups.setdefault(stem, []).append(rel)
    pairs, unpaired = [], []
    for stem, files in groups.items():
        if len(files) == 1:
            f = files[0]
            is_gt = f.endswith(".npy") or (f.lower().endswith(".png") and is_gt_png(f))
            unpaired.append((f, "ground truth without an image" if is_gt else
                             f"no ground truth ({posixpath.basename(stem)}.npy or a 16-bit "
                             f"{posixpath.basename(stem)}.png next to it)"))
            continue
        gts = [f for f in files if f.endswith(".npy") or (f.lower().endswith(".png") and is_gt_png(f))]
        images = [f for f in files if f not in gts]
        if len(images) != 1 or len(gts) != 1:
            raise ValueError(f"need exactly one image and one GT for {stem!r}, got {files}")
        pairs.append((images[0], gts[0]))
    return pairs, unpaired


def open_folder(path: str) -> EvalDataset:
    fs, base = fsspec.core.url_to_fs(path)
    base = base.rstrip("/")
    rels = [p[len(base) + 1:] for p in fs.find(base)]
    url = functools.partial(_url, fs, base, path)
    pairs, orphans = pair_files(rels, lambda rel: _is_16bit_png(url(rel)))
    own = posixpath.basename(base) or "folder"

    def family(rel: str) -> str:
        return rel.split("/")[0] if "/" in rel else own

    items = [(posixpath.splitext(img)[0], url(img), url(gt), family(img)) for img, gt in pairs]
    skipped = [(rel, family(rel), reason) for rel, reason in orphans]
    return EvalDataset(f"folder:{own}", items, _load, *FOLDER_RANGE, skipped_items=skipped)


def _url(fs, base: str, like: str, rel: str) -> str:
    full = base + "/" + rel
    return full if "://" not in like else fs.unstrip_protocol(full)
