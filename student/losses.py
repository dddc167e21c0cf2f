"""Distillation losses of Distill Any Depth, on disparity maps (B, H, W) with a validity mask.

Why: the paper's gains come from *how* teacher and student maps are normalised before the L1
(PAPER.md §2) and from comparing the student with the teacher in two contexts (§3). Everything
here is batched and vectorised; only the 7 depth-range contexts are stacked, pixels never looped.

Normalisations (`norm=`), each pixel i normalised as (x_i - t_u) / (s_u + 1e-6) inside a context u:
- "global" (Eq. 1-2): one context, the valid pixels; t = median, s = (1/M) sum |x - t|.
- "hybrid" (Eq. 3-4, HDN-DR, PAPER.md §2.2): for S in {1, 2, 4} the *teacher's* valid range
  [a, b] is cut into S equal-width bins, 7 contexts in all, applied to both maps. Per context
  t = median and s = sum |x - t| / (count + 1) (HDN's +1). A pixel's loss is the mean of
  |N_u(pred) - N_u(target)| over the contexts u containing it; the batch loss is the sum over pixels
  divided by the number of valid pixels (HDN's `.sum() / mask_valid.sum()`).
- "local" (Eq. 5): the S = 4 level of "hybrid" alone.
- "none" (Eq. 6): L1 on the raw maps.
Conventions, stated because they change numbers: the median of an even count is the lower middle
value (torch.nanmedian, as HDN); a pixel on a bin edge goes to the upper bin (HDN's `>=`); the
maximum goes into the last bin. HDN's demo tests `d < edge + 1e-30`, which in float32 drops the
maximum-valued pixels from every context; here every valid pixel is in exactly one bin per level
(|U_i| = 3), as PAPER.md §2.2 states. An empty context contributes nothing and stays NaN-free.

Terms of Eq. 9, L = L_sc + λ1 L_lg + λ2 L_feat + λ3 L_grad with λ = (0.5, 1.0, 2.0):
- L_sc (Eq. 7): `normalized_l1` between the student and teacher maps of the same input.
- L_lg (Eq. 8): each local box (x0, y0, x1, y1, fractions of the global region) is cut from the
  student's global map and resampled to the teacher's local size with `torchvision.ops.roi_align`
  (aligned=True: pixel centres at i + 0.5; adaptive sampling, so a bin averages ceil(crop/size)^2
  bilinear samples: plain bilinear when upsampling, area-like when downsampling), then compared
  with the teacher's local prediction; pixels of all boxes are pooled like pixels of a batch.
- L_feat (Depth Anything v1 feature alignment, PAPER.md §3.4): 1 - cosine similarity between the
  student's and a frozen DINOv2's patch tokens, averaged over the tokens whose similarity is at
  most the margin 0.85 (tokens already closer are not pulled further).
- L_grad (MiDaS/DAv2 gradient matching, PAPER.md §3.4): on the normalised residual
  R = N(pred) - N(target), sum |dR/dx| + |dR/dy| over valid neighbour pairs divided by the valid
  pixel count, at 4 scales (stride 1, 2, 4, 8 subsampling as MiDaS), summed over scales. R uses the
  global normalisation by default (DAv2's SSI); for "hybrid"/"local" R is the per-pixel mean of the
  context residuals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

EPS = 1e-6
LEVELS = {"hybrid": (1, 2, 4), "local": (4,)}
NORMS = ("global", "hybrid", "local", "none")


def depth_range_contexts(target: torch.Tensor, mask: torch.Tensor, levels=(1, 2, 4)) -> torch.Tensor:
    """HDN-DR contexts (Eq. 3): (C, B, H, W) bool, S equal-width bins of the valid target range per S."""
    target = target.detach()
    lo = torch.where(mask, target, torch.inf).amin((-2, -1))
    hi = torch.where(mask, target, -torch.inf).amax((-2, -1))
    lo, hi = torch.where(mask.flatten(1).any(1), lo, 0), torch.where(mask.flatten(1).any(1), hi, 0)
    contexts = []
    for s in levels:
        edges = lo[:, None] + (hi - lo)[:, None] * torch.arange(1, s, device=target.device) / s  # (B, S-1)
        bin_index = (target[..., None] >= edges[:, None, None, :]).sum(-1)
        contexts += [mask & (bin_index == k) for k in range(s)]
    return torch.stack(contexts)


def shift_scale(x: torch.Tensor, contexts: torch.Tensor, count_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-context median t and scale s = sum|x - t| / (count + offset), each (C, B); t = 0 if empty."""
    xs = x.unsqueeze(0).expand_as(contexts)
    t = torch.where(contexts, xs, torch.nan).flatten(2).nanmedian(-1).values
    t = torch.where(torch.isnan(t), 0.0, t)
    deviation = torch.where(contexts, (xs - t[..., None, None]).abs(), 0.0).flatten(2).sum(-1)
    count = contexts.flatten(2).sum(-1)
    return t, deviation / (count + count_offset).clamp(min=1)


