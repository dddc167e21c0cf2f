"""Distillation losses of Distill Any Depth, on disparity maps (B, H, W) with a validity mask.

The paper's gains come from how teacher and student maps are normalised before the L1 (`global`,
`hybrid`, `local`, `none`: Eq. 1-6) and from comparing the student with the teacher in two contexts
(`L_sc`, `L_lg`: Eq. 7-8); `distillation_loss` is Eq. 9 with `L_grad` and `L_feat`. Everything is batched
and vectorised: only the 7 depth-range contexts are stacked, pixels are never looped. The formulas, and
the conventions that change numbers (medians, bin edges, HDN's +1, pooling): docs/method.md §2-3.
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

    L_grad lives on the shared-context pair (our choice: docs/method.md) and shares its normalisation (global
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
