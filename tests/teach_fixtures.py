"""Helpers only the teach-stage and teacher tests use (shared ones: bench/kit).

* `tiny_hf_models`: a tiny Depth Anything and a tiny DPT model saved with `save_pretrained`, each with
  a DPT image processor (size 56, multiple of 14, keep aspect ratio) next to it.
* `HoleyTeacher`: a plugin teacher (`adapter = "teach_fixtures:HoleyTeacher"`, inline runs only) whose
  maps have NaN, inf and float16-overflowing values.
* `tree_hashes`: what "untouched" is checked against; `subprocess_env`, `descendants`, `alive`: `dad`
  subprocesses and the processes they leave.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.config import TeacherCfg
from stages.teachers import TeacherSpec
from stages.teachers.pixel import PixelTeacher


def tree_hashes(folder: Path) -> dict[str, str]:
    """relative path → sha256 of every file under `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- tiny transformers models -----------------------------------------------------------------

def tiny_hf_models(folder: Path, seed: int = 0, kinds: tuple[str, ...] = ("da", "dpt")) -> dict[str, Path]:
    """Save a tiny Depth Anything and/or a tiny DPT (+ image processor) under folder/{da,dpt}."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    da = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32], head_hidden_size=8,
        reassemble_hidden_size=32, patch_size=14)).eval()
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
        patch_size=14, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        head_in_index=-1)).eval()
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  do_pad=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    out = {}
    for name, model in (("da", da), ("dpt", dpt)):
        if name not in kinds:
            continue
        path = Path(folder) / name
        model.save_pretrained(path)
        processor.save_pretrained(path)
        out[name] = path
    return out


def subprocess_env(extra_path: str | None = None) -> dict[str, str]:
    """Environment for `dad` subprocesses: the repository root importable (bench.kit's plugin teachers,
    started in any folder), Ray on 127.0.0.1."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, extra_path, env.get("PYTHONPATH")) if p)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


class HoleyTeacher(PixelTeacher):
    """`model = "holes"`: r+2g, but NaN where R < 0.3, +inf where G < 0.2 and 1e5 (overflows float16)
    where B > 0.9 — what the valid masks and invalid counts are checked against."""

    def __init__(self, name: str, tcfg: TeacherCfg):
        self.spec = self.describe(name, tcfg)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        return TeacherSpec(name, "holey", "holes", tcfg.output_space, "native", tcfg.license, "holes")

    def predict(self, rgb):
        import torch

        x = rgb.float()
        out = 1.0 + x[:, 0] + 2.0 * x[:, 1]
        out = torch.where(x[:, 0] < 0.3, torch.full_like(out, float("nan")), out)
        out = torch.where(x[:, 1] < 0.2, torch.full_like(out, float("inf")), out)
        return torch.where(x[:, 2] > 0.9, torch.full_like(out, 1e5), out)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc), so a test can reap exactly the processes it started."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
