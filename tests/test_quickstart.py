"""The demos end to end, at reduced size: `dad run -c configs/renders.toml` (the zoo teachers on rendered
scenes) and `dad run -c configs/quickstart.toml` (the embedded default: real TFLite teachers on real photos,
the PyDNet v2 graph student), with overrides that shrink the corpus, crops, steps and evaluation, on the
in-process executor.

Checks every stage's outputs (manifest, rejects, Zarr caches of both zoo teachers, scores and
selection, checkpoints and metrics, evaluation of both teachers and the student, the report), and
that the committed zoo teachers load through the `checkpoint` adapter and clearly beat the constant
baseline on held-out rendered scenes (against the vertical ramp they are only level: zoo/*.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "renders.toml"
REAL = REPO / "configs" / "quickstart.toml"
ZOO = REPO / "zoo"
SHARED = REPO.parent / "shared"


def reduced(root: Path) -> list[str]:
    return [f'run.root="{root}"', 'run.executor="inline"',
            'corpus.sources=["scenes:n=6,seed=100000,size=96", "skimage:photos"]', "corpus.shard_size=8",
            "crops.min_region=84", "crops.patch=56", "crops.global_size=84", "crops.local_store=42",
            f'teachers.layout.model="{ZOO / "layout.pt"}"', f'teachers.detail.model="{ZOO / "detail.pt"}"',
            f'train.init_from="{ZOO / "layout.pt"}"', "train.steps=4", "train.batch_size=2",
            "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
            'eval.datasets=["scenes:n=3,seed=900000,size=96"]', "eval.resolution=84", "eval.pictures=1"]


@pytest.mark.timeout(900)
@pytest.mark.skipif(not (SHARED / "models").is_dir() or not (SHARED / "data" / "unlabeled").is_dir(),
                    reason="../shared models and photos not found")
def test_real_quickstart_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert.interpreter")
    monkeypatch.chdir(REPO)
    root = tmp_path / "real"
    sets = [f'run.root="{root}"', 'run.executor="inline"',
            'corpus.sources=["../shared/data/unlabeled/images/kodak_0000[0-5].jpg"]', "corpus.shard_size=3",
            "crops.min_region=128", "crops.patch=112", "crops.global_size=126", "crops.local_store=56",
            "student.input_size=[128, 192]", "train.steps=4", "train.batch_size=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.warmup_steps=1", "eval.max_samples=3", "eval.resolution=126",
            'eval.datasets=["realeval:../shared/data/realeval"]', "eval.pictures=1"]
    result = CliRunner().invoke(app, ["run", "-c", str(REAL), *[a for x in sets for a in ("--set", x)]])
    assert result.exit_code == 0, result.output
    assert "stages run: shard, teach, score, train, evaluate, report" in result.output
    import zarr

    for teacher, licence in (("pydnet", "research-only"), ("fastdepth", "MIT")):
        group = zarr.open_group(str(root / "cache" / teacher), mode="r")
        assert group["global"].shape[1:] == (126, 126) and group.attrs["license"] == licence
        assert np.isfinite(group["global"][:]).all()
    summary = json.loads((root / "train" / "student" / "summary.json").read_text())
    assert summary["label_licenses"] == ["MIT", "research-only"]
    for name in ("teacher-pydnet", "teacher-fastdepth", "start-student", "student-student"):
        metrics = json.loads((root / "eval" / name / "metrics.json").read_text())
        (ds,) = metrics["datasets"].values()
        assert ds["n"] == 3 and 0 < ds["abs_rel"] < 1, name
    page = (root / "report" / "index.html").read_text()
    for needle in ("teacher-pydnet", "student-student", "Licences of the labels", "research-only",
                   "the teacher it started from, <i>pydnet</i>"):
        assert needle in page, needle


@pytest.mark.timeout(900)
@pytest.mark.skipif(not (ZOO / "layout.pt").exists(), reason="zoo checkpoints not built")
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    root = tmp_path / "qs"
    sets = sum((["--set", s] for s in reduced(root)), [])
    result = CliRunner().invoke(app, ["run", "-c", str(QUICKSTART), *sets])
    assert result.exit_code == 0, result.output
    assert "stages run: shard, teach, score, train, evaluate, report" in result.output

    manifest = pq.read_table(root / "corpus" / "manifest.parquet").to_pylist()
    rejects = pq.read_table(root / "corpus" / "rejects.parquet").to_pylist()
    n_photos = sum(r["source_uri"].startswith("skimage:") for r in manifest)
    assert sum(r["source_uri"].startswith("scenes:") for r in manifest) == 6 and n_photos >= 5
    assert not [r for r in rejects if r["source_uri"].startswith("scenes:")]
    import zarr

    for teacher in ("layout", "detail"):
        group = zarr.open_group(str(root / "cache" / teacher), mode="r")
        assert group["global"].shape[1:] == (84, 84) and group["local"].shape[1:] == (4, 42, 42)
        assert group.attrs["license"] == "Apache-2.0"
        rows = [r["row"] for r in manifest]
        assert np.isfinite(group["global"].get_orthogonal_selection((rows,))).all()
    scores = pq.read_table(root / "scores" / "scores.parquet").to_pylist()
    assert len(scores) == 2 * len(manifest)
    selection = pq.read_table(root / "scores" / "selection.parquet").to_pylist()
    assert len(selection) == len(manifest)
    assert all(abs(r["p_layout"] - 0.7) < 1e-9 and abs(r["p_detail"] - 0.3) < 1e-9 for r in selection)
    train = root / "train" / "student"
    assert {"ckpt-0000002.pt", "ckpt-0000004.pt", "model.pt", "metrics.jsonl"} <= {p.name for p in train.iterdir()}
    assert len((train / "metrics.jsonl").read_text().splitlines()) == 4
    for name in ("teacher-layout", "teacher-detail", "start-student", "student-student"):
        metrics = json.loads((root / "eval" / name / "metrics.json").read_text())
        assert any(m.get("n") == 3 for m in metrics["datasets"].values()), name
    page = (root / "report" / "index.html").read_text()
    for needle in ("teacher-layout", "student-student", "small models trained on rendered scenes", "baseline",
                   "Latest run of each command", "the teacher it started from, <i>layout</i>",
                   "its own starting weights at the student's input size",
                   "Held-out samples: teachers and student against ground truth"):
        assert needle in page, needle
    runs = sorted(p.name for p in (root / "ledger" / "_runs").iterdir())
    assert runs == ["eval-start-student.json", "eval-student-student.json", "eval-teacher-detail.json", "eval-teacher-layout.json",
                    "report.json", "score.json", "shard.json", "teach.json", "train-student.json"]


def test_report_verdict_says_plainly_whether_the_student_beat_its_start():
    from stages.report import verdicts

    cfg = load_config(QUICKSTART)
    rows = {"scenes": [["student-student", 10, 0.40, 0.60, 1.0], ["teacher-layout", 10, 0.45, 0.55, 1.0],
                       ["start-student", 10, 0.52, 0.48, 1.0],
                       ["teacher-detail", 10, 0.38, 0.50, 1.0], ["baseline: vertical_ramp", 10, 0.50, 0.5, 1.0]],
            "real": [["student-student", 5, 0.30, 0.50, 1.0], ["teacher-layout", 5, 0.28, 0.55, 1.0]]}
    text = verdicts(rows, cfg)
    assert "<b>better</b> than the teacher it started from, <i>layout</i>" in text
    assert "ΔAbsRel -0.050" in text and "lower AbsRel than 1 of 2 teachers" in text
    assert "below the vertical ramp's AbsRel (0.500)" in text
    assert "scored 0.520, 0.480 (distillation: ΔAbsRel -0.120, Δδ1 +0.120)" in text
    assert text.count("its own starting weights") == 1  # only where that evaluation exists
    assert "<b>not better</b> than the teacher it started from" in text  # the `real` line: worse in both


@pytest.mark.timeout(600)
def test_zoo_teachers_beat_trivial_baselines():
    from pipeline.config import TeacherCfg
    from stages.teachers import build_teacher
    from student.evaluation import evaluate

    cfg = load_config(QUICKSTART)
    for name, tcfg in cfg.teachers.items():
        teacher = build_teacher(name, TeacherCfg(**{**tcfg.model_dump(), "model": str(ZOO / f"{name}.pt")}))
        _, summary = evaluate(teacher.predict, "scenes:n=24,seed=900000,size=192", align="inverse_depth",
                              resolution=tcfg.input_size)
        # Both beat the constant baseline clearly. Against the vertical ramp these small, briefly
        # trained models are only level on renders (zoo/*.md): that is reported, not asserted.
        base = summary["baselines"]["constant"]
        assert summary["abs_rel"] < 0.8 * base["abs_rel"], (name, summary)
        assert summary["delta1"] > base["delta1"] + 0.05, (name, summary)
