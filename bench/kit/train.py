"""Training helpers: a cached tiny run, a seeded student, the stream training reads, saved weights.

Why `live_student`: the student ends in ReLU(conv(·)); with PyTorch's default init the last conv's
output is nearly constant around a random bias, so about half of all random heads output 0
everywhere and the ReLU passes no gradient. student/model.py starts that bias at 1; the helpers set
it explicitly too, so they do not depend on that default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.kit.configs import dad_config
from bench.kit.images import write_photos, write_ramps
from pipeline.config import DadConfig
from pipeline.storage import Root


def build_cached_run(folder: Path, n_images: int = 15, shard_size: int = 5, teachers: dict | None = None,
                     sizes=((96, 72), (80, 80), (72, 90)), images: str = "ramps", **sections) -> DadConfig:
    """shard → teach → score (inline) a tiny corpus (colour ramps, or `images="photos"`) under
    folder/root; returns the config (`sections` as in `raw_config`)."""
    import stages.score
    import stages.shard
    import stages.teach

    folder = Path(folder)
    src = (write_ramps if images == "ramps" else write_photos)(folder / "src", n_images, sizes=sizes)
    cfg = dad_config(folder / "root", src, teachers, shard_size=shard_size, **sections)
    stages.shard.run(cfg)
    stages.teach.run(cfg)
    stages.score.run(cfg)
    return cfg


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
    """name → tensor of a saved checkpoint: what "the same model" is checked against."""
    from student.checkpoint import load_checkpoint

    model, _ = load_checkpoint(str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


def stream_for(cfg: DadConfig, flip: bool | None = None, batch_size: int | None = None, jitter: float | None = None):
    """The TargetStream training would build for cfg (optionally without flips, other batch size)."""
    from stages.train import read_selection
    from student.data import StreamSpec, TargetStream

    t = cfg.train
    spec = StreamSpec(Root(cfg.run.root), tuple(cfg.teachers), cfg.crops.global_size,
                      batch_size or t.batch_size, cfg.run.seed, t.flip if flip is None else flip,
                      t.jitter if jitter is None else jitter, cfg.score.policy == "mix")
    selection, shard_rows = read_selection(Root(cfg.run.root), cfg)
    return TargetStream(spec, selection, shard_rows)
