"""The offline teacher zoo: two small depth models with different strengths, trained on rendered scenes.

For machines that cannot download public teachers: trained here on renders with exact depth and MiDaS's
scale-and-shift-invariant loss (global median/MAD normalisation plus gradient matching). `layout` sees the
whole scene at 112² (good layout, blurry edges); `detail` is trained on 112² crops of 224² renders and runs
at 224² (sharp, less globally consistent). Both use the tiny student architecture. The build is seeded and
writes float16 checkpoints, each with a model card (metrics on held-out renders and realeval).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from student.checkpoint import save_checkpoint
from student.losses import gradient_loss, normalized_l1
from student.model import build_student
from student.trainer import make_scheduler

log = logging.getLogger("dad.zoo")
HELD_OUT = "scenes:n=200,seed=900000,size=256"
REALEVAL = "realeval:../shared/data/realeval"


@dataclass(frozen=True)
class Recipe:
    name: str
    strength: str
    input_size: int        # what the model sees at inference (short side)
    train_input: int       # side of the training inputs
    crop: bool             # train on random crops of the render (else the whole render, resized)
    steps: int = 600
    batch: int = 8
    lr: float = 4e-4


RECIPES = (
    Recipe("layout", "whole scene at low resolution: good layout, blurry", input_size=112, train_input=112, crop=False),
    Recipe("detail", "high-resolution crops: sharp, less globally consistent", input_size=224, train_input=112, crop=True),
)
RENDER_SIZE = 224


def render_training_set(n: int, processes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    from scenes.render import render_views

    rgbs, disps = [], []
    for v in render_views(range(n), size=RENDER_SIZE, processes=processes, augment=True):
        rgbs.append(v.rgb)
        disps.append(np.where(v.depth > 0, 1.0 / np.maximum(v.depth, 1e-6), 0.0).astype(np.float32))
    return np.stack(rgbs), np.stack(disps)


def make_batch(rgbs: np.ndarray, disps: np.ndarray, recipe: Recipe, rng: np.random.Generator):
    idx = rng.integers(0, len(rgbs), recipe.batch)
    x = torch.from_numpy(rgbs[idx]).permute(0, 3, 1, 2).float() / 255
    d = torch.from_numpy(disps[idx])[:, None]
    s = recipe.train_input
    if recipe.crop:
        ox, oy = rng.integers(0, RENDER_SIZE - s + 1, 2)
        x, d = x[..., oy:oy + s, ox:ox + s], d[..., oy:oy + s, ox:ox + s]
    else:
        x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
        valid = F.interpolate((d > 0).float(), size=(s, s), mode="area")
        d = F.interpolate(d, size=(s, s), mode="area") / valid.clamp(min=1e-6)
        d = torch.where(valid > 0.999, d, torch.zeros_like(d))
    if rng.random() < 0.5:
        x, d = x.flip(-1), d.flip(-1)
    return x, d[:, 0], d[:, 0] > 0


def train_teacher(recipe: Recipe, rgbs: np.ndarray, disps: np.ndarray, seed: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, sum(map(ord, recipe.name))])
    model = _fresh_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = make_scheduler(opt, warmup=100, total=recipe.steps)
    t0, losses = time.time(), []
    model.train()
    for step in range(recipe.steps):
        x, d, m = make_batch(rgbs, disps, recipe, rng)
        pred = model(x)
        loss = normalized_l1(pred, d, m, norm="global") + gradient_loss(pred, d, m, norm="global")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("zoo %s: step %d/%d loss %.4f (%.0f s)", recipe.name, step + 1, recipe.steps,
                     np.mean(losses[-100:]), time.time() - t0)
    model.eval()
    return model, {"steps": recipe.steps, "seconds": round(time.time() - t0, 1),
                   "final_loss": float(np.mean(losses[-100:]))}


def _fresh_tiny() -> torch.nn.Module:
    """The tiny student architecture with a random encoder (the log says so once per build)."""
    logging.getLogger("student.model").setLevel(logging.ERROR)
    return build_student("tiny")


def evaluate_teacher(model: torch.nn.Module, input_size: int, datasets: list[str]) -> dict:
    from pipeline.datasets import open_dataset
    from student.evaluation import evaluate

    out = {}
    for spec in datasets:
        try:
            ds = open_dataset(spec)
        except (FileNotFoundError, ValueError) as err:
            log.warning("zoo: %s skipped (%s)", spec, err)
            continue
        _, summary = evaluate(model, ds, align="inverse_depth", resolution=input_size)
        out[spec] = summary
    return out


def model_card(recipe: Recipe, train: dict, metrics: dict, n_renders: int, seed: int) -> str:
    lines = [f"# zoo teacher `{recipe.name}`", "",
             f"A small depth model for the embedded default of `dad`: {recipe.strength}.", "",
             "| | |", "|---|---|",
             "| architecture | `student.model` preset `tiny` (timm ViT, embed 96, depth 4, DPT head), random init |",
             f"| data | {n_renders} rendered views (`scenes.render`, seeds 0…{n_renders - 1}, {RENDER_SIZE}², "
             "photometric augmentation), textured with scikit-image photographs and procedural textures |",
             f"| training | {'random ' + str(recipe.train_input) + '² crops' if recipe.crop else 'whole views resized to ' + str(recipe.train_input) + '²'}"
             f", {train['steps']} steps × batch {recipe.batch}, AdamW lr {recipe.lr}, SSI (global median/MAD) L1 + gradient loss |",
             f"| inference | short side {recipe.input_size} (multiple of 14), output: relative disparity |",
             f"| command | `dad zoo build --seed {seed} --renders {n_renders}` ({train['seconds']} s of training "
             "on a 2-core CPU machine) |",
             "| licence | Apache-2.0, like this project; training textures: scikit-image sample photographs |", "",
             "## Metrics (inverse-depth least-squares alignment, per image then per family)", "",
             "| dataset | AbsRel | δ1 | constant AbsRel / δ1 | vertical ramp AbsRel / δ1 |", "|---|---|---|---|---|"]
    for spec, m in metrics.items():
        base = m.get("baselines", {})
        c, r = base.get("constant", {}), base.get("vertical_ramp", {})
        lines.append(f"| `{spec}` | {m['abs_rel']:.3f} | {m['delta1']:.3f} | {c.get('abs_rel', float('nan')):.3f} / "
                     f"{c.get('delta1', float('nan')):.3f} | {r.get('abs_rel', float('nan')):.3f} / {r.get('delta1', float('nan')):.3f} |")
    lines += ["", "Small models trained on renders learn layout cues that transfer poorly to photographs; compare with "
              "the baselines before reading anything into the realeval numbers."]
    return "\n".join(lines) + "\n"


def build(out_dir: str = "zoo", seed: int = 0, n_renders: int = 800,
          steps: int | None = None, eval_sets: tuple[str, ...] = (HELD_OUT, REALEVAL)) -> dict:
    """Render, train both recipes, evaluate, and write `<out_dir>/<name>.pt` + `<name>.md`."""
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    log.info("zoo: rendering %d training views", n_renders)
    rgbs, disps = render_training_set(n_renders)
    summary = {"stage": "zoo", "renders": n_renders, "render_seconds": round(time.time() - t0, 1)}
    for recipe in RECIPES:
        if steps:
            recipe = Recipe(**{**asdict(recipe), "steps": steps})
        model, train = train_teacher(recipe, rgbs, disps, seed)
        metrics = evaluate_teacher(model, recipe.input_size, list(eval_sets))
        save_checkpoint(model, os.path.join(out_dir, f"{recipe.name}.pt"), half=True,
                        extra={"zoo": {"recipe": asdict(recipe), "train": train, "seed": seed}})
        with open(os.path.join(out_dir, f"{recipe.name}.md"), "w") as f:
            f.write(model_card(recipe, train, metrics, n_renders, seed))
        with open(os.path.join(out_dir, f"{recipe.name}.metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=float)
        for spec, m in metrics.items():
            summary[f"{recipe.name}_{spec.split(':')[0]}_abs_rel"] = round(m["abs_rel"], 3)
    summary["seconds"] = round(time.time() - t0, 1)
    return summary
