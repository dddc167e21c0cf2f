"""Affine-invariant depth evaluation: per-image least-squares alignment and the standard metrics.

A batched torch re-implementation of Marigold's `src/util/alignment.py`, `src/util/metric.py` and the
glue in `script/depth/eval.py`, so the numbers compare with the paper's: fit `s·pred + t` per image
(`space`: `disparity`, `depth` or `inverse_depth`), clip, then AbsRel, δ1-3, RMSE … on the valid pixels.
Choices the references leave open (flat or non-finite predictions, non-positive disparities, stereo GT,
`alignment_max_res` subsampling columns only) are made explicit: docs/evaluation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DISP_FLOOR = 1e-3   # Marigold eval.py: aligned disparity clipped to >= 1e-3 before inverting
DEPTH_FLOOR = 1e-6  # Marigold eval.py: prediction clipped to >= 1e-6 before the metrics
SPACES = ("disparity", "depth", "inverse_depth")
METRIC_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "silog")


def _batched(x) -> tuple[torch.Tensor, bool]:
    """(H, W) or (B, H, W), numpy or torch → float64 (B, H, W) tensor and whether it was single."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() not in (2, 3):
        raise ValueError(f"expected (H, W) or (B, H, W), got shape {tuple(t.shape)}")
    t = t.double() if t.dtype != torch.bool else t
    return (t.unsqueeze(0), True) if t.dim() == 2 else (t, False)


