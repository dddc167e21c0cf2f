"""The training loop: `train_step` over an epoch plan, resumable, with a cadence of logging, validation and
checkpoints. Pure torch; where records and checkpoints go is the caller's (`Hooks`), so the same loop runs
inline, on every rank of Ray Train, or in a notebook. Every rank takes the same number of steps (the plan
gives each the same batches per epoch), so DDP's collectives never wait on a rank that has stopped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from student.checkpoint import nonfinite_tensors
from student.data import EpochPlan
from student.trainer import NonFiniteStep


@dataclass(frozen=True)
class Cadence:
    """How long to train and how often to log, validate and checkpoint (every `n` steps and at the end)."""
    steps: int
    log_every: int
    checkpoint_every: int
    val_every: int | None = None  # None: with the checkpoints

    def due(self, step: int, every: int | None) -> bool:
        return step % (every or self.checkpoint_every) == 0 or step == self.steps


@dataclass
class Hooks:
    """What the loop hands out (rank 0 only). `diverged(step, why)` returns the exception to raise."""
    log: Callable[[dict], None] = lambda record: None
    validate: Callable[[int, torch.nn.Module], None] | None = None
    checkpoint: Callable[[int, torch.nn.Module, dict], None] = lambda step, model, state: None
    diverged: Callable[[int, str], BaseException] = lambda step, why: FloatingPointError(
        f"diverged at step {step}: {why}")


@dataclass
class Progress:
    steps: int
    samples: int = 0
    epochs: list[int] = field(default_factory=list)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def training_state(opt, sched, step: int, **extra) -> dict:
    """What a checkpoint needs beyond the weights to resume exactly: optimizer, schedule, step, RNG."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
            "torch_rng": torch.get_rng_state(), **extra}


def restore(model: torch.nn.Module, opt, sched, weights: torch.nn.Module, state: dict) -> int:
    """Load a checkpoint's weights and `training_state`; returns the step to continue from."""
    model.load_state_dict(weights.state_dict())
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def fit(model: torch.nn.Module, step: Callable[[dict], dict], plan: EpochPlan,
        batches: Callable[[int, int, int], Iterable[dict]], cadence: Cadence, hooks: Hooks, *, opt, sched,
        start: int = 0, n_teachers: int = 1, lead: bool = True, world: int = 1) -> Progress:
    """Train from step `start` to `cadence.steps`. `step(batch)` is one optimizer step returning its stats
    (`train_step`); `batches(epoch, end, skip)` yields this rank's batches skip … end − 1 of `epoch`.
    Only the lead rank (`lead`) logs, validates and checkpoints; a non-finite step or checkpoint stops
    everything through `hooks.diverged`, with the weights of the last finite step untouched."""
    progress, t0 = Progress(start), time.time()
    usage = np.zeros(n_teachers, dtype=np.int64)  # teacher draws since the last log line
    while progress.steps < cadence.steps:
        epoch, skip = plan.locate(progress.steps)
        end = min(plan.steps(epoch), skip + cadence.steps - progress.steps)
        progress.epochs.append(epoch)
        for batch in batches(epoch, end, skip):
            try:
                stats = step(batch)
            except NonFiniteStep as err:
                raise hooks.diverged(progress.steps + 1, str(err)) from None
            progress.steps += 1
            progress.samples += batch["image"].shape[0]
            usage += np.bincount(batch["teacher"].numpy(), minlength=n_teachers)
            if lead:
                _lead_duties(model, progress, epoch, stats, usage, cadence, hooks, opt, sched,
                             lambda: progress.samples * world / (time.time() - t0))
    return progress


def _lead_duties(model, progress: Progress, epoch: int, stats: dict, usage: np.ndarray, cadence: Cadence,
                 hooks: Hooks, opt, sched, samples_per_s: Callable[[], float]) -> None:
    """Rank 0 after each step: the log line, validation and the checkpoint when they are due."""
    s = progress.steps
    if cadence.due(s, cadence.log_every):
        hooks.log({"step": s, "epoch": epoch, "samples_per_s": samples_per_s(), **stats,
                   "teachers": usage.tolist()})
        usage[:] = 0
    if hooks.validate and cadence.due(s, cadence.val_every):
        hooks.validate(s, unwrapped(model))
    if cadence.due(s, cadence.checkpoint_every):
        core = unwrapped(model)
        if bad := nonfinite_tensors(core.state_dict()):
            raise hooks.diverged(s, f"non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}")
        hooks.checkpoint(s, core, training_state(opt, sched, s))