def _normalize(x: torch.Tensor, contexts: torch.Tensor, count_offset: int) -> torch.Tensor:
    t, s = shift_scale(x, contexts, count_offset)
    return (x.unsqueeze(0) - t[..., None, None]) / (s[..., None, None] + EPS)


def context_residuals(pred, target, mask, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """N_u(pred) - N_u(target) per context, (C, B, H, W), zero outside each context; and the contexts."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    pred, target = pred.float(), target.float()
    if norm == "none":
        contexts = mask[None]
        return torch.where(contexts, (pred - target)[None], 0.0), contexts
    if norm == "global":
        contexts, offset = mask[None], 0
    else:
        contexts, offset = depth_range_contexts(target, mask, LEVELS[norm]), 1
    residual = _normalize(pred, contexts, offset) - _normalize(target, contexts, offset)
    return torch.where(contexts, residual, 0.0), contexts


def _mask(pred: torch.Tensor, mask) -> torch.Tensor:
    return torch.ones_like(pred, dtype=torch.bool) if mask is None else mask.bool()


def normalized_l1(pred: torch.Tensor, target: torch.Tensor, mask=None, norm: str = "hybrid") -> torch.Tensor:
    """L_Dis of Eq. 2 / 4 / 5 / 6 for (B, H, W) maps: scalar, sum over pixels / number of valid pixels."""
    mask = _mask(pred, mask)
    return _l1(*context_residuals(pred, target, mask, norm), mask)


def _l1(residual: torch.Tensor, contexts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_pixel = residual.abs().sum(0) / contexts.sum(0).clamp(min=1)
    return per_pixel.sum() / mask.sum().clamp(min=1)


def normalized_residual(pred: torch.Tensor, target: torch.Tensor, mask=None, norm: str = "global") -> torch.Tensor:
    """R = N(pred) - N(target) as one (B, H, W) map (mean over the contexts of each pixel; 0 if invalid)."""
    residual, contexts = context_residuals(pred, target, _mask(pred, mask), norm)
    return residual.sum(0) / contexts.sum(0).clamp(min=1)


def shared_context_loss(student, teacher, mask=None, norm: str = "hybrid") -> torch.Tensor:
    """L_sc (Eq. 7): teacher and student saw the same (resized global) input."""
    return normalized_l1(student, teacher, mask, norm)


def shared_context_terms(student, teacher, mask=None, norm: str = "hybrid",
                         grad_norm: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sc, L_grad) of one shared-context pair; equal to `shared_context_loss(…, norm)` and
    `gradient_loss(…, grad_norm)` but, when the two norms agree (the default), the normalisation —
    the per-context medians, most of the loss's cost — is computed once for both."""
    mask = _mask(student, mask)
    grad_norm = grad_norm or norm
    residual, contexts = context_residuals(student, teacher, mask, norm)
    sc = _l1(residual, contexts, mask)
    if grad_norm != norm:
        return sc, gradient_loss(student, teacher, mask, grad_norm)
    return sc, _gradient_matching(residual.sum(0) / contexts.sum(0).clamp(min=1), mask)


def crop_resample(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cut boxes (B, K, 4: x0, y0, x1, y1 as fractions) from maps (B, H, W), resample to (B, K, *size)."""
    B, H, W = maps.shape
    K = boxes.shape[1]
    scale = torch.tensor([W, H, W, H], dtype=maps.dtype, device=maps.device)
    index = torch.arange(B, dtype=maps.dtype, device=maps.device).repeat_interleave(K)[:, None]
    rois = torch.cat([index, (boxes.to(maps.dtype) * scale).reshape(-1, 4)], 1)
    crops = roi_align(maps[:, None], rois, output_size=tuple(size), spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)
    return crops.view(B, K, *size)


def local_global_loss(student_global, teacher_locals, boxes, local_mask=None, norm: str = "hybrid") -> torch.Tensor:
    """L_lg (Eq. 8): student's global map cut at each box vs the teacher's local predictions (B, K, h, w)."""
    h, w = teacher_locals.shape[-2:]
    crops = crop_resample(student_global, boxes, (h, w)).flatten(0, 1)
    mask = None if local_mask is None else local_mask.flatten(0, 1)
    return normalized_l1(crops, teacher_locals.flatten(0, 1), mask, norm)


def gradient_loss(pred, target, mask=None, norm: str = "global", scales: int = 4) -> torch.Tensor:
    """L_grad: multi-scale gradient matching of the normalised residual (MiDaS, summed over scales)."""
    mask = _mask(pred, mask)
    return _gradient_matching(normalized_residual(pred, target, mask, norm), mask, scales)


def _gradient_matching(residual: torch.Tensor, mask: torch.Tensor, scales: int = 4) -> torch.Tensor:
    total = residual.new_zeros(())
    for k in range(scales):
        r, m = residual[:, :: 2**k, :: 2**k], mask[:, :: 2**k, :: 2**k]
        gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * (m[:, :, 1:] & m[:, :, :-1])
        gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * (m[:, 1:, :] & m[:, :-1, :])
        total = total + (gx.sum() + gy.sum()) / m.sum().clamp(min=1)
    return total


def feature_loss(student_feats: torch.Tensor, frozen_feats: torch.Tensor, margin: float = 0.85) -> torch.Tensor:
    """L_feat: mean of 1 - cos over tokens (..., C) with cos <= margin; 0 when every token is closer."""
    cos = F.cosine_similarity(student_feats, frozen_feats.detach(), dim=-1)
    keep = cos <= margin
    return ((1 - cos) * keep).sum() / keep.sum().clamp(min=1)


@dataclass(frozen=True)
class LossConfig:
    """Which terms of Eq. 9 a training run uses, their normalisation and weights (the `[train]` keys
    of the same names; `of(train)` reads them from any object that has them)."""

    norm: str = "hybrid"
    use_sc: bool = True
    use_lg: bool = True
    lambda_lg: float = 0.5    # λ1, local-global
    lambda_feat: float = 1.0  # λ2, feature alignment
    lambda_grad: float = 2.0  # λ3, gradient matching
    feature_loss: bool = False

    @classmethod
    def of(cls, train, feature_loss: bool | None = None) -> LossConfig:
        keys = ("norm", "use_sc", "use_lg", "lambda_lg", "lambda_feat", "lambda_grad", "feature_loss")
        cfg = cls(**{k: getattr(train, k) for k in keys})
        return cfg if feature_loss is None else dataclasses.replace(cfg, feature_loss=feature_loss)


def distillation_loss(pred: torch.Tensor, batch: dict, cfg: LossConfig, feats=None, frozen_feats=None) -> dict:
    """Eq. 9 on a batch of cached targets, as training computes it: every term used, and "total".

    L_grad lives on the shared-context pair (PAPER §3.4 [choice]) and shares its normalisation (global
    for norm = "none"), so a local-global-only run (use_sc = false) gets no shared-context supervision
    through it; L_feat needs the encoder's tokens and the frozen copy's.
    """
    terms: dict[str, torch.Tensor] = {}
    total = pred.new_zeros(())
    if cfg.use_sc:
        if cfg.lambda_grad:  # one normalisation serves both terms
            grad_norm = "global" if cfg.norm == "none" else cfg.norm
            terms["sc"], terms["grad"] = shared_context_terms(pred, batch["target"], batch["valid"], cfg.norm,
                                                              grad_norm)
        else:
            terms["sc"] = shared_context_loss(pred, batch["target"], batch["valid"], cfg.norm)
        total = total + terms["sc"]
    if cfg.use_lg:
        terms["lg"] = local_global_loss(pred, batch["locals"], batch["boxes"], batch["local_valid"], cfg.norm)
        total = total + cfg.lambda_lg * terms["lg"]
    if "grad" in terms:
        total = total + cfg.lambda_grad * terms["grad"]
    if cfg.feature_loss and feats is not None and frozen_feats is not None:
        terms["feat"] = feature_loss(feats, frozen_feats)
        total = total + cfg.lambda_feat * terms["feat"]
    terms["total"] = total
    return terms
