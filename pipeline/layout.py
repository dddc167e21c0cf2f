"""The run root's layout: every path inside a run root is spelled here, and nowhere else.

A path is a tuple of parts for `pipeline.storage.Root` (`root.read_table(*MANIFEST)`), or, with
`rel_path()`, the slash-joined string used in messages and digests. <shard> is six digits (`shard_name`).
Which stage writes and which reads each path: docs/run-root.md.
"""

from __future__ import annotations

Parts = tuple[str, ...]

LISTING: Parts = ("corpus", "listing.parquet")
SOURCES: Parts = ("corpus", "sources.parquet")
MANIFEST: Parts = ("corpus", "manifest.parquet")
REJECTS: Parts = ("corpus", "rejects.parquet")
CORPUS_SHARDS: Parts = ("corpus", "shards")
CORPUS_PARTS: Parts = ("corpus", "parts")
CROP_PLAN: Parts = ("crops", "plan.parquet")

SCORES: Parts = ("scores", "scores.parquet")
SELECTION: Parts = ("scores", "selection.parquet")
SELECTION_SUMMARY: Parts = ("scores", "selection_summary.json")

REPORT_INDEX: Parts = ("report", "index.html")
REPORT_PAGES: Parts = ("report", "pages")

MODEL = "model.pt"          # a training run's final weights
INIT = "init.pt"            # the weights it started from
SUMMARY = "summary.json"    # written with model.pt: the run is complete
METRICS_LOG = "metrics.jsonl"
VAL_LOG = "val.jsonl"
TENSORBOARD = "tb"


def rel_path(parts: Parts) -> str:
    return "/".join(parts)


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def corpus_shard(shard: int) -> Parts:
    return (*CORPUS_SHARDS, f"{shard_name(shard)}.tar")


def corpus_part(shard: int, kind: str) -> Parts:
    """kind: 'manifest' or 'rejects'."""
    return (*CORPUS_PARTS, f"{shard_name(shard)}.{kind}.parquet")


def cache_group(teacher: str) -> Parts:
    return ("cache", teacher)


def score_part(shard: int) -> Parts:
    return ("scores", "parts", f"{shard_name(shard)}.parquet")


def score_plot(name: str) -> Parts:
    return ("scores", "plots", name)


def train_run(name: str, *file: str) -> Parts:
    """train/<name>, or a file in it."""
    return ("train", name, *file)


def eval_run(name: str, *file: str) -> Parts:
    """eval/<name>, or a file (or pictures/<stem>.png) in it."""
    return ("eval", name, *file)


def report_page(name: str) -> Parts:
    return (*REPORT_PAGES, name)
