"""`checkpoint` adapter: a student checkpoint of this project used as a teacher.

Used for self-distillation and by the embedded default's offline teacher zoo. The input is resized
so its short side is `input_size` (default 252) at a multiple of 14, predicted, and the disparity
resized back to the input size.
"""

from __future__ import annotations

import hashlib

import fsspec
import torch
import torch.nn.functional as F

from pipeline.config import TeacherCfg
from stages.teachers import Teacher, TeacherSpec, resize_to_multiple

DEFAULT_INPUT = 252


class CheckpointTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        from student.checkpoint import load_checkpoint

        self.model, _ = load_checkpoint(tcfg.model)
        self.model.eval()
        self.input_size = tcfg.input_size or DEFAULT_INPUT
        self.spec = self.describe(name, tcfg)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        try:
            with fsspec.open(tcfg.model, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
        except FileNotFoundError:
            raise ValueError(f"teachers.{name}.model: checkpoint {tcfg.model!r} not found") from None
        return TeacherSpec(name, "checkpoint", tcfg.model, tcfg.output_space,
                           f"short side {tcfg.input_size or DEFAULT_INPUT}, multiple of 14", tcfg.license,
                           f"sha256:{digest}")

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        x = resize_to_multiple(rgb.float().to(self.device), self.input_size)
        disp = self.model(x)
        return F.interpolate(disp[:, None], size=rgb.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
