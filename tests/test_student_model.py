"""Student model (timm DINOv2 + DPT head), DAv2 conversion and the checkpoint format."""

import copy
import io
import logging
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from student.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from student.convert import student_from_depth_anything
from student.model import PRESETS, StudentConfig, StudentModel, build_student

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_student("tiny").eval()


# -- architecture -------------------------------------------------------------------------------


@pytest.mark.parametrize("size,dav2_params", [("small", 24.8e6), ("base", 97.5e6), ("large", 335.3e6)])
def test_parameter_counts_match_depth_anything_v2(size, dav2_params):
    with torch.device("meta"):
        model = StudentModel(StudentConfig(**PRESETS[size]))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - dav2_params) / dav2_params < 0.02


def test_presets_follow_dav2():
    large = StudentConfig(**PRESETS["large"])
    assert large.layers == [4, 11, 17, 23] and large.features == 256 and large.out_channels == [256, 512, 1024, 1024]
    assert StudentConfig(**PRESETS["small"]).layers == [2, 5, 8, 11]


def test_forward_shapes_features_and_non_negative(tiny):
    x = torch.rand(2, 3, 56, 84)
    with torch.no_grad():
        disp, tokens = tiny(x, return_features=True)
    assert disp.shape == (2, 56, 84) and (disp >= 0).all() and disp.std() > 1e-3
    assert tokens.shape == (2, 4 * 6, 96)  # (56/14) * (84/14) patch tokens of the last tapped block
    with torch.no_grad():
        last = tiny.encode((x - MEAN) / STD)[-1]
    torch.testing.assert_close(tokens, last.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("seed", [0, 2])  # seeds whose default-init head would end behind a dead ReLU
def test_a_random_student_can_learn(seed):
    from student.losses import normalized_l1

    torch.manual_seed(seed)
    model = build_student("tiny")
    x = torch.rand(2, 3, 28, 28)
    disp = model(x)
    assert (disp > 0).all()
    normalized_l1(disp, torch.rand(2, 28, 28)).backward()
    assert model.head.out_conv1.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_non_multiple_input_is_reflect_padded(tiny):
    x = torch.rand(1, 3, 50, 71)
    with torch.no_grad():
        disp = tiny(x)
        padded = tiny(F.pad(x, (0, 13, 0, 6), mode="reflect"))
    assert disp.shape == (1, 50, 71)
    torch.testing.assert_close(disp, padded[:, :50, :71])


def test_non_multiple_input_can_be_resized():
    torch.manual_seed(0)
    model = build_student("tiny", fit="resize").eval()
    x = torch.rand(1, 3, 50, 71)  # resized to 56 x 70, prediction resized back
    with torch.no_grad():
        disp = model(x)
        direct = model(F.interpolate(x, (56, 70), mode="bilinear", align_corners=False))
    expected = F.interpolate(direct[:, None], (50, 71), mode="bilinear", align_corners=False)[:, 0]
    assert disp.shape == (1, 50, 71)
    torch.testing.assert_close(disp, expected)


def test_model_pickles_and_deep_copies_with_its_position_resampling(tiny):
    x = torch.rand(1, 3, 70, 42)  # 5 x 3 patches: the 16 x 16 position grid is resampled
    with torch.no_grad():
        expected = tiny(x)
        for clone in (pickle.loads(pickle.dumps(tiny)), copy.deepcopy(tiny)):
            assert type(clone.encoder) is type(tiny.encoder)
            assert torch.equal(clone(x), expected)
        clone.encoder.pos_embed.normal_()  # the copy's position embedding is its own
        assert not torch.allclose(clone(x), expected)


def test_unknown_size_and_bad_fit_are_refused():
    with pytest.raises(ValueError, match="unknown student size"):
        build_student("huge")
    with pytest.raises(ValueError, match="fit must be"):
        build_student("tiny", fit="crop")


# -- encoder weights ----------------------------------------------------------------------------


def test_random_encoder_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="student.model"):
        build_student("tiny")
    assert "random weights" in caplog.text


