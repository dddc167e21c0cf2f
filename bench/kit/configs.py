"""The one config factory for tests and benchmarks: `raw_config`, and a DadConfig or TOML file of it.

A preset gives tiny-run values to some sections (the product's defaults fill in the rest):
* "train" (default) — inline, shards of 5, small crops, two exact `pixel` teachers, a tiny student,
  4 fast deterministic steps: a whole run in seconds on a CPU.
* "fault" — "train" with shards of 2 and a checkpoint every step (the kill trials of issue #9).
* "teach" — inline, shards of 2, small crops, two `pixel` teachers: what shard and teach read.
* "bare" — nothing: only [run] root and [corpus] sources (what config and ledger tests start from).
"""

from __future__ import annotations

import copy
from pathlib import Path

from pipeline.config import DadConfig, dumps_toml, load_config

SMALL_CROPS = {"min_region": 56, "patch": 42, "global_size": 56, "local_store": 28, "local_count": 4}

TEACHERS = {"r2g": {"adapter": "pixel", "model": "r+2g", "prior": 0.7},
            "luma": {"adapter": "pixel", "model": "luma", "prior": 0.3}}

# Fast, tiny, deterministic training defaults.
TRAIN = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0,
         "lr_encoder": 1e-4, "lr_decoder": 1e-3, "jitter": 0.0, "prefetch": 2, "amp": False}

_TEACH = {"run": {"executor": "inline"}, "corpus": {"shard_size": 2}, "crops": SMALL_CROPS, "teachers": TEACHERS}
_TRAIN = {**_TEACH, "corpus": {"shard_size": 5}, "score": {}, "student": {"size": "tiny"}, "train": TRAIN}
PRESETS = {  # preset → section → tiny-run values
    "train": _TRAIN,
    "fault": {**_TRAIN, "corpus": {"shard_size": 2},
              "train": {**TRAIN, "checkpoint_every": 1, "log_every": 1, "prefetch": 0}},
    "teach": _TEACH,
    "bare": {},
}


def raw_config(root, sources, teachers: dict | None = None, *, preset: str = "train",
               shard_size: int | None = None, executor: str | None = None, **sections: dict) -> dict:
    """A raw config: the preset's values, `teachers` replacing the preset's, shard_size/executor if
    given, then each of `sections` (section → {key: value}) merged over its section."""
    srcs = sources if isinstance(sources, (list, tuple)) else [sources]
    raw: dict[str, dict] = {"run": {"root": str(root)}, "corpus": {"sources": [str(s) for s in srcs]}}
    for name, values in copy.deepcopy(PRESETS[preset]).items():
        raw.setdefault(name, {}).update(values)
    if teachers is not None:
        raw["teachers"] = dict(teachers)
    if executor is not None:
        raw["run"]["executor"] = executor
    if shard_size is not None:
        raw["corpus"]["shard_size"] = shard_size
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def demo_teachers() -> tuple[dict, list[str]]:
    """The demo's real teachers (configs/quickstart.toml's sections: TFLite files by URL + sha256) and its
    model mirror as absolute folders — what a benchmark with real teachers runs."""
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    demo = tomllib.loads((repo / "configs" / "quickstart.toml").read_text())
    return demo["teachers"], [str((repo / m).resolve()) for m in demo["run"]["model_mirror"]]


def missing_models(teachers: dict, mirrors: list[str]) -> str | None:
    """Why these teachers' model files cannot be read here (no mirror, no network), or None."""
    from pipeline.models import resolve

    for name, t in teachers.items():
        try:
            resolve(t["model"], t.get("sha256"), mirrors=mirrors, what=f"teachers.{name}.model")
        except Exception as err:  # noqa: BLE001 - any reason is reported as is
            return str(err)
    return None


def dad_config(root, sources, teachers: dict | None = None, **kw) -> DadConfig:
    """`raw_config(...)` validated: what a stage's `run(cfg)` takes."""
    return load_config(raw=raw_config(root, sources, teachers, **kw))


def write_toml(path: str | Path, raw: dict) -> Path:
    """Write a raw config as the product writes TOML (`dumps_toml`): for the CLI and subprocesses."""
    path = Path(path)
    path.write_text(dumps_toml(raw))
    return path
