"""The student side of Distill Any Depth: pure torch, no Ray.

- `student.model`: timm DINOv2 encoder + Depth Anything v2 DPT head (`build_student`).
- `student.convert`: initialise a student from a transformers Depth Anything checkpoint.
- `student.checkpoint`: the one weights-only checkpoint format (`save_checkpoint`, `load_checkpoint`).
- `student.losses`: the distillation losses (paper Eq. 1-9, docs/method.md); `distillation_loss` is Eq. 9.
- `student.metrics`: affine-invariant evaluation metrics.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .losses import LossConfig, distillation_loss
from .model import StudentConfig, StudentModel, build_student

__all__ = ["CheckpointError", "LossConfig", "StudentConfig", "StudentModel", "build_student", "distillation_loss",
           "load_checkpoint", "save_checkpoint"]
