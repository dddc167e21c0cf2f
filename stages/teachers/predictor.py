"""The models stages run and evaluate: a configured teacher or a student checkpoint, as one predict function
returning disparity (so evaluation, prediction and the report treat both alike)."""

from __future__ import annotations

import torch

from pipeline.config import DadConfig
from student.checkpoint import resolve_checkpoint
from student.evaluation import PredictFn, safe_name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(checkpoint: str | None = None, teacher: str | None = None, cfg: DadConfig | None = None,
                   device: str | None = None) -> tuple[PredictFn, str, dict]:
    """(predict_fn returning disparity, default name, description) for a student checkpoint or a
    configured teacher. A teacher gets the image at the evaluation resolution and applies its own
    input rule (a `checkpoint` teacher with `input_size` = that resolution predicts at exactly it)."""
    if bool(checkpoint) == bool(teacher):
        raise ValueError("give exactly one of checkpoint or teacher")
    device = device or default_device()
    if checkpoint:
        from student.checkpoint import load_checkpoint

        path, stem = resolve_checkpoint(str(checkpoint))
        model, _ = load_checkpoint(path, map_location=device)
        model.eval()

        def predict_fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x.to(device))

        return predict_fn, safe_name(stem), {"checkpoint": path}
    from pipeline.cache import as_disparity
    from stages.teachers import build_teacher

    if cfg is None or teacher not in cfg.teachers:
        known = ", ".join(sorted(cfg.teachers)) if cfg else "none (no config)"
        raise ValueError(f"teacher {teacher!r} is not configured (teachers: {known})")
    t = build_teacher(teacher, cfg.teachers[teacher]).to(device)
    space = t.spec.output_space

    def predict_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = t.predict(x.to(device)).float().cpu().numpy()
        return torch.from_numpy(as_disparity(out, space))

    return predict_fn, safe_name(f"teacher-{teacher}"), {"teacher": teacher, **t.spec.as_attrs()}