def _dinov2_layout(encoder_state, chunked: bool):
    """timm's DINOv2 keys -> facebookresearch `dinov2_vits14` keys (mask_token, optional block chunks)."""
    out = {"mask_token": torch.zeros(1, encoder_state["cls_token"].shape[-1])}
    for k, v in encoder_state.items():
        out[k.replace("blocks.", "blocks.0.") if chunked else k] = v
    return out


@pytest.mark.parametrize("layout", ["timm", "dinov2", "dinov2_chunked", "dav2_checkpoint"])
def test_encoder_weights_load_from_local_files(tmp_path, tiny, layout, caplog):
    state = {k: v.clone() for k, v in tiny.encoder.state_dict().items()}
    if layout == "timm":
        path = tmp_path / "enc.pth"
        torch.save(state, path)
    elif layout.startswith("dinov2"):
        path = tmp_path / "dinov2_vits14.pth"
        torch.save(_dinov2_layout(state, chunked=layout.endswith("chunked")), path)
    else:  # a full DAv2 checkpoint: encoder under `pretrained.`, head under `depth_head.`
        path = tmp_path / "dav2.safetensors"
        full = {f"pretrained.{k}": v for k, v in _dinov2_layout(state, False).items()}
        full["depth_head.projects.0.weight"] = torch.zeros(2, 2)
        save_file(full, path)
    with caplog.at_level(logging.WARNING, logger="student.model"):
        model = build_student("tiny", encoder_weights=str(path)).eval()
    assert "random weights" not in caplog.text
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.rand(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[-1], tiny.encode(x)[-1])


def test_encoder_weights_of_another_image_size_are_resampled(tmp_path, tiny):
    state = dict(tiny.encoder.state_dict())  # stored for 224 px: 16 x 16 positions
    path = tmp_path / "enc.pth"
    torch.save(state, path)
    model = build_student("tiny", encoder_weights=str(path), img_size=56)  # 4 x 4 positions
    expected = resample_abs_pos_embed(state["pos_embed"], (4, 4), (16, 16), antialias=False)
    torch.testing.assert_close(model.encoder.pos_embed.data, expected)


def test_encoder_weights_that_do_not_fit_are_refused(tmp_path, tiny):
    state = dict(tiny.encoder.state_dict())
    state.pop("blocks.1.attn.qkv.weight")
    path = tmp_path / "enc.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*blocks.1.attn.qkv.weight"):
        build_student("tiny", encoder_weights=str(path))


# -- Depth Anything (transformers) conversion ---------------------------------------------------


def _tiny_depth_anything(max_depth=1):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4, image_size=56,
                            patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14, max_depth=max_depth)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # every weight and bias non-trivial, output mostly positive
        for p in model.parameters():
            p.add_(0.12 * torch.randn_like(p))
        model.head.conv3.bias.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def depth_anything(tmp_path_factory):
    model = _tiny_depth_anything()
    directory = tmp_path_factory.mktemp("da") / "tiny-da"
    model.save_pretrained(directory)
    return model, directory


@pytest.mark.parametrize("size", [(56, 56), (70, 98), (42, 42), (112, 84)])  # native 4x4 grid and others
def test_converted_student_reproduces_transformers(depth_anything, size):
    hf, directory = depth_anything
    student = student_from_depth_anything(directory).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        ref = hf(pixel_values=(x - MEAN) / STD).predicted_depth
        out = student(x)
    assert ref.shape == out.shape == (2, *size)
    assert ref.std() > 0.02 and (ref > 0).float().mean() > 0.5  # outputs vary: the comparison can fail
    assert (out - ref).abs().max().item() <= 1e-5


def test_conversion_from_an_instance_with_max_depth_folded():
    hf = _tiny_depth_anything(max_depth=3)
    student = student_from_depth_anything(hf).eval()
    x = torch.rand(1, 3, 70, 56)
    with torch.no_grad():
        ref = hf(pixel_values=(x - MEAN) / STD).predicted_depth
        torch.testing.assert_close(student(x), ref, atol=1e-5, rtol=0)


