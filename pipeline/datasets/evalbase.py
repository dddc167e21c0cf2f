"""The common record of every evaluation set, and the small readers the format loaders share.

The evaluation protocol (`student.evaluation`) must not care where a sample came from: each loader turns
its format into `EvalSample`s whose `valid` mask already holds the dataset's depth range *and* its
evaluation crop or mask, as Marigold's `_get_valid_mask` does. Loading is lazy and datasets pickle to Ray
workers. Paths are fsspec URLs; a path through a `.tar` reads that member, so Marigold's evaluation tars
need no extracting. RGB is decoded without EXIF rotation: the GT is aligned with the stored pixels.
"""

from __future__ import annotations

import functools
import io
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

GT_TYPES = ("depth", "disparity")


@dataclass
class EvalSample:
    """One image with GT. `valid` = valid range AND evaluation crop/mask; gt is 0 where unknown."""

    id: str
    rgb: np.ndarray   # (H, W, 3) uint8
    gt: np.ndarray    # (H, W) float32; metres (depth) or pixels (disparity)
    gt_type: str      # "depth" | "disparity"
    valid: np.ndarray  # (H, W) bool
    family: str

    def __post_init__(self):
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.dtype != np.uint8:
            raise ValueError(f"{self.id}: rgb must be (H, W, 3) uint8, got {self.rgb.shape} {self.rgb.dtype}")
        if self.gt.ndim != 2 or self.gt.dtype != np.float32:
            raise ValueError(f"{self.id}: gt must be (H, W) float32, got {self.gt.shape} {self.gt.dtype}")
        if self.valid.shape != self.gt.shape or self.valid.dtype != np.bool_:
            raise ValueError(f"{self.id}: valid must be bool of the gt's shape {self.gt.shape}")
        if self.gt_type not in GT_TYPES:
            raise ValueError(f"{self.id}: gt_type must be one of {GT_TYPES}, got {self.gt_type!r}")


class EvalDataset:
    """A named, lazily loaded sequence of `EvalSample`s with the dataset's depth range.

    `skipped` counts listed entries that cannot be evaluated (e.g. KITTI rows without GT);
    `skipped_items` names them, as (id, family, reason), so an evaluation can list each one
    instead of reporting a smaller n with no word (a loader that names them sets both).
    """

    def __init__(self, name: str, items: Sequence[Any], load: Callable[[Any], EvalSample],
                 min_depth: float, max_depth: float, skipped: int = 0,
                 skipped_items: Sequence[tuple[str, str, str]] = ()):
        self.name, self.items, self.load = name, list(items), load
        self.skipped_items = [tuple(x) for x in skipped_items]
        skipped = max(int(skipped), len(self.skipped_items))
        self.min_depth, self.max_depth, self.skipped = float(min_depth), float(max_depth), skipped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EvalSample:
        return self.load(self.items[i])

    def __iter__(self) -> Iterator[EvalSample]:
        for item in self.items:
            yield self.load(item)

    def __repr__(self) -> str:
        return (f"EvalDataset({self.name!r}, n={len(self)}, depth=({self.min_depth}, {self.max_depth}),"
                f" skipped={self.skipped})")


# -- readers -----------------------------------------------------------------------------------
def join(root: str, rel: str) -> str:
    """root URL + a split file's relative path (Marigold tar members may start with './')."""
    rel = rel.removeprefix("./")
    return root.rstrip("/") + "/" + rel if root else rel


@functools.lru_cache(maxsize=8)
def _open_tar(url: str) -> tarfile.TarFile:
    """One open archive per process (the dataset itself only holds URLs, so it pickles)."""
    return tarfile.open(fileobj=fsspec.open(url, "rb").open(), mode="r:")


def read_bytes(url: str) -> bytes:
    cut = url.find(".tar/")
    if cut < 0:
        with fsspec.open(url, "rb") as f:
            return f.read()
    archive, member = _open_tar(url[:cut + 4]), url[cut + 5:]
    for name in ("./" + member, member):
        try:
            return archive.extractfile(archive.getmember(name)).read()
        except KeyError:
            continue
    raise FileNotFoundError(f"{member} not in {url[:cut + 4]}")


def read_rgb(url: str) -> np.ndarray:
    with Image.open(io.BytesIO(read_bytes(url))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_png_depth(url: str, divisor: float) -> np.ndarray:
    """A 16-bit single-channel PNG divided by `divisor` (1000: mm → m; 256: KITTI) → float32."""
    with Image.open(io.BytesIO(read_bytes(url))) as img:
        arr = np.asarray(img)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{url}: expected a single-channel integer PNG, got {arr.shape} {arr.dtype}")
    return (arr.astype(np.float64) / divisor).astype(np.float32)


def read_npy(url: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)


def read_split(url: str) -> list[list[str]]:
    """A Marigold `data_split/*.txt`: one sample per line, whitespace-separated relative paths."""
    with fsspec.open(url, "rt") as f:
        return [line.split() for line in f if line.strip()]


def resolve_split(path: str, default_name: str, split_file: str | None) -> tuple[str, str]:
    """(data root, split-file URL). PATH is the data root (folder, or Marigold's .tar with the split
    file next to it) or the split .txt itself, inside the data folder."""
    if split_file is not None:
        return path.rstrip("/"), split_file
    if path.endswith(".txt"):
        return posixpath.dirname(path), path
    if path.endswith(".tar"):
        return path, join(posixpath.dirname(path), default_name)
    return path.rstrip("/"), join(path, default_name)


def range_mask(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Marigold `_get_valid_mask`: lo < d < hi (strict), finite."""
    return np.isfinite(depth) & (depth > lo) & (depth < hi)


def strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]
