"""The crop plan: one global region and K local patches per sample, fixed before any teacher runs.

The paper draws a random square region and its local patches at every training step; caching needs the
plan fixed, so it is drawn from `(seed, sample_id)` alone and any worker, rerun or teacher sees the same
boxes. Patches sit on a regular grid over the region (K = 4: the four corners). Boxes are fractions of the
region, so the same numbers address the teacher's region and the student's G×G input (docs/method.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.images import resize

PLAN_VERSION = 1  # bump when the drawing rule changes: it is part of the shard fingerprint


@dataclass(frozen=True)
class CropPlan:
    region: tuple[int, int, int]              # x0, y0, side — in original image pixels
    patch: int                                # local patch side, original pixels
    boxes: tuple[tuple[float, float, float, float], ...]  # K boxes, fractions of the region

    def to_row(self) -> dict:
        x0, y0, s = self.region
        return {"region_x0": x0, "region_y0": y0, "region_side": s, "patch": self.patch,
                "boxes": [list(b) for b in self.boxes]}


def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(sample_id[:15], 16)])


def grid_starts(k: int, side: int, patch: int) -> list[tuple[int, int]]:
    """K top-left corners on a g×g grid (g = ceil(sqrt K)), picked evenly when K < g²."""
    g = math.ceil(math.sqrt(k))
    ticks = [round(v) for v in np.linspace(0, side - patch, g)] if g > 1 else [(side - patch) // 2]
    grid = [(x, y) for y in ticks for x in ticks]
    picks = [round(v) for v in np.linspace(0, len(grid) - 1, k)] if k > 1 else [len(grid) // 2]
    return [grid[i] for i in picks]


def plan_crops(sample_id: str, width: int, height: int, seed: int, min_region: int, patch: int,
               local_count: int) -> CropPlan:
    rng = sample_rng(seed, sample_id)
    short = min(width, height)
    side = int(rng.integers(min_region, short + 1)) if short > min_region else short
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    p = patch if side >= min_region else max(1, round(patch * side / min_region))
    boxes = tuple((sx / side, sy / side, (sx + p) / side, (sy + p) / side)
                  for sx, sy in grid_starts(local_count, side, p))
    return CropPlan((x0, y0, side), p, boxes)


def box_pixels(box: tuple[float, float, float, float], side: int) -> tuple[int, int, int, int]:
    """A fractional box → integer pixel box (x0, y0, x1, y1) in a side×side image."""
    x0, y0, x1, y1 = (round(v * side) for v in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


# -- the inputs a plan defines (the same for every teacher, the student and the report) ------------------

def global_input(region: np.ndarray, g: int) -> np.ndarray:
    """The G×G global view of a stored region: what every teacher and the student see (bicubic resize)."""
    return resize(region, (g, g))


def local_inputs(region: np.ndarray, boxes, p: int) -> list[np.ndarray]:
    """The K local patches of a stored region, each cut at the region's own resolution and resized to P×P:
    the detail the global view has lost (the teacher's local predictions are made from these)."""
    side = region.shape[0]
    out = []
    for box in boxes:
        x0, y0, x1, y1 = box_pixels(tuple(box), side)
        out.append(resize(region[y0:y1, x0:x1], (p, p)))
    return out