def test_timm_antialiased_position_embedding_would_not_match(depth_anything):
    """Why pos_antialias=False: timm's default resampling differs from HF's off the native grid."""
    hf, directory = depth_anything
    student = student_from_depth_anything(directory).eval()
    timm_style = StudentModel(StudentConfig(**{**student.config.to_dict(), "pos_antialias": True})).eval()
    timm_style.load_state_dict(student.state_dict())
    x = torch.rand(1, 3, 70, 98)
    with torch.no_grad():
        ref = hf(pixel_values=(x - MEAN) / STD).predicted_depth
        assert (timm_style(x) - ref).abs().max() > 2e-4  # 1.6e-3 here; the student matches to 1e-5
        native = torch.rand(1, 3, 56, 56)
        torch.testing.assert_close(timm_style(native), student(native))


def test_conversion_refuses_metric_heads_and_reads_out_features(depth_anything):
    from student.convert import student_config_from_hf

    config = depth_anything[0].config.to_dict()
    config["backbone_config"] = {**config["backbone_config"], "out_indices": None,
                                 "out_features": ["stage2", "stage3", "stage4", "stage4"]}
    assert student_config_from_hf(config).layers == [1, 2, 3, 3]
    config["depth_estimation_type"] = "metric"
    with pytest.raises(ValueError, match="depth_estimation_type"):
        student_config_from_hf(config)


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_path_url_and_fileobj(tmp_path, tiny):
    x = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        expected = tiny(x)
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    extra = {"step": 7, "optimizer": optimizer.state_dict()}
    buffer = io.BytesIO()
    save_checkpoint(tiny, buffer, extra=extra)
    buffer.seek(0)
    for target in [str(tmp_path / "a" / "student.ckpt"), "memory://ckpt/student.ckpt", buffer]:
        if target is not buffer:
            save_checkpoint(tiny, target, extra=extra)
        model, loaded_extra = load_checkpoint(target)
        assert model.config == tiny.config and loaded_extra["step"] == 7
        assert loaded_extra["optimizer"]["param_groups"][0]["lr"] == 1e-3
        with torch.no_grad():
            assert torch.equal(model.eval()(x), expected)
    assert os.listdir(tmp_path / "a") == ["student.ckpt"]  # no temporary file left behind


def test_checkpoint_half_storage(tmp_path, tiny):
    full, half = tmp_path / "full.ckpt", tmp_path / "half.ckpt"
    save_checkpoint(tiny, full)
    save_checkpoint(tiny, half, half=True)
    stored = torch.load(half, weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    model, extra = load_checkpoint(half)
    assert extra is None and next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, tiny.state_dict()[k].half().float())


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"format": "dad.student", "state_dict": _Exploit()}, f, protocol=2)
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"format": "dad.student", "state_dict": _Exploit()}, zipped)
    for p in (path, zipped):
        with pytest.raises(CheckpointError, match="refused by the weights-only loader"):
            load_checkpoint(str(p))
    assert not marker.exists()


def test_incompatible_checkpoints_give_clear_errors(tmp_path, tiny):
    good = torch.load(_saved(tiny, tmp_path / "good.ckpt"), weights_only=True)
    cases = {
        "unknown_field": ({**good, "model_config": {**good["model_config"], "n_experts": 8}}, "does not know"),
        "wrong_shape": ({**good, "model_config": {**good["model_config"], "features": 48}}, "does not fit"),
        "not_ours": ({"state_dict": good["state_dict"]}, "not a dad.student"),
        "newer": ({**good, "version": 99}, "version 99"),
        "bad_encoder": ({**good, "model_config": {**good["model_config"], "encoder": "no_such_vit"}}, "cannot build"),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(path))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    path = _saved(tiny, tmp_path / "student.ckpt")
    before = path.read_bytes()
    other = build_student("tiny", features=16)

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["student.ckpt"]


def _saved(model, path):
    save_checkpoint(model, str(path))
    return path
