"""`dad export`: a saved tiny checkpoint in a fake train folder → model.onnx + model card, then the file back
through the `onnx` teacher adapter, configured from the card's own `[teachers.<name>]` section.

Tolerance: max |onnx teacher - torch checkpoint| within TOL of the largest |torch| value (measured ~1e-6).
"""

from __future__ import annotations

import json
import logging
import tomllib

import pytest
import torch
from test_teachers_onnx import TOL, images, rel_diff, vivid_student
from torch import nn
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import TeacherCfg
from pipeline.models import sha256_file
from stages import export
from stages.teachers import build_teacher
from student.checkpoint import load_checkpoint, save_checkpoint

torch.set_num_threads(1)
TEACHERS = {"dav2": {"license": "CC-BY-NC-4.0", "model": "depth-anything/Depth-Anything-V2-Large-hf",
                     "fingerprint": "f1"},
            "pydnet": {"license": "Apache-2.0", "model": "pydnet_v2.tflite", "fingerprint": "f2"}}


def scores(abs_rel: float, delta1: float) -> dict:
    return {"n": 15, "abs_rel": abs_rel, "delta1": delta1}


pytestmark = pytest.mark.usefixtures("root_logger_restored")


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A run root with train/v1 (model.pt + summary.json with teachers and licences), eval/v1 and a config."""
    root = tmp_path_factory.mktemp("run")
    ckpt = root / "train" / "v1" / "model.pt"
    save_checkpoint(vivid_student(0), str(ckpt))
    summary = {"steps": 40, "teachers": TEACHERS, "label_licenses": ["Apache-2.0", "CC-BY-NC-4.0"],
               "corpus": {"sources": ["photos/"], "images": 128}}
    (ckpt.parent / "summary.json").write_text(json.dumps(summary))
    metrics = {"model": {"checkpoint": str(ckpt)}, "protocol": {"align": "disparity", "resolution": 518},
               "datasets": {"realeval": {**scores(0.123, 0.851), "baselines": {"constant": scores(0.3, 0.5),
                                                                               "vertical_ramp": scores(0.25, 0.6)}}}}
    (root / "eval" / "v1").mkdir(parents=True)
    (root / "eval" / "v1" / "metrics.json").write_text(json.dumps(metrics))
    (root / "dad.toml").write_text(f'[run]\nroot = "{root}"\n[corpus]\nsources = ["{root}/photos"]\n')
    return root


@torch.no_grad()
def test_cli_export_writes_a_file_the_onnx_teacher_runs_like_torch(run_root, tmp_path):
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(run_root / "train" / "v1"), "--out", str(out),
                                      "-c", str(run_root / "dad.toml")])
    assert result.exit_code == 0, result.output
    assert "✓ export" in result.output and "license=CC-BY-NC-4.0" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "model.onnx", "model_card.json"]

    card = json.loads((out / "model_card.json").read_text())
    model, _ = load_checkpoint(str(run_root / "train" / "v1" / "model.pt"))
    assert card["name"] == "v1" and card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["license"] == "CC-BY-NC-4.0" and card["teachers"] == TEACHERS
    assert card["files"]["model.onnx"]["sha256"] == sha256_file(out / "model.onnx")
    assert card["metrics"]["datasets"]["realeval"]["abs_rel"] == 0.123
    assert card["verification"]["max_rel_diff"] < export.TOLERANCE
    text = (out / "MODEL_CARD.md").read_text()
    for needle in ("| dav2 |", "CC-BY-NC-4.0", "| pydnet |", "Apache-2.0", "| realeval | 15 | 0.1230 | 0.8510 |",
                   '"images": 128', "steps: 40", "(batch, 3, height, width)", "[teachers.v1]"):
        assert needle in text, needle

    section = tomllib.loads(card["teacher_config"])["teachers"]["v1"]
    assert section["adapter"] == "onnx" and section["license"] == "CC-BY-NC-4.0"
    teacher = build_teacher("v1", TeacherCfg(**section))
    for shape in ((2, 3, 64, 90), (1, 3, 98, 42)):
        x = images(*shape, seed=3)
        got, ref = teacher.predict(x), model.eval()(x)
        print(f"exported vs checkpoint {shape}: max abs {(got - ref).abs().max().item():.2e}, "
              f"rel {rel_diff(got, ref):.2e}")
        assert got.shape == ref.shape and rel_diff(got, ref) < TOL


@torch.no_grad()
def test_hf_export_writes_a_depth_anything_folder_and_the_card(run_root, tmp_path):
    from student.convert import student_from_depth_anything

    out = tmp_path / "hf"
    result = export.run(str(run_root / "train" / "v1"), str(out), fmt="hf")
    assert result["format"] == "hf" and result["license"] == "CC-BY-NC-4.0"
    card = json.loads((out / "model_card.json").read_text())
    assert sorted(card["files"]) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    section = tomllib.loads(card["teacher_config"])["teachers"]["v1"]
    assert section["adapter"] == "hf" and section["model"] == str(out) and card["verification"] is None
    model, _ = load_checkpoint(str(run_root / "train" / "v1" / "model.pt"))
    x = images(1, 3, 56, 70, seed=4)
    assert rel_diff(student_from_depth_anything(str(out)).eval()(x), model.eval()(x)) < TOL


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())  # rich wraps the one message at the runner's 80 columns
    assert message.startswith("error: checkpoint") and message.count("error:") == 1, result.output
    assert f"{missing}' not found" in message and "Traceback" not in message
    assert not (tmp_path / "o").exists()


def test_a_summary_without_licences_says_unknown_and_warns(tmp_path, caplog):
    ckpt = tmp_path / "train" / "old" / "ckpt-0000040.pt"
    save_checkpoint(vivid_student(2), str(ckpt))
    (ckpt.parent / "summary.json").write_text(json.dumps({"steps": 40}))
    with caplog.at_level(logging.WARNING, logger="dad.export"):
        result = export.run(str(ckpt), str(tmp_path / "out"))
    assert result["name"] == "old" and result["license"] == "unknown"
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["teachers"] == card["label_licenses"] == "unknown" and card["metrics"] is None
    assert "records no teachers/licences" in caplog.text
    assert 'license = "unknown"' in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_most_restrictive_licence():
    assert export.most_restrictive(["MIT", "Apache-2.0"]) == "Apache-2.0 AND MIT"
    assert export.most_restrictive(["MIT", "CC-BY-SA-4.0"]) == "CC-BY-SA-4.0"
    assert export.most_restrictive(["Apache-2.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0"]) == "CC-BY-NC-4.0"
    assert export.most_restrictive(["CC-BY-NC-4.0", "unknown"]) == "unknown"
    assert export.most_restrictive([]) == "unknown"


class Drifting(nn.Module):
    """Its output grows with every call, so no exported file can agree with it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x[:, 0] * self.calls


def test_a_file_that_disagrees_with_torch_is_not_kept(tmp_path):
    with pytest.raises(ValueError, match="disagrees with torch"):
        export.export_onnx(Drifting(), str(tmp_path / "model.onnx"))
    assert list(tmp_path.iterdir()) == []
