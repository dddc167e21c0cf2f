"""The `tflite` adapter on the real pretrained files of ../shared/models, against LiteRT called directly.

Bit-for-bit agreement when the input already has the model's size; FastDepth's uint8 output
dequantized to metres; PyDNet++'s three outputs picked by `output_index`; a corrupt file refused with
a message; PyDNet v2 through `dad eval` on realeval reproduces the models README (AbsRel 0.133).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import TeacherCfg
from stages.teachers import build_teacher, spec_for

litert = pytest.importorskip("ai_edge_litert.interpreter")
REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("DAD_TEST_MODELS", REPO.parent / "shared" / "models"))
REALEVAL = REPO.parent / "shared" / "data" / "realeval"
PYDNET, FASTDEPTH, PYDNETPP = (MODELS / f for f in ("pydnet_v2_384x640_fp16.tflite", "fastdepth_nyu_224_int8.tflite",
                                                  "pydnetpp_matterport_448x640.tflite"))
pytestmark = pytest.mark.skipif(not PYDNET.exists(), reason=f"pretrained models not found in {MODELS}")


def realeval_images(n: int = 3) -> list[np.ndarray]:
    files = sorted((REALEVAL / "rgb").glob("*.png"))[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def direct(path: Path, x: np.ndarray, output: int = 0) -> np.ndarray:
    """LiteRT called by hand: the reference the adapter must reproduce."""
    interp = litert.Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[output]
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return interp.get_tensor(out["index"])


def at_model_size(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255


def test_pydnet_matches_litert_bit_for_bit():
    teacher = build_teacher("pydnet", TeacherCfg(adapter="tflite", model=str(PYDNET), torch_threads=1))
    images = [at_model_size(img, 384, 640) for img in realeval_images()]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    pred = teacher.predict(batch).numpy()
    for i, x in enumerate(images):
        ref = direct(PYDNET, x[None])[0, ..., 0]
        assert np.array_equal(pred[i], ref)
    assert pred.shape == (3, 384, 640) and np.ptp(pred[0]) > 0


def test_fastdepth_uint8_is_quantized_in_and_dequantized_to_metres():
    teacher = build_teacher("fd", TeacherCfg(adapter="tflite", model=str(FASTDEPTH), output_space="metric_depth",
                                             torch_threads=1))
    images = [at_model_size(img, 224, 224) for img in realeval_images()]
    pred = teacher.predict(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)).numpy()
    interp = litert.Interpreter(model_path=str(FASTDEPTH))
    scale, zero = interp.get_output_details()[0]["quantization"]
    for i, x in enumerate(images):
        q = np.round(x * 255).astype(np.uint8)  # input quantization of this file: scale 1/255, zero point 0
        ref = (direct(FASTDEPTH, q[None])[0, ..., 0].astype(np.float32) - zero) * scale
        assert np.array_equal(pred[i], ref)
    assert 0.05 < scale < 0.1 and 0.3 < float(np.median(pred)) < 18  # metres: a room, not raw uint8 codes


def test_multi_output_model_with_and_without_output_index():
    img = at_model_size(realeval_images(1)[0], 448, 640)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    maps = []
    for index in (None, 0, 2):
        cfg = TeacherCfg(adapter="tflite", model=str(PYDNETPP), output_space="depth", torch_threads=1,
                         **({} if index is None else {"output_index": index}))
        maps.append(build_teacher("pp", cfg).predict(x)[0].numpy())
    assert np.array_equal(maps[0], maps[1])                      # default = output 0
    assert np.array_equal(maps[2], direct(PYDNETPP, img[None], output=2)[0, ..., 0])
    assert not np.array_equal(maps[1], maps[2])
    with pytest.raises(ValueError, match="output_index = 3, but the model has 3 output"):
        spec_for("pp", TeacherCfg(adapter="tflite", model=str(PYDNETPP), output_index=3))


def test_other_sizes_are_resized_in_and_out_and_letterbox_keeps_the_aspect():
    img = torch.from_numpy(at_model_size(realeval_images(1)[0], 300, 400)).permute(2, 0, 1)[None]
    for resize in ("stretch", "letterbox"):
        t = build_teacher("p", TeacherCfg(adapter="tflite", model=str(PYDNET), resize=resize, torch_threads=1))
        out = t.predict(img)
        assert out.shape == (1, 300, 400) and torch.isfinite(out).all()
    box = __import__("stages.teachers.tflite", fromlist=["_letterbox"])._letterbox(img, 384, 640)[1]
    assert box == (0, 64, 384, 576)  # 300×400 → 384×512, centred in 640 columns


def test_flip_average_is_the_mean_of_both_passes():
    x = torch.from_numpy(at_model_size(realeval_images(1)[0], 384, 640)).permute(2, 0, 1)[None]
    plain = build_teacher("p", TeacherCfg(adapter="tflite", model=str(PYDNET), torch_threads=1))
    flipped = build_teacher("p", TeacherCfg(adapter="tflite", model=str(PYDNET), torch_threads=1, flip_average=True))
    expect = 0.5 * (plain.predict(x) + plain.predict(x.flip(-1)).flip(-1))
    assert torch.equal(flipped.predict(x), expect)
    assert flipped.spec.fingerprint != plain.spec.fingerprint and "flip-averaged" in flipped.spec.input_rule


def test_spec_fingerprint_is_the_files_digest(tmp_path):
    import hashlib

    spec = spec_for("p", TeacherCfg(adapter="tflite", model=str(PYDNET)))
    assert spec.weights_id == "sha256:" + hashlib.sha256(PYDNET.read_bytes()).hexdigest()
    copy = tmp_path / "renamed.tflite"
    copy.write_bytes(PYDNET.read_bytes())
    assert spec_for("other-name", TeacherCfg(adapter="tflite", model=str(copy))).fingerprint == spec.fingerprint


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_is_refused_with_a_message(tmp_path, damage):
    data = PYDNET.read_bytes()
    bad = tmp_path / "bad.tflite"
    bad.write_bytes({"truncated": data[: len(data) // 3], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(ValueError, match="not a loadable TensorFlow Lite model"):
        build_teacher("bad", TeacherCfg(adapter="tflite", model=str(bad)))


@pytest.mark.timeout(300)
def test_pydnet_through_dad_eval_reproduces_the_models_readme(tmp_path):
    """README of ../shared/models: PyDNet v2 (input stretched to 384×640) AbsRel 0.133 on realeval."""
    from pipeline.cli import app

    cfg = tmp_path / "dad.toml"
    cfg.write_text(f'[run]\nroot = "{tmp_path / "root"}"\nexecutor = "inline"\n[corpus]\nsources = ["unused"]\n'
                   f'[teachers.pydnet]\nadapter = "tflite"\nmodel = "{PYDNET}"\n'
                   f'[eval]\ndatasets = ["realeval:{REALEVAL}"]\nalign = "inverse_depth"\nresolution = 392\n'
                   f'pictures = 0\n')
    result = CliRunner().invoke(app, ["eval", "-c", str(cfg), "--teacher", "pydnet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "root" / "eval" / "teacher-pydnet" / "metrics.json").read_text())
    (summary,) = metrics["datasets"].values()
    assert summary["n"] == 15
    assert abs(summary["abs_rel"] - 0.133) <= 0.005, summary["abs_rel"]
