"""`hf` adapter: any transformers `AutoModelForDepthEstimation` (Depth Anything v1/v2, DPT/MiDaS,
ZoeDepth, Depth Pro, …) from a hub id — pinned with a revision — or a local directory.

The model's own image processor does the preprocessing (its resize rule, multiple of 14/32, mean/std), so
a teacher sees exactly what its authors fed it; the prediction is resized back to the input size. Declare
the output space: relative DA/DPT models predict disparity, ZoeDepth and Depth Pro metric depth. Config
example: README, "Teachers".
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import TeacherCfg
from stages.teachers import Teacher, TeacherSpec

log = logging.getLogger("dad.teachers.hf")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelRef:
    location: str            # hub id or local directory
    revision: str | None
    local: bool

    @property
    def identity(self) -> str:
        return f"local:{_hash_dir(self.location)}" if self.local else f"hub:{self.location}@{self.revision or 'main'}"


def parse_model_ref(model: str, revision: str | None = None) -> ModelRef:
    """'org/name', 'org/name@rev', a local directory or file:// URL → ModelRef (no network)."""
    if model.startswith("file://"):
        model = model[len("file://"):]
    if not model.strip():
        raise ValueError("hf teacher: empty model reference (expected 'org/name[@revision]' or a local directory)")
    if Path(model).expanduser().exists() or model.startswith(("/", "./", "../", "~")):
        path = str(Path(model).expanduser())
        if not Path(path).is_dir():
            raise ValueError(f"hf teacher: local model directory {model!r} does not exist")
        return ModelRef(path, None, True)
    name, _, at_rev = model.partition("@")
    if not HUB_ID.match(name):
        raise ValueError(f"hf teacher: {model!r} is neither a local directory nor a hub id like 'org/name[@revision]'")
    if at_rev and revision and at_rev != revision:
        raise ValueError(f"hf teacher: revision given twice ({at_rev!r} in model, {revision!r} in revision)")
    return ModelRef(name, at_rev or revision, False)


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        f = Path(path) / name
        if f.exists():
            h.update(name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


class HFTeacher(Teacher):
    def __init__(self, name: str, tcfg: TeacherCfg):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        ref = parse_model_ref(tcfg.model, tcfg.revision)
        if not ref.local and ref.revision is None:
            log.warning("teacher %s: hub model %s has no pinned revision; its targets may change upstream", name, ref.location)
        kwargs = {"revision": ref.revision} if ref.revision else {}
        self.model = AutoModelForDepthEstimation.from_pretrained(ref.location, **kwargs).eval()
        self.processor = AutoImageProcessor.from_pretrained(ref.location, **kwargs)
        if tcfg.input_size:
            self.processor.size = {"height": tcfg.input_size, "width": tcfg.input_size}
        self.spec = self.describe(name, tcfg, ref)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg, ref: ModelRef | None = None) -> TeacherSpec:
        ref = ref or parse_model_ref(tcfg.model, tcfg.revision)
        rule = f"processor{'' if not tcfg.input_size else f' size={tcfg.input_size}'}"
        return TeacherSpec(name, "hf", tcfg.model, tcfg.output_space, rule, tcfg.license, ref.identity)

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        return self

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] → the model's pixel_values, via its own processor."""
        images = [img.float().cpu() for img in rgb]
        batch = self.processor(images=images, return_tensors="pt", do_rescale=False)
        return batch["pixel_values"].to(self.device)

    @torch.no_grad()
    def predict(self, rgb: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(rgb)).predicted_depth
        if out.dim() == 4:
            out = out[:, 0]
        return F.interpolate(out[:, None].float(), size=rgb.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