def _prepare(pred, gt, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    p, single = _batched(pred)
    g, _ = _batched(gt)
    m, _ = _batched(mask)
    if not (p.shape == g.shape == m.shape):
        raise ValueError(f"shape mismatch: pred {tuple(p.shape)}, gt {tuple(g.shape)}, mask {tuple(m.shape)}")
    return p, g, m.bool(), single


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-image mean of x over m; NaN where m is empty."""
    n = m.sum((-1, -2)).double()
    s = torch.where(m, x, torch.zeros_like(x)).sum((-1, -2))
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, math.nan))


def _subsample(x: torch.Tensor, max_res: int) -> torch.Tensor:
    """Marigold `align_depth_least_square(max_resolution=…)` as it runs: the (1, H, W) array given
    to `nn.Upsample(scale_factor=min(max_res / (H, W)), mode="nearest")` is resized along W only."""
    sf = min(max_res / x.shape[-2], max_res / x.shape[-1])
    if sf >= 1:
        return x
    return F.interpolate(x.double(), scale_factor=sf, mode="nearest")


def fit_scale_shift(pred, target, mask, max_res: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least squares `min_{s,t} Σ_mask (s·pred + t − target)²` → (s, t), each (B,) or ().

    Pixels with a non-finite pred or target are left out. A constant prediction gives s = 0,
    t = mean(target); an empty mask gives s = t = 0. `max_res` fits on a nearest subsample, as
    Marigold's `alignment_max_res` (1024 for ETH3D); the caller applies s, t at full resolution.
    """
    p, y, m, single = _prepare(pred, target, mask)
    if max_res is not None:
        p, y, m = _subsample(p, max_res), _subsample(y, max_res), _subsample(m, max_res).bool()
    m = m & torch.isfinite(p) & torch.isfinite(y)
    zero = torch.zeros_like(p)
    mp, my = _masked_mean(p, m).nan_to_num(0.0), _masked_mean(y, m).nan_to_num(0.0)
    dp = torch.where(m, p - mp[:, None, None], zero)
    dy = torch.where(m, y - my[:, None, None], zero)
    var, cov = (dp * dp).sum((-1, -2)), (dp * dy).sum((-1, -2))
    degenerate = var <= (1e-12 * mp.abs()) ** 2 * m.sum((-1, -2))
    s = torch.where(degenerate, torch.zeros_like(var), cov / torch.where(degenerate, 1.0, var))
    t = my - s * mp
    return (s[0], t[0]) if single else (s, t)


def _apply(pred: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s·pred + t per image; non-finite predictions stay NaN (scored as failures later)."""
    out = s.reshape(-1, 1, 1) * pred + t.reshape(-1, 1, 1)
    return torch.where(torch.isfinite(pred), out, torch.full_like(out, math.nan))


def _inverse(gt: torch.Tensor) -> torch.Tensor:
    """1/gt where gt > 0, else 0 (Marigold `depth2disparity`)."""
    pos = gt > 0
    return torch.where(pos, 1.0 / torch.where(pos, gt, torch.ones_like(gt)), torch.zeros_like(gt))


def _align_fit(pred, gt, mask, space: str, max_res: int | None = None):
    """Shared by `align` and `evaluate_prediction`: (aligned (B,H,W), s, t, single)."""
    if space not in ("disparity", "depth"):
        raise ValueError(f"space must be 'disparity' or 'depth', got {space!r}")
    p, g, m, single = _prepare(pred, gt, mask)
    pos = m & (g > 0) & torch.isfinite(g)
    if space == "depth":
        s, t = fit_scale_shift(p, g, pos, max_res)
        return _apply(p, s, t), s, t, single
    s, t = fit_scale_shift(p, _inverse(g), pos, max_res)
    disp = _apply(p, s, t).clamp_min(DISP_FLOOR)  # clamp keeps NaN
    return 1.0 / disp, s, t, single


def align(pred, gt, mask, space: str = "disparity", fit_max_res: int | None = None) -> torch.Tensor:
    """Align a relative prediction to GT **depth**; returns aligned depth, same shape as pred.

    `disparity`: fit `s·pred + t ≈ 1/gt` on mask & gt > 0, clip ≥ 1e-3, return its inverse
    (Marigold `least_square_disparity`). `depth`: fit `s·pred + t ≈ gt` (pred is depth-like).
    """
    out, _, _, single = _align_fit(pred, gt, mask, space, fit_max_res)
    return out[0] if single else out


def _align_disp_fit(pred_disp, gt_disp, mask, max_res: int | None = None):
    p, g, m, single = _prepare(pred_disp, gt_disp, mask)
    pos = m & (g > 0) & torch.isfinite(g)
    s, t = fit_scale_shift(p, g, pos, max_res)
    return _apply(p, s, t).clamp_min(DISP_FLOOR), s, t, single


def align_disparity(pred_disp, gt_disp, mask, fit_max_res: int | None = None) -> torch.Tensor:
    """Align to GT that *is* disparity (or inverse depth): fit on mask & gt > 0, clip ≥ 1e-3.

    The result stays in disparity space, to be scored against `gt_disp` itself.
    """
    out, _, _, single = _align_disp_fit(pred_disp, gt_disp, mask, fit_max_res)
    return out[0] if single else out


def _worst_fill(pred: torch.Tensor, gt: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Replace non-finite pred by the bound (lo, or hi if finite) farthest from gt in log ratio."""
    worst = torch.full_like(gt, lo)
    if math.isfinite(hi):
        g = gt.clamp_min(DEPTH_FLOOR)
        hi_worse = (math.log(hi) - g.log()).abs() > (math.log(lo) - g.log()).abs()
        worst = torch.where(hi_worse, torch.full_like(gt, hi), worst)
    return torch.where(torch.isfinite(pred), pred, worst)


def _metrics(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics of docs/evaluation.md, per image; p, g positive on m."""
    g = torch.where(m, g, torch.ones_like(g))
    p = torch.where(m, p, torch.ones_like(p))
    diff, e = p - g, p.log() - g.log()
    ratio = torch.maximum(p / g, g / p)
    mean_e, mean_e2 = _masked_mean(e, m), _masked_mean(e * e, m)
    out = {
        "abs_rel": _masked_mean(diff.abs() / g, m),
        "sq_rel": _masked_mean(diff * diff / g, m),
        "rmse": _masked_mean(diff * diff, m).sqrt(),
        "rmse_log": mean_e2.sqrt(),
        "log10": _masked_mean((p.log10() - g.log10()).abs(), m),
        "silog": 100.0 * (mean_e2 - mean_e * mean_e).clamp_min(0.0).sqrt(),
    }
    for k in (1, 2, 3):
        out[f"delta{k}"] = _masked_mean((ratio < 1.25**k).double(), m)
    return {k: out[k] for k in METRIC_KEYS}


def depth_metrics(pred, gt, mask, min_depth: float | None = None, max_depth: float | None = None) -> dict:
    """AbsRel, SqRel, RMSE, RMSE_log, log10, δ1–3, SILog per image (docs/evaluation.md).

    `pred` is already aligned. It is clipped to [min_depth, max_depth], then to ≥ 1e-6 (§5.1);
    non-finite values count as maximal error (module docstring). Pixels used: mask & gt > 0.
    Single (H, W) input → dict of floats; batched (B, H, W) → dict of (B,) float64 tensors.
    """
    p, g, m, single = _prepare(pred, gt, mask)
    m = m & (g > 0) & torch.isfinite(g)
    lo = max(DEPTH_FLOOR, min_depth if min_depth is not None else 0.0)
    hi = math.inf if max_depth is None else float(max_depth)
    p = _worst_fill(p, g, lo, hi).clamp(lo, hi)
    out = _metrics(p, g, m)
    return {k: float(v[0]) for k, v in out.items()} if single else out


def _as_2d(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2:
        raise ValueError(f"evaluate_prediction scores one (H, W) sample, got shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True)
class Aligned:
    """One sample as it was scored: the GT and the aligned (unclipped) prediction in the `space` scored in,
    the pixels scored, and the clipping range [lo, hi] the metrics applied. Pictures draw from this, so what
    they show is what was scored, aligned once."""
    target: np.ndarray
    pred: np.ndarray
    valid: np.ndarray
    lo: float
    hi: float
    space: str

    def clipped(self) -> np.ndarray:
        return np.clip(self.pred, self.lo, self.hi)


def evaluate_prediction(pred_disp, sample_gt, gt_type: str, valid, space: str = "disparity",
                        min_depth: float | None = None, max_depth: float | None = None,
                        fit_max_res: int | None = None) -> dict:
    """`align_and_score` without the maps."""
    return align_and_score(pred_disp, sample_gt, gt_type, valid, space, min_depth, max_depth, fit_max_res)[0]


def align_and_score(pred_disp, sample_gt, gt_type: str, valid, space: str = "disparity",
                    min_depth: float | None = None, max_depth: float | None = None,
                    fit_max_res: int | None = None) -> tuple[dict, Aligned]:
    """The whole per-image protocol for one (H, W) sample; the caller resizes pred to the GT size.

    - gt_type "disparity" (stereo GT): fit and score in disparity; min/max_depth do not apply.
    - gt_type "depth": `space="disparity"` Marigold least_square_disparity, scored in depth;
      `space="depth"` Marigold least_square (then `pred_disp` must be depth-like), scored in depth;
      `space="inverse_depth"` fit and score against 1/gt, clipped to [1/max_depth, 1/min_depth].
    `fit_max_res`: fit on a subsample (Marigold `alignment_max_res`, 1024 for ETH3D).
    Returns the METRIC_KEYS plus `scale`, `shift`, `n_valid` and `space` (where it was scored), and the
    `Aligned` maps.
    """
    if gt_type not in ("depth", "disparity"):
        raise ValueError(f"gt_type must be 'depth' or 'disparity', got {gt_type!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    gt, mask = _as_2d(sample_gt).double(), _as_2d(valid).bool()
    if gt_type == "disparity":
        target, lo, hi, scored = gt, DISP_FLOOR, math.inf, "disparity"
    elif space == "inverse_depth":
        target, scored = _inverse(gt), "inverse_depth"
        lo = max(DISP_FLOOR, 1.0 / max_depth if max_depth else 0.0)
        hi = 1.0 / min_depth if min_depth else math.inf
    else:
        target, lo, hi, scored = gt, min_depth, max_depth, "depth"
    if scored == "depth":
        aligned, s, t, _ = _align_fit(pred_disp, gt, mask, space, fit_max_res)
    else:
        aligned, s, t, _ = _align_disp_fit(pred_disp, target, mask, fit_max_res)
    metrics = depth_metrics(aligned[0], target, mask, lo, hi)
    used = mask & (target > 0) & torch.isfinite(target)
    maps = Aligned(target.numpy(), aligned[0].numpy(), used.numpy(), max(DEPTH_FLOOR, lo or 0.0),
                   math.inf if hi is None else float(hi), scored)
    return {**metrics, "scale": float(s[0]), "shift": float(t[0]), "n_valid": int(used.sum()), "space": scored}, maps


def baseline_predictions(shape) -> dict[str, np.ndarray]:
    """Reference predictions every result is printed beside.

    `constant`: a flat disparity map (all ones). `vertical_ramp`: disparity growing linearly towards
    the bottom row, (row + 1) / H: the "floor near, sky far" prior, strictly positive. `shape` is
    (H, W) or (..., H, W); float32 arrays of that shape.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape[-2:]) < 1:
        raise ValueError(f"shape must end with (H, W), both >= 1, got {shape}")
    h = shape[-2]
    ramp = ((np.arange(h, dtype=np.float32) + 1.0) / h)[:, None]
    return {"constant": np.ones(shape, np.float32),
            "vertical_ramp": np.broadcast_to(ramp, shape).astype(np.float32)}
