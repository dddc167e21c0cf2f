"""The `onnx` teacher adapter, on files exported in the test from the tiny student and from small modules.

Predictions are compared with the torch module that was exported: within TOL (max |difference| relative
to the largest |torch| value; float32 kernels only sum in another order, measured ~2e-7).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TeacherCfg
from pipeline.models import ModelFileError, sha256_file
from stages.export import export_onnx
from stages.teachers import build_teacher, spec_for
from stages.teachers.tflite import _letterbox, _resized
from student.model import build_student

torch.set_num_threads(1)
TOL = 1e-4


def vivid_student(seed: int):
    """The tiny student with seeded random weights, its last conv rescaled: a random head is ~constant
    (std 0.005), which would let a wrong resize or crop pass unnoticed; this one's maps vary (std ~0.25)."""
    torch.manual_seed(seed)
    model = build_student("tiny").eval()
    probe = torch.rand(2, 3, 70, 98, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        offset = model(probe).mean() - 1
        model.head.out_conv3.weight.mul_(60)
        model.head.out_conv3.bias.copy_(1 - 60 * offset)
    return model


def images(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def onnx_cfg(path, **kw) -> TeacherCfg:
    return TeacherCfg(adapter="onnx", model=str(path), **kw)


def export_module(module: nn.Module, path, example: torch.Tensor, output: str, dynamic: bool = True) -> str:
    axes = {"x": {0: "b", 2: "h", 3: "w"}, output: {0: "b"}} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=[output],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return str(path)


@pytest.fixture(scope="module")
def student():
    return vivid_student(0)


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    export_onnx(student, str(path))
    return str(path)


@torch.no_grad()
def test_predictions_equal_torch_at_two_sizes(student, exported):
    teacher = build_teacher("s", onnx_cfg(exported))
    for shape in ((2, 3, 70, 98), (1, 3, 45, 61)):
        x = images(*shape)
        got, ref = teacher.predict(x), student(x)
        assert got.shape == ref.shape == (shape[0], *shape[2:])
        print(f"onnx vs torch {shape}: max abs {(got - ref).abs().max().item():.2e}, rel {rel_diff(got, ref):.2e}")
        assert ref.std() > 0.1 and rel_diff(got, ref) < TOL


@torch.no_grad()
def test_dynamic_batch_runs_in_one_call(exported, monkeypatch):
    teacher = build_teacher("s", onnx_cfg(exported))
    calls, run = [], teacher.session.run
    monkeypatch.setattr(teacher.session, "run", lambda *a, **k: calls.append(a[1]["rgb"].shape) or run(*a, **k))
    x = images(3, 3, 56, 70, seed=1)
    together = teacher.predict(x)
    assert calls == [(3, 3, 56, 70)]
    alone = torch.cat([teacher.predict(x[i:i + 1]) for i in range(3)])
    assert rel_diff(together, alone) < 1e-5


class FixedNHWC(nn.Module):
    """A mobile-style export: one NHWC image of a fixed size, normalised input, a (1,H,W,1) output."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model(x.permute(0, 3, 1, 2) * self.std + self.mean)[..., None]


@torch.no_grad()
def test_fixed_shape_nhwc_model_loops_and_resizes(student, tmp_path, monkeypatch):
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    path = export_module(FixedNHWC(student, mean, std), tmp_path / "fixed.onnx", images(1, 56, 84, 3), "depth",
                         dynamic=False)
    x = images(2, 3, 70, 98, seed=2)
    for resize in ("stretch", "letterbox"):
        teacher = build_teacher("m", onnx_cfg(path, input_mean=mean, input_std=std, resize=resize))
        assert teacher.spec.input_rule.startswith(f"{resize} to 56x84, NHWC")
        calls, run = [], teacher.session.run
        monkeypatch.setattr(teacher.session, "run", lambda *a, run=run, calls=calls, **k: calls.append(1) or run(*a, **k))
        got = teacher.predict(x)
        if resize == "stretch":
            pred = student(_resized(x, 56, 84))[:, None]
        else:
            padded, (y0, x0, y1, x1) = _letterbox(x, 56, 84)
            pred = student(padded)[:, None, y0:y1, x0:x1]
        ref = F.interpolate(pred, size=(70, 98), mode="bilinear", align_corners=False)[:, 0]
        assert len(calls) == 2 and got.shape == (2, 70, 98)
        assert rel_diff(got, ref) < TOL, resize


def test_output_that_is_not_one_map_per_image_is_refused(tmp_path):
    two = export_module(nn.Conv2d(3, 2, 1), tmp_path / "two.onnx", images(1, 3, 8, 8), "two_maps")
    with pytest.raises(ValueError, match=r"output 'two_maps' has shape \['b', 2, "):
        build_teacher("t", onnx_cfg(two))

    class Pooled(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    pooled = export_module(Pooled(), tmp_path / "pooled.onnx", images(1, 3, 8, 8), "logits")
    with pytest.raises(ValueError, match=r"output 'logits' has shape \['b', 3\]"):
        spec_for("t", onnx_cfg(pooled))
    with pytest.raises(ValueError, match="output_index = 1, but the model has 1 output"):
        build_teacher("t", onnx_cfg(pooled, output_index=1))


def test_corrupt_file_is_refused(exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 50)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(Path(exported).read_bytes()[:20_000])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match="is not a loadable ONNX model"):
            build_teacher("c", onnx_cfg(path))
        with pytest.raises(ValueError, match="is not a loadable ONNX model"):
            spec_for("c", onnx_cfg(path))


def test_fingerprint_is_the_file_digest(exported, tmp_path):
    spec = spec_for("s", onnx_cfg(exported))
    assert spec.weights_id == f"sha256:{sha256_file(exported)}"
    moved = tmp_path / "renamed.onnx"
    shutil.copy(exported, moved)
    assert spec_for("other", onnx_cfg(moved)).fingerprint == spec.fingerprint  # same bytes, same targets
    export_onnx(vivid_student(1), str(moved))
    changed = spec_for("other", onnx_cfg(moved))
    assert changed.weights_id == f"sha256:{sha256_file(moved)}" and changed.fingerprint != spec.fingerprint


def test_pinned_sha256_is_checked(exported):
    sha = sha256_file(exported)
    assert build_teacher("s", onnx_cfg(exported, sha256=sha)).spec.weights_id == f"sha256:{sha}"
    with pytest.raises(ModelFileError, match="refusing it"):
        build_teacher("s", onnx_cfg(exported, sha256="0" * 64))


def test_missing_onnxruntime_says_what_to_install(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=r"pip install 'dad-pipeline\[onnx\]'"):
        build_teacher("s", onnx_cfg(exported))


def test_providers_and_threads(exported, monkeypatch):
    seen, real = [], ort.InferenceSession

    def recording(path, sess_options, providers):
        seen.append((providers, sess_options.intra_op_num_threads))
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", recording)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    build_teacher("s", onnx_cfg(exported, num_gpus=1, num_cpus=3))
    build_teacher("s", onnx_cfg(exported, torch_threads=2))
    assert seen == [(["CUDAExecutionProvider", "CPUExecutionProvider"], 3), (["CPUExecutionProvider"], 2)]
