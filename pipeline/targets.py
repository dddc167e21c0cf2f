"""Small pure functions on cached targets, shared by the score stage and training.

`fit_affine` (least squares `s·x + t ≈ y`, s ≥ 0), `canonical` (1 + (x − p2)/(p98 − p2): AbsRel in this
frame is invariant to affine maps of either input), `aligned_absrel` / `aligned_fit` (the score stage's
AbsRel, and whether a pair is anti-correlated), `cut_box` (a fractional box resampled: the student/teacher
crop rule) and `mix_targets` (the pixel-wise average of the paper's "Avg." arm). See docs/method.md §4.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_affine_signed(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Unconstrained least-squares s·x + t ≈ y on mask; s < 0 means x and y are anti-correlated."""
    xv, yv = x[mask].astype(np.float64), y[mask].astype(np.float64)
    if xv.size == 0:
        return 0.0, 0.0
    xm, ym = xv.mean(), yv.mean()
    var = ((xv - xm) ** 2).sum()
    s = ((xv - xm) * (yv - ym)).sum() / var if var > 1e-12 * max(1.0, xv.size * xm * xm) else 0.0
    return float(s), float(ym - s * xm)


def fit_affine(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Least-squares scale and shift with s·x + t ≈ y on mask, s ≥ 0. A constant x gets s = 0, t = mean(y).

    Disparities of the same scene never relate by a negative scale: letting the fit flip a map would
    make a sign-inverted teacher (a depth model read as disparity) agree perfectly. Under s ≥ 0 the
    optimum of an anti-correlated pair is s = 0, t = mean(y): no better than a flat map.
    """
    s, t = fit_affine_signed(x, y, mask)
    if s < 0:
        return 0.0, float(y[mask].astype(np.float64).mean())
    return s, t


def canonical(ref: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """1 + (ref − p2)/(p98 − p2); None if ref is flat on the mask."""
    vals = ref[mask]
    if vals.size < 2:
        return None
    lo, hi = np.percentile(vals.astype(np.float64), [2, 98])
    if not hi > lo:
        return None
    return 1.0 + (ref.astype(np.float64) - lo) / (hi - lo)


def aligned_absrel(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """AbsRel of x fitted to ref (scale ≥ 0 + shift), in ref's canonical frame. NaN if undefined."""
    return aligned_fit(x, ref, mask)[0]


def aligned_fit(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, bool]:
    """(aligned AbsRel, whether x is anti-correlated with ref): one canonical frame for both answers."""
    mask = mask & np.isfinite(x) & np.isfinite(ref)
    ref_c = canonical(ref, mask)
    if ref_c is None:
        return float("nan"), False
    s, t = fit_affine_signed(x, ref_c, mask)
    anti = s < 0
    if anti:
        s, t = 0.0, float(ref_c[mask].mean())
    # The floor is fixed in the canonical frame, so it keeps the affine invariance (outliers far below p2).
    err = np.abs(s * x[mask].astype(np.float64) + t - ref_c[mask]) / np.maximum(ref_c[mask], 0.1)
    return float(err.mean()), bool(anti)


def cut_box(m: np.ndarray, box, size: int) -> np.ndarray:
    """Cut a fractional box (x0, y0, x1, y1) of an (H, W) map and resample it to size×size.

    Bilinear sampling at the exact box (grid_sample, align_corners=False), so a box that does not
    fall on pixel edges is cut where it is, not rounded to the nearest pixel.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    lin = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    gx = (x0 + (x1 - x0) * lin) * 2 - 1
    gy = (y0 + (y1 - y0) * lin) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].float()
    src = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()


def mix_targets(maps: list[np.ndarray], valids: list[np.ndarray], weights: list[float],
                tau: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-wise weighted average of teacher maps aligned to the first one's canonical frame.

    Each map is fitted (scale+shift) to the reference (the highest-weight map first), then averaged
    with weight w_t · exp(−|a_t − median_t a_t| / tau): more weight where the teachers agree.
    """
    order = np.argsort(-np.asarray(weights))
    ref_i = int(order[0])
    ref_c = canonical(maps[ref_i], valids[ref_i])
    if ref_c is None:
        return maps[ref_i].astype(np.float32), valids[ref_i]
    aligned, masks, ws = [], [], []
    for m, v, w in zip(maps, valids, weights):
        if w <= 0:
            continue
        both = v & valids[ref_i]
        s, t = fit_affine_signed(m, ref_c, both)
        if s < 0:
            continue  # anti-correlated with the reference: disagreement, not a map to flip and average in
        aligned.append(np.where(v, s * m.astype(np.float64) + t, np.nan))
        masks.append(v)
        ws.append(w)
    stack = np.stack(aligned)
    med = np.nanmedian(stack, axis=0)
    pix_w = np.asarray(ws)[:, None, None] * np.exp(-np.abs(stack - med) / tau)
    pix_w = np.where(np.stack(masks), pix_w, 0.0)
    total = pix_w.sum(axis=0)
    out = np.where(total > 0, np.nansum(pix_w * np.nan_to_num(stack), axis=0) / np.maximum(total, 1e-12), np.nan)
    return out.astype(np.float32), total > 0
