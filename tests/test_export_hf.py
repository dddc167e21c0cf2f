"""Exporting a student as a transformers Depth Anything directory (student/convert.py::save_depth_anything).

A seeded random tiny student, perturbed so that every block and conv shapes the output (at init the layer
scale is 1e-5 and the head nearly constant, which would hide a wrong q/k/v split), is exported once; the
directory is then read by transformers itself, by its pipeline, by the `hf` teacher adapter and by the
project's own converter. Nothing is downloaded.
"""

from __future__ import annotations

import re

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import TeacherCfg
from stages.teachers import build_teacher
from student.convert import (
    hf_config_from_student,
    save_depth_anything,
    student_config_from_hf,
    student_from_depth_anything,
)
from student.model import IMAGENET_MEAN, IMAGENET_STD, PRESETS, StudentConfig, StudentModel, build_student

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
TINY_KWARGS = PRESETS["tiny"]["encoder_kwargs"]
REL_TOL = 1e-4  # max |difference| / max |student output|; measured 0 (model, teacher) and 5e-7 (pipeline)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    assert ref.std() > 0.05 * ref.abs().max()  # the output varies: the comparison can fail
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = build_student("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "tiny-da"
    save_depth_anything(student, directory)
    return directory


@pytest.mark.parametrize("size", [(224, 224), (126, 182)])  # native 16x16 grid; 9x13, resampled positions
def test_transformers_model_equals_the_student(student, exported, size):
    hf, info = transformers.AutoModelForDepthEstimation.from_pretrained(exported, output_loading_info=True)
    assert type(hf).__name__ == "DepthAnythingForDepthEstimation"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf.eval()(pixel_values=(x - MEAN) / STD).predicted_depth
        ref = student(x)
    assert ref.shape == (2, *size)
    assert _relative(out, ref) <= REL_TOL


def test_existing_converter_gives_the_same_student_back(student, exported):
    back = student_from_depth_anything(exported)
    original = student.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in back.state_dict().items())
    c, o = back.config, student.config
    assert (c.layers, c.features, c.out_channels, c.head_features, c.img_size) == (
        o.layers, o.features, o.out_channels, o.head_features, o.img_size)


def test_pipeline_uses_the_processor_the_student_expects(student, exported):
    processor = transformers.AutoImageProcessor.from_pretrained(exported)
    assert (processor.size.height, processor.size.width) == (224, 224)  # the student's native size
    assert processor.keep_aspect_ratio and processor.ensure_multiple_of == 14 and processor.do_rescale
    # RGB / 255 then ImageNet mean/std, as StudentModel.forward normalises: a flat colour comes back exactly
    flat = processor(images=Image.new("RGB", (150, 100), (0, 64, 255)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(flat * STD + MEAN, (torch.tensor([0.0, 64, 255]) / 255).view(1, 3, 1, 1).expand_as(flat),
                               atol=1e-6, rtol=0)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    depth = transformers.pipeline("depth-estimation", model=str(exported))(image)["predicted_depth"]
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 154, 224)  # aspect kept (fit width x1.49), multiples of 14
    with torch.no_grad():
        disp = student(pixel_values * STD + MEAN)
    expected = F.interpolate(disp[:, None], size=(100, 150), mode="bicubic", align_corners=False)[0, 0]
    assert _relative(depth, expected) <= REL_TOL


def test_hf_teacher_adapter_predicts_the_student(student, exported):
    teacher = build_teacher("student", TeacherCfg(adapter="hf", model=str(exported))).to("cpu")
    rgb = torch.rand(2, 3, 112, 168, generator=torch.Generator().manual_seed(2))
    assert teacher.preprocess(rgb).shape == (2, 3, 154, 224)  # the written processor's rule
    with torch.no_grad():
        disp = student(F.interpolate(rgb, size=(154, 224), mode="bicubic", antialias=True, align_corners=False))
    expected = F.interpolate(disp[:, None], size=(112, 168), mode="bilinear", align_corners=False)[:, 0]
    assert _relative(teacher.predict(rgb), expected) <= REL_TOL


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_every_preset_has_a_transformers_config(size):
    config = StudentConfig(**PRESETS[size])
    hf = hf_config_from_student(config)
    back = student_config_from_hf(transformers.DepthAnythingConfig.from_dict(hf).to_dict())
    assert (back.layers, back.features, back.out_channels, back.head_features, back.img_size) == (
        config.layers, config.features, config.out_channels, config.head_features, config.img_size)
    with torch.device("meta"):
        shapes = [{k: v.shape for k, v in StudentModel(c).state_dict().items()} for c in (config, back)]
    assert shapes[0] == shapes[1]


def test_layers_map_to_the_blocks_timm_takes():
    config = StudentConfig(**{**PRESETS["tiny"], "layers": [-1, 0, 1, 2]})  # timm takes blocks 0..3 in order
    assert hf_config_from_student(config)["backbone_config"]["out_indices"] == [1, 2, 3, 4]


@pytest.mark.parametrize("overrides,message", [
    ({"pos_antialias": True}, "pos_antialias=True"),
    ({"encoder": "vit_small_patch14_reg4_dinov2"}, "encoder='vit_small_patch14_reg4_dinov2'.*register tokens"),
    ({"encoder_kwargs": {**TINY_KWARGS, "mlp_ratio": 2.5}}, "mlp_ratio=2.5"),
    ({"encoder_kwargs": {**TINY_KWARGS, "act_layer": "gelu_tanh"}}, "'act_layer': 'gelu_tanh'.*exact GELU"),
    ({"encoder_kwargs": {**TINY_KWARGS, "init_values": 0.0}}, "'init_values': 0.0.*ls1.gamma"),
    ({"encoder_kwargs": {**TINY_KWARGS, "qk_norm": True}}, "'qk_norm': True.*q_norm"),
    ({"layers": [0, 1, 1, 3]}, re.escape("layers=[0, 1, 1, 3]")),
    ({"fit": "crop"}, "fit must be"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        hf_config_from_student(StudentConfig(**{**PRESETS["tiny"], **overrides}))


def test_a_refused_model_writes_nothing(tmp_path):
    model = build_student("tiny", pos_antialias=True)
    with pytest.raises(ValueError, match="pos_antialias"):
        save_depth_anything(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_to_an_fsspec_url_writes_the_same_files(student, exported):
    save_depth_anything(student, "memory://export/tiny-da")
    fs = fsspec.filesystem("memory")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert fs.cat_file(f"/export/tiny-da/{name}") == (exported / name).read_bytes(), name
