"""Inference at a chosen resolution: resize (aspect kept, sides multiples of 14), predict, resize back.

Used by evaluation, prediction and validation so every path predicts the same way: predict at the
processing resolution, upsample bilinearly to the ground-truth size (as Marigold and Depth Anything v2).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def processing_size(h: int, w: int, short_side: int, multiple: int = 14) -> tuple[int, int]:
    scale = short_side / min(h, w)
    return (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))


def to_batch(rgbs: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H,W,3) images → (B,3,h,w) float in [0,1] at `size` (bicubic, clamped)."""
    out = []
    for rgb in rgbs:
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0  # writable copy
        out.append(F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def predict_disparity(predict_fn, rgb: np.ndarray, short_side: int, device="cpu") -> np.ndarray:
    """One image (H,W,3) uint8 → (H,W) float32 disparity, predicted at `short_side` and resized back."""
    h, w = rgb.shape[:2]
    x = to_batch([rgb], processing_size(h, w, short_side)).to(device)
    pred = predict_fn(x).float()
    return F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
