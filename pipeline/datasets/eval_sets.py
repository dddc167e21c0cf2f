"""`open_dataset("kind:PATH")`: one entry point for every evaluation-set format.

Configs name evaluation sets as strings (`eval.datasets = ["nyu:/data/nyuv2/nyu_labeled_extracted.tar"]`),
so a spec carries both the format and the location. Only the first ':' separates them, so PATH may itself
be a URL (s3://…). Kinds: Marigold's five test sets, `realeval`, `folder`, `scenes` (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.datasets.benchmarks import open_diode, open_eth3d, open_kitti, open_nyu, open_scannet
from pipeline.datasets.evalbase import EvalDataset
from pipeline.datasets.folder import open_folder
from pipeline.datasets.generated import open_scenes
from pipeline.datasets.realeval import open_realeval

OPENERS: dict[str, Callable[..., EvalDataset]] = {
    "realeval": open_realeval, "nyu": open_nyu, "kitti": open_kitti, "eth3d": open_eth3d,
    "scannet": open_scannet, "diode": open_diode, "folder": open_folder,
    "scenes": open_scenes,
}


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in OPENERS:
        raise ValueError(f"evaluation set spec must be 'kind:PATH' with kind in {sorted(OPENERS)}, got {spec!r}")
    return kind, path


def open_dataset(spec: str, **options) -> EvalDataset:
    """`kind:PATH` → EvalDataset. Options go to the loader (e.g. `split_file=`, KITTI `mask="garg"`)."""
    kind, path = parse_spec(spec)
    return OPENERS[kind](path, **options)
