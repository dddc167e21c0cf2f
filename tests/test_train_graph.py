"""A graph student (student.arch = "tflite") trained by the train stage on real photos with a real teacher.

PyDNet v2 teaches 8 photos of ../shared/data/unlabeled; the student is PyDNet v2's own graph with the
teacher's weights (`init_from = "teacher:pydnet"`). Checks: the step-0 checkpoint is the teacher
exactly, training lowers the distillation loss, a crash-and-resume ends with the uninterrupted run's
weights, the student exports to ONNX and predicts through the `onnx` teacher adapter like the torch
checkpoint, and the summary carries the label licence.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import stages.score
import stages.shard
import stages.teach
import stages.train
from pipeline.config import TeacherCfg, load_config
from pipeline.storage import Root

pytest.importorskip("ai_edge_litert.interpreter")
REPO = Path(__file__).resolve().parents[1]
MODELS = REPO.parent / "shared" / "models"
PHOTOS = sorted((REPO.parent / "shared" / "data" / "unlabeled" / "images").glob("kodak_*.jpg"))[:8]
PYDNET, FASTDEPTH = MODELS / "pydnet_v2_384x640_fp16.tflite", MODELS / "fastdepth_nyu_224_int8.tflite"
pytestmark = [pytest.mark.skipif(not PYDNET.exists() or len(PHOTOS) < 8, reason="models or photos not found"),
              pytest.mark.usefixtures("one_torch_thread")]


def raw(root: Path, src: Path, score: dict | None = None, **train) -> dict:
    return {"run": {"root": str(root), "executor": "inline"},
            "corpus": {"sources": [str(src)], "shard_size": 4},
            "crops": {"min_region": 128, "patch": 112, "global_size": 126, "local_store": 56, "local_count": 2},
            "teachers": {"pydnet": {"adapter": "tflite", "model": str(PYDNET), "license": "research-only",
                                    "torch_threads": 1, "prior": 0.7},
                         "fastdepth": {"adapter": "tflite", "model": str(FASTDEPTH), "license": "MIT",
                                       "output_space": "metric_depth", "torch_threads": 1, "prior": 0.3}},
            "score": score or {},
            "student": {"arch": "tflite", "init_from": "teacher:pydnet", "input_size": [128, 192]},
            "train": {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0,
                      "lr_decoder": 2e-4, "jitter": 0.0, "amp": False, "deterministic": True, **train}}


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph")
    src = folder / "photos"
    src.mkdir()
    for p in PHOTOS:
        shutil.copy(p, src / p.name)
    cfg = load_config(raw=raw(folder / "root", src))
    stages.shard.run(cfg)
    stages.teach.run(cfg)
    stages.score.run(cfg)
    return folder, src


def copy(taught, name: str, score: dict | None = None, **train):
    folder, src = taught
    dest = folder / name
    shutil.copytree(folder / "root", dest, ignore=shutil.ignore_patterns("train", "locks"))
    cfg = load_config(raw=raw(dest, src, score, **train))
    if score:
        stages.score.run(cfg)
    return cfg


def test_graph_student_starts_as_the_teacher_and_training_lowers_the_loss(taught):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import batches_of, mean_loss

    from stages.teachers import build_teacher
    from student.checkpoint import load_checkpoint

    cfg = copy(taught, "lower", steps=8)
    stages.train.run(cfg)
    root = Root(cfg.run.root)
    start, _ = load_checkpoint(root.uri("train", "student", "init.pt"))
    final, _ = load_checkpoint(root.uri("train", "student", "model.pt"))
    teacher = build_teacher("pydnet", TeacherCfg(adapter="tflite", model=str(PYDNET), torch_threads=1))
    x = torch.rand(1, 3, 384, 640, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = load_checkpoint(root.uri("train", "student", "init.pt"))[0]
        native.config.input_size = None  # the imported graph at the teacher's own size: the teacher itself
        rel = (native(x) - teacher.predict(x)).abs().max() / teacher.predict(x).abs().max()
    assert float(rel) < 1e-4
    batches = batches_of(cfg)
    before, after = mean_loss(start, batches, cfg), mean_loss(final, batches, cfg)
    assert after < before, (before, after)
    summary = root.read_json("train", "student", "summary.json")
    assert summary["label_licenses"] == ["MIT", "research-only"] and summary["teachers"]["pydnet"]["label_share"] == 0.7
    assert summary["weights_from"] == {"teacher": "pydnet", "license": "research-only"}


def test_excluding_research_only_labels_trains_on_fastdepth_alone(taught):
    cfg = copy(taught, "mit", score={"exclude_licenses": ["research-only"]}, steps=2)
    stages.train.run(cfg)
    summary = Root(cfg.run.root).read_json("train", "student", "summary.json")
    assert summary["teachers"]["fastdepth"]["label_share"] == 1.0 and summary["teachers"]["pydnet"]["label_share"] == 0
    assert summary["label_licenses"] == ["MIT"]
    assert summary["licenses"] == ["MIT", "research-only"]  # the weights still start from PyDNet v2's


def test_graph_student_resumes_to_the_uninterrupted_weights(taught, monkeypatch):
    clean, crashed = copy(taught, "clean"), copy(taught, "crashed")
    stages.train.run(clean)
    real, calls = stages.train.train_step, []

    def dying(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash in step 4")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages.train, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        stages.train.run(crashed)
    monkeypatch.undo()
    assert stages.train.run(crashed)["resumed_from"] == 2
    a = torch.load(Root(clean.run.root).uri("train", "student", "model.pt"), weights_only=True)["state_dict"]
    b = torch.load(Root(crashed.run.root).uri("train", "student", "model.pt"), weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_graph_student_exports_and_teaches_through_onnx(taught, tmp_path):
    pytest.importorskip("onnxruntime")
    import stages.export
    from stages.teachers import build_teacher
    from student.checkpoint import load_checkpoint

    cfg = copy(taught, "export", steps=2)
    stages.train.run(cfg)
    ckpt = Root(cfg.run.root).uri("train", "student", "model.pt")
    stages.export.run(ckpt, out_dir=str(tmp_path / "out"))
    onnx_teacher = build_teacher("next", TeacherCfg(adapter="onnx", model=str(tmp_path / "out" / "model.onnx")))
    model, _ = load_checkpoint(ckpt)
    x = torch.rand(2, 3, 200, 300, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    got = onnx_teacher.predict(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "research-only" in card and "Initial weights: teacher pydnet (research-only)" in card
    assert np.isfinite(got.numpy()).all()
