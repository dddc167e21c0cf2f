"""student/loop.py: the cadence of logs, validations and checkpoints; resuming from a checkpoint gives the
weights of an uninterrupted run to the bit; a non-finite step stops before the optimizer moves."""

import copy
import math

import pytest
import torch

from student.data import EpochPlan
from student.loop import Cadence, Hooks, fit, restore
from student.trainer import NonFiniteStep

PLAN = {0: 5, 1: 3}  # two shards of 5 and 3 samples; batch 2 → 4 steps per epoch (one rank)


def _batches(epoch: int, end: int, skip: int):
    """Deterministic batches skip … end − 1: batch i of epoch e is the same whatever was skipped before it."""
    for i in range(skip, end):
        g = torch.Generator().manual_seed(1000 * epoch + i)
        yield {"image": torch.randn(2, 3, generator=g), "teacher": torch.tensor([i % 2, 1])}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def step(batch: dict) -> dict:
        loss = model(batch["image"]).square().mean() + torch.rand(()) * 0  # consumes the RNG like dropout would
        opt.zero_grad()
        loss.backward()
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteStep({"loss_total": float(loss.detach())})
        opt.step()
        sched.step()
        return {"loss_total": float(loss.detach())}

    return model, opt, sched, step


class Recorder:
    def __init__(self):
        self.logs, self.vals, self.ckpts = [], [], {}

    def hooks(self) -> Hooks:
        return Hooks(log=self.logs.append, validate=lambda s, m: self.vals.append(s),
                     checkpoint=lambda s, m, state: self.ckpts.__setitem__(
                         s, copy.deepcopy((m.state_dict(), state))))  # as saved: later steps mutate in place


def test_cadence_epochs_and_teacher_counts():
    model, opt, sched, step = _setup()
    rec = Recorder()
    progress = fit(model, step, EpochPlan(PLAN, 0, 1, 2), _batches, Cadence(10, 3, 4, 5), rec.hooks(),
                   opt=opt, sched=sched, n_teachers=2)
    assert (progress.steps, progress.samples, progress.epochs) == (10, 20, [0, 1, 2])
    assert [r["step"] for r in rec.logs] == [3, 6, 9, 10] and [r["epoch"] for r in rec.logs] == [0, 1, 2, 2]
    # teacher draws since the previous line: steps 1-3 draw teachers (0,1),(1,1),(0,1) → [2, 4]
    assert rec.logs[0]["teachers"] == [2, 4] and sum(map(sum, (r["teachers"] for r in rec.logs))) == 20
    assert rec.vals == [5, 10] and sorted(rec.ckpts) == [4, 8, 10]
    assert rec.ckpts[8][1]["step"] == 8 and set(rec.ckpts[8][1]) == {"optimizer", "scheduler", "step", "torch_rng"}


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one():
    model, opt, sched, step = _setup()
    whole = Recorder()
    fit(model, step, EpochPlan(PLAN, 0, 1, 2), _batches, Cadence(10, 100, 3), whole.hooks(), opt=opt, sched=sched,
        n_teachers=2)

    model, opt, sched, step = _setup()
    first = Recorder()
    fit(model, step, EpochPlan(PLAN, 0, 1, 2), _batches, Cadence(10, 100, 3), first.hooks(), opt=opt, sched=sched,
        n_teachers=2)
    weights, state = first.ckpts[6]  # "crash" after step 6: a fresh process restores the step-6 checkpoint
    model, opt, sched, step = _setup(seed=99)
    saved = torch.nn.Linear(3, 1)
    saved.load_state_dict(weights)
    start = restore(model, opt, sched, saved, state)
    second = Recorder()
    progress = fit(model, step, EpochPlan(PLAN, 0, 1, 2), _batches, Cadence(10, 100, 3), second.hooks(),
                   opt=opt, sched=sched, start=start, n_teachers=2)
    assert start == 6 and progress.steps == 10 and progress.epochs == [1, 2]
    assert sorted(second.ckpts) == [9, 10]
    for k, v in whole.ckpts[10][0].items():
        assert torch.equal(second.ckpts[10][0][k], v), k


def test_only_the_lead_rank_hands_out_records_and_every_rank_takes_the_same_steps():
    model, opt, sched, step = _setup()
    rec = Recorder()
    progress = fit(model, step, EpochPlan(PLAN, 0, 1, 2), _batches, Cadence(7, 1, 1), rec.hooks(), opt=opt,
                   sched=sched, lead=False, n_teachers=2)
    assert progress.steps == 7 and not (rec.logs or rec.vals or rec.ckpts)


def test_a_nonfinite_step_stops_through_the_hook_and_leaves_the_weights():
    model, opt, sched, step = _setup()
    rec = Recorder()

    def poisoned(epoch, end, skip):
        for i, b in enumerate(_batches(epoch, end, skip)):
            if epoch == 1 and skip + i == 1:
                b = {**b, "image": torch.full((2, 3), math.inf)}
            yield b

    calls = []
    hooks = Hooks(checkpoint=rec.hooks().checkpoint,
                  diverged=lambda s, why: calls.append((s, why)) or RuntimeError(f"stopped at {s}"))
    with pytest.raises(RuntimeError, match="stopped at 6"):
        fit(model, step, EpochPlan(PLAN, 0, 1, 2), poisoned, Cadence(10, 100, 5), hooks, opt=opt, sched=sched,
            n_teachers=2)
    assert calls[0][0] == 6 and "loss_total" in calls[0][1]
    # weights are those after step 5 (the last finite step): the optimizer never moved on the bad batch
    for k, v in rec.ckpts[5][0].items():
        assert torch.equal(model.state_dict()[k], v), k
