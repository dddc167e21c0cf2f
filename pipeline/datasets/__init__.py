"""Datasets: evaluation formats (eval_sets) and rendered scenes."""

from pipeline.datasets.eval_sets import open_dataset
from pipeline.datasets.evalbase import EvalDataset, EvalSample

__all__ = ["EvalDataset", "EvalSample", "open_dataset"]
