"""stages/predict.py: npy at the original size, colour PNGs, batching, globs, bad inputs reported."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages import predict as predict_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = 28



@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from student.checkpoint import save_checkpoint
    from student.model import build_student

    torch.manual_seed(0)
    model = build_student("tiny").eval()
    torch.nn.init.constant_(model.head.out_conv3.bias, 1.0)  # non-zero, non-flat output
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(model, str(path))
    return model, str(path)


@pytest.fixture
def images(tmp_path, media):
    """Two 40×30 images (one JPEG), one 50×36 in a sub-folder, a corrupt .jpg and a text file."""
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(media.image_bytes(40, 30, "png", seed=1))
    (d / "b.jpg").write_bytes(media.image_bytes(40, 30, "jpeg", seed=2))
    (d / "sub" / "c.png").write_bytes(media.image_bytes(50, 36, "png", seed=3))
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


def _decoded(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_predict_writes_npy_at_original_size_and_pngs(student, images, tmp_path):
    from student.infer import predict_disparity

    model, ckpt = student
    out = tmp_path / "out"
    summary = predict_stage.run([str(images)], str(out), checkpoint=ckpt, resolution=RES, side_by_side=True,
                                batch_size=2)
    assert summary["stage"] == "predict" and summary["written"] == 3 and summary["failed"] == 1
    assert summary["failures"][0]["input"].endswith("bad.jpg") and summary["failures"][0]["reason"]
    for stem, (w, h), src in (("a", (40, 30), "a.png"), ("b", (40, 30), "b.jpg"), ("c", (50, 36), "sub/c.png")):
        disp = np.load(out / f"{stem}.npy")
        assert disp.shape == (h, w) and disp.dtype == np.float32 and np.isfinite(disp).all()
        assert np.ptp(disp) > 0
        # batched prediction equals the one-image evaluation path
        ref = predict_disparity(model, _decoded(images / src), RES)
        np.testing.assert_allclose(disp, ref, rtol=1e-5, atol=1e-6)
        png = Image.open(out / f"{stem}.png")
        assert png.size == (w, h) and png.mode == "RGB"
        side = _decoded(out / f"{stem}_side.png")
        assert side.shape == (h, 2 * w, 3)
        np.testing.assert_array_equal(side[:, :w], _decoded(images / src))
        np.testing.assert_array_equal(side[:, w:], _decoded(out / f"{stem}.png"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in "abc" for suffix in (".npy", ".png", "_side.png"))


def test_predict_globs_duplicate_stems_and_missing_inputs(student, images, tmp_path):
    _, ckpt = student
    (images / "other").mkdir()
    (images / "other" / "a.png").write_bytes((images / "a.png").read_bytes())
    out = tmp_path / "out"
    summary = predict_stage.run([str(images / "*.png"), str(images / "other"), str(tmp_path / "missing.jpg")],
                                str(out), checkpoint=ckpt, resolution=RES)
    assert summary["written"] == 2 and summary["failed"] == 1
    assert summary["failures"] == [{"input": str(tmp_path / "missing.jpg"), "reason": "not found"}]
    assert sorted(p.name for p in out.iterdir()) == ["a-2.npy", "a-2.png", "a.npy", "a.png"]
    np.testing.assert_array_equal(np.load(out / "a.npy"), np.load(out / "a-2.npy"))


def test_predict_only_bad_inputs_is_an_error(student, images, tmp_path):
    _, ckpt = student
    with pytest.raises(ValueError, match="none of the 1 input files"):
        predict_stage.run([str(images / "bad.jpg")], str(tmp_path / "out"), checkpoint=ckpt, resolution=RES)
    with pytest.raises(ValueError, match="multiple of 14"):
        predict_stage.run([str(images)], str(tmp_path / "out"), checkpoint=ckpt, resolution=30)


def test_cli_predict_teacher_matches_checkpoint_and_reports_bad_file(student, images, tmp_path):
    import pipeline.cli

    _, ckpt = student
    cfg = tmp_path / "dad.toml"
    cfg.write_text(f'[run]\nroot = "{tmp_path / "run"}"\n[corpus]\nsources = ["unused"]\n'
                   f'[teachers.tiny]\nadapter = "checkpoint"\nmodel = "{ckpt}"\ninput_size = {RES}\n')
    runner = CliRunner()
    res = runner.invoke(pipeline.cli.app, ["predict", str(images / "a.png"), str(images / "bad.jpg"),
                                           "--out", str(tmp_path / "ck"), "--checkpoint", ckpt,
                                           "--resolution", str(RES)])
    assert res.exit_code == 0, res.output
    assert "written=1" in res.output and "failed=1" in res.output
    res = runner.invoke(pipeline.cli.app, ["predict", str(images / "a.png"), "--out", str(tmp_path / "te"),
                                           "-c", str(cfg), "--teacher", "tiny", "--resolution", str(RES)])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(tmp_path / "ck" / "a.npy"), np.load(tmp_path / "te" / "a.npy"))


def test_predict_fsspec_urls(student, media):
    import fsspec

    _, ckpt = student
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/predict_in/x.png", media.image_bytes(30, 30, "png", seed=5))
    fs.pipe_file("/predict_in/y.jpg", media.image_bytes(30, 30, "jpeg", seed=6))
    summary = predict_stage.run(["memory://predict_in/*.png", "memory://predict_in/y.jpg"], "memory://predict_out",
                                checkpoint=ckpt, resolution=RES)
    assert summary["written"] == 2 and summary["failed"] == 0
    assert sorted(fs.ls("/predict_out", detail=False)) == [f"/predict_out/{n}" for n in ("x.npy", "x.png", "y.npy", "y.png")]
    assert np.load(io.BytesIO(fs.cat_file("/predict_out/y.npy"))).shape == (30, 30)
