"""Helpers only the train-stage and data-stream tests use (shared ones — `build_cached_run`,
`live_student`, `weights`, `stream_for` — are in bench/kit/train.py).

* `cached_run_with_student(folder)`: a cached tiny run set to train from a saved live student.
* `copy_run(cfg, dest)`: a copy of a cached run root for a test that trains.
* `train_config(cfg, root=…, **train)`: the same run with other `[train]`/`[score]`/`[run]` values.
* `restrict_selection(root, keep)`: keep only the first n selected rows of each shard (uneven shards).
* `same_weights(a, b)`, `batches_of(cfg, …)`, `mean_loss(model, batches, cfg)`: what tests compare.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.kit.train import build_cached_run, live_student, stream_for
from pipeline.config import DadConfig, load_config
from pipeline.storage import Root


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


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """The same tensors under the same names, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def batches_of(cfg: DadConfig, epoch: int = 0, flip: bool = False) -> list[dict]:
    """Every selected sample of one epoch as batches (world 1), without flips: a fixed evaluation set."""
    from student.data import EpochPlan

    stream = stream_for(cfg, flip=flip, jitter=0.0)
    plan = EpochPlan({s: len(r) for s, r in stream.shard_rows.items()}, cfg.run.seed, 1, cfg.train.batch_size)
    return list(stream.batches(epoch, 0, 1, plan.steps(epoch)))


@torch.no_grad()
def mean_loss(model, batches: list[dict], cfg: DadConfig) -> float:
    """The distillation loss of `model` averaged over fixed batches: did training lower it?"""
    from student.losses import LossConfig, distillation_loss

    t = cfg.train
    step_cfg = LossConfig.of(t, feature_loss=False)
    model.eval()
    return float(np.mean([float(distillation_loss(model(b["image"]), b, step_cfg)["total"]) for b in batches]))
