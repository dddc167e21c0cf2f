"""The training step of cross-context distillation on cached targets (docs/method.md).

One student forward on the G×G global input, scored by `student.losses.distillation_loss` (Eq. 9); AdamW
with separate encoder and decoder learning rates, linear warm-up then poly(0.9) decay, gradient clipping,
bf16 autocast on GPU. A NaN/inf loss or gradient raises `NonFiniteStep` before the optimizer moves. Pure
torch; the loop around it (resume, cadence of logging, validation and checkpoints) is `student/loop.py`.
"""

from __future__ import annotations

import copy
import math

import torch

from student.losses import LossConfig, distillation_loss


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm is NaN/inf. Raised before the optimizer steps, so the weights
    stay as the last finite step left them; `stats` holds the loss terms and the gradient norm."""

    def __init__(self, stats: dict[str, float]):
        self.stats = stats
        super().__init__(", ".join(f"{k}={v:.4g}" for k, v in stats.items()))


def freeze_unused(model: torch.nn.Module) -> list[str]:
    """Freeze the parameters no forward pass uses; returns their names.

    The DPT head's coarsest fusion block never receives a skip input, so its `res1` unit exists (the
    checkpoint layout of Depth Anything v2 has it) but is never called. DDP fails at the second step
    on parameters that get no gradient unless `find_unused_parameters=True`, which costs an autograd
    graph traversal every step; freezing them costs nothing and changes no result (AdamW skips
    parameters without a gradient). Found by one probe forward/backward, so it holds for any student.
    """
    core = model.module if hasattr(model, "module") else model
    was_training = core.training
    side = 2 * core.patch
    probe = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(next(core.parameters()).device)
    pred, feats = core(probe, return_features=True)
    (pred.sum() + feats.sum()).backward()
    unused = [n for n, p in core.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in core.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    core.train(was_training)
    return unused


def make_optimizer(model: torch.nn.Module, lr_encoder: float, lr_decoder: float, weight_decay: float):
    enc = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    dec = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    return torch.optim.AdamW([{"params": enc, "lr": lr_encoder, "name": "encoder"},
                              {"params": dec, "lr": lr_decoder, "name": "decoder"}], weight_decay=weight_decay)


def make_scheduler(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** 0.9
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def frozen_encoder(model: torch.nn.Module) -> torch.nn.Module:
    enc = copy.deepcopy(model.encoder).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def train_step(model, batch: dict, opt, sched, cfg: LossConfig, grad_clip: float, frozen=None,
               device: torch.device | None = None, amp: bool = False) -> dict[str, float]:
    device = device or torch.device("cpu")
    model.train()
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        if cfg.feature_loss and frozen is not None:
            pred, feats = model(batch["image"], return_features=True)
            with torch.no_grad():
                core = model.module if hasattr(model, "module") else model
                x = (batch["image"] - core.mean) / core.std
                frozen_feats = frozen.forward_intermediates(
                    core._fit(x), indices=[core.config.layers[-1]], norm=True, output_fmt="NCHW",
                    intermediates_only=True)[-1].flatten(2).transpose(1, 2)
        else:
            pred, feats, frozen_feats = model(batch["image"]), None, None
    terms = distillation_loss(pred.float(), batch, cfg, feats, frozen_feats)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    losses_now = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
    if not all(math.isfinite(v) for v in (*losses_now.values(), float(gnorm))):
        raise NonFiniteStep({**losses_now, "grad_norm": float(gnorm)})
    opt.step()
    sched.step()
    with torch.no_grad():
        valid = pred.detach()[batch["valid"]]
        stats = {"pred_median": float(valid.median()) if valid.numel() else math.nan,
                 "pred_spread": float((valid - valid.median()).abs().mean()) if valid.numel() else math.nan}
    return {**losses_now, "grad_norm": float(gnorm),
            **{f"lr_{g['name']}": g["lr"] for g in opt.param_groups}, **stats}
