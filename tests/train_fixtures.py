"""Helpers for the train-stage and data-stream tests (and bench/train_perf.py).

* `build_cached_run(folder, …)`: a tiny run root, sharded, taught (two `pixel` teachers, exact and
  free) and scored, all inline; returns the config. Copy it with `copy_run` for a test that trains.
* `train_config(cfg, root=…, **train)`: the same run with other `[train]`/`[score]`/`[run]` values.
* `restrict_selection(root, keep)`: keep only the first n selected rows of each shard (uneven shards).
* `live_student(path, …)`: a seeded tiny student checkpoint whose output starts positive (see below).
* `weights(path)`, `batches_of(cfg, …)`, `mean_loss(model, batches, cfg)`: what tests compare.

Why `live_student`: the student ends in ReLU(conv(·)); with PyTorch's default init the last conv's
output is nearly constant around a random bias, so about half of all random heads output 0
everywhere and the ReLU passes no gradient. student/model.py now starts that bias at 1; the tests
set it explicitly too, so they do not depend on that default.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).parent))

from teach_fixtures import SMALL_CROPS, write_ramps

from pipeline.config import DadConfig, load_config
from pipeline.storage import Root

TEACHERS = {"r2g": {"adapter": "pixel", "model": "r+2g", "prior": 0.7},
            "luma": {"adapter": "pixel", "model": "luma", "prior": 0.3}}

# Fast, tiny, deterministic training defaults for tests.
TRAIN = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0,
         "lr_encoder": 1e-4, "lr_decoder": 1e-3, "jitter": 0.0, "prefetch": 2, "amp": False}


def raw_config(root, sources, teachers: dict | None = None, shard_size: int = 5, executor: str = "inline",
               train: dict | None = None, score: dict | None = None, crops: dict | None = None,
               student: dict | None = None, **run) -> dict:
    return {"run": {"root": str(root), "executor": executor, **run},
            "corpus": {"sources": [str(s) for s in (sources if isinstance(sources, list) else [sources])],
                       "shard_size": shard_size},
            "crops": {**SMALL_CROPS, **(crops or {})},
            "teachers": dict(teachers or TEACHERS),
            "score": dict(score or {}),
            "student": {"size": "tiny", **(student or {})},
            "train": {**TRAIN, **(train or {})}}


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth seeded RGB pattern plus noise, any size: decodes and compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    f, g, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
    img = np.stack([127 + 100 * np.sin(xx * f[c] + yy * g[c] + phase[c]) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def write_photos(folder: Path, n: int, sizes=((256, 192),), seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray(photo_like(w, h, seed * 1000 + i)).save(folder / f"photo{i:03d}.png")
    return folder


def build_cached_run(folder: Path, n_images: int = 15, shard_size: int = 5, teachers: dict | None = None,
                     sizes=((96, 72), (80, 80), (72, 90)), images: str = "ramps", **raw) -> DadConfig:
    """shard → teach → score (inline) a tiny corpus (colour ramps, or `images="photos"`) under
    folder/root; returns the config."""
    import stages.score
    import stages.shard
    import stages.teach

    folder = Path(folder)
    src = (write_ramps if images == "ramps" else write_photos)(folder / "src", n_images, sizes=sizes)
    cfg = load_config(raw=raw_config(folder / "root", src, teachers, shard_size, **raw))
    stages.shard.run(cfg)
    stages.teach.run(cfg)
    stages.score.run(cfg)
    return cfg


def cached_run_with_student(folder: Path) -> DadConfig:
    """`build_cached_run` under folder, training configured to start from a saved tiny student."""
    cfg = build_cached_run(folder)
    live_student(folder / "live.pt")
    return train_config(cfg, init_from=str(folder / "live.pt"))


def train_config(cfg: DadConfig, root: str | Path | None = None, score: dict | None = None,
                 run: dict | None = None, student: dict | None = None, **train) -> DadConfig:
    """`cfg` with another root and/or other [train], [score], [run], [student] values."""
    raw = cfg.model_dump(mode="json")
    if root is not None:
        raw["run"]["root"] = str(root)
    raw["run"].update(run or {})
    raw["score"].update(score or {})
    raw["student"].update(student or {})
    raw["train"].update(train)
    return load_config(raw=raw)


def copy_run(cfg: DadConfig, dest: Path) -> DadConfig:
    """A copy of a cached run root (corpus, cache, scores, ledger; no train/) at dest."""
    shutil.copytree(cfg.run.root, dest, ignore=shutil.ignore_patterns("train", "locks"))
    return train_config(cfg, root=dest)


def restrict_selection(root: str | Path, keep: dict[int, int]) -> dict[int, int]:
    """Keep the first keep[shard] rows of each shard in scores/selection.parquet (as a stricter policy
    would); returns shard → kept count. The ledger's selection marker stays valid."""
    r = Root(str(root))
    table = r.read_table("scores", "selection.parquet")
    rows = sorted(table.to_pylist(), key=lambda x: x["row"])
    out, counts = [], {}
    for row in rows:
        if counts.get(row["shard"], 0) < keep.get(row["shard"], 0):
            out.append(row)
            counts[row["shard"]] = counts.get(row["shard"], 0) + 1
    r.write_table(pa.Table.from_pylist(out, schema=table.schema), "scores", "selection.parquet")
    return counts


def live_student(path: str | Path, seed: int = 0, bias: float = 1.0, **overrides):
    """Save a tiny student (seeded) whose last conv bias is `bias` (> 0: outputs start positive)."""
    from student.checkpoint import save_checkpoint
    from student.model import build_student

    torch.manual_seed(seed)
    model = build_student("tiny", **overrides)
    with torch.no_grad():
        model.head.out_conv3.bias.fill_(bias)
    save_checkpoint(model, str(path))
    return model


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    from student.checkpoint import load_checkpoint

    model, _ = load_checkpoint(str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stream_for(cfg: DadConfig, flip: bool | None = None, batch_size: int | None = None, jitter: float | None = None):
    """The TargetStream training would build for cfg (optionally without flips, other batch size)."""
    from stages.train import load_selection
    from student.data import StreamSpec, TargetStream

    t = cfg.train
    spec = StreamSpec(Root(cfg.run.root), tuple(cfg.teachers), cfg.crops.global_size,
                      batch_size or t.batch_size, cfg.run.seed, t.flip if flip is None else flip,
                      t.jitter if jitter is None else jitter, cfg.score.policy == "mix")
    selection, shard_rows = load_selection(Root(cfg.run.root), cfg)
    return TargetStream(spec, selection, shard_rows)


def batches_of(cfg: DadConfig, epoch: int = 0, flip: bool = False) -> list[dict]:
    """Every selected sample of one epoch as batches (world 1), without flips: a fixed evaluation set."""
    from student.data import EpochPlan

    stream = stream_for(cfg, flip=flip, jitter=0.0)
    plan = EpochPlan({s: len(r) for s, r in stream.shard_rows.items()}, cfg.run.seed, 1, cfg.train.batch_size)
    return list(stream.batches(epoch, 0, 1, plan.steps(epoch)))


@torch.no_grad()
def mean_loss(model, batches: list[dict], cfg: DadConfig) -> float:
    from student.losses import LossConfig, distillation_loss

    t = cfg.train
    step_cfg = LossConfig.of(t, feature_loss=False)
    model.eval()
    return float(np.mean([float(distillation_loss(model(b["image"]), b, step_cfg)["total"]) for b in batches]))
