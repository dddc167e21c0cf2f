"""A teacher whose prediction is a fixed function of each pixel's colour — for tests and debugging.

`model = "r+2g"` predicts disparity 1 + R + 2G per pixel. Because the output depends on nothing
but the pixel itself, its prediction on a local patch must equal its global prediction cut at that
patch: exactly the property that proves boxes, resampling and storage line up (issue #3). It also
measures the pipeline's own overhead (a teacher that costs nothing).
"""

from __future__ import annotations

import torch

from pipeline.config import TeacherCfg, fingerprint
from stages.teachers import Teacher, TeacherSpec

FUNCTIONS = {
    "r+2g": lambda x: 1.0 + x[:, 0] + 2.0 * x[:, 1],
    "luma": lambda x: 1.0 + 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2],
    "constant": lambda x: torch.ones_like(x[:, 0]),
}


class PixelTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        if tcfg.model not in FUNCTIONS:
            raise ValueError(f"teachers.{name}.model: pixel teacher functions are {sorted(FUNCTIONS)}")
        self.fn = FUNCTIONS[tcfg.model]
        self.spec = self.describe(name, tcfg)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        return TeacherSpec(name, "pixel", tcfg.model, tcfg.output_space, "native", tcfg.license,
                           fingerprint(tcfg.model))

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.fn(rgb.float())
