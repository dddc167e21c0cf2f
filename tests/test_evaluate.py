"""student/evaluation.py and stages/evaluate.py: the zero-shot protocol on hand-computed fixtures, on realeval, and through `dad eval`.

The hand-computed fixture is a `folder:` dataset of 28×42 images whose red channel *is* the
prediction (the fake model returns channel 0): at resolution 28 the processing size equals the
image size, so resizing is the identity and every number below follows from the pixel values.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.datasets import open_dataset
from stages.evaluate import CSV_COLUMNS
from student.evaluation import BASELINES, aggregate, evaluate, gt_disparity, score_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REALEVAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "realeval"
H, W = 28, 42
TOP, BOTTOM = (slice(0, 14), slice(None)), (slice(14, 28), slice(None))



def red_channel(x: torch.Tensor) -> torch.Tensor:
    """The fake model: disparity = the red channel in [0, 1]."""
    return x[:, 0]


def _write(folder: Path, rel: str, red: np.ndarray, depth: np.ndarray) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = red
    Image.fromarray(rgb).save(folder / f"{rel}.png")
    np.save(folder / f"{rel}.npy", depth.astype(np.float32))


@pytest.fixture
def hand_dataset(tmp_path) -> Path:
    """GT depth 1 m on the top half, 0.5 m on the bottom half (disparity 1 and 2), three predictions:
    fam_a/x1: red 40 on top; bottom-left 80, bottom-right 200, i.e. p ∝ 1 | 2 | 5 (a perturbation);
    fam_b/x2: red = 100 · GT disparity (the GT itself); fam_b/x3: red = 30 · disparity + 50 (affine)."""
    depth = np.ones((H, W))
    depth[BOTTOM] = 0.5
    disp = 1.0 / depth
    x1 = np.full((H, W), 40)
    x1[14:, :21], x1[14:, 21:] = 80, 200
    folder = tmp_path / "hand"
    _write(folder, "fam_a/x1", x1, depth)
    _write(folder, "fam_b/x2", 100 * disp, depth)
    _write(folder, "fam_b/x3", 30 * disp + 50, depth)
    return folder


# Hand computation for x1 (pixel weights top : bottom-left : bottom-right = 2 : 1 : 1), p = 1, 2, 5 and
# target disparity 1, 2, 2. Means: p̄ = 9/4, t̄ = 3/2; Σ dp·dt = 5/2, Σ dp² = 43/4 (per 4 pixels)
# → s = 10/43, shift = 42/43; aligned disparity (10p + 42)/43 = 52/43, 62/43, 92/43;
# depth 43/52, 43/62, 43/92 against 1, 1/2, 1/2.
X1_ABS_REL = (2 * 9 / 52 + 12 / 31 + 3 / 46) / 4            # |43/52−1|, |86/62−1|, |86/92−1|
X1_RMSE = math.sqrt((2 * (9 / 52) ** 2 + (6 / 31) ** 2 + (3 / 92) ** 2) / 4)
X1_DELTA = (0.75, 1.0, 1.0)                                 # ratios 52/43 ✓, 86/62 = 1.387 ✗ (< 1.25²), 46/43 ✓
# Constant baseline: s = 0, shift = mean target 3/2 → depth 2/3 everywhere: rel. error 1/3 on both halves,
# ratios 1.5 and 4/3 (both fail δ1, pass δ2).
CONST_ABS_REL, CONST_DELTA1, CONST_DELTA2 = 1 / 3, 0.0, 1.0
CONST_RMSE = math.sqrt((2 * (1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 4)


def _ramp_abs_rel_numpy() -> float:
    """Vertical-ramp baseline computed independently (numpy lstsq on the full grid)."""
    depth = np.ones((H, W))
    depth[BOTTOM] = 0.5
    ramp = np.repeat(((np.arange(H) + 1.0) / H)[:, None], W, axis=1)
    a = np.stack([ramp.ravel(), np.ones(H * W)], axis=1)
    (s, t), *_ = np.linalg.lstsq(a, (1 / depth).ravel(), rcond=None)
    pred_depth = 1.0 / np.maximum(s * ramp + t, 1e-3)
    return float(np.mean(np.abs(pred_depth - depth) / depth))


def test_hand_computed_perturbation_and_family_means(hand_dataset):
    rows, summary = evaluate(red_channel, f"folder:{hand_dataset}", align="disparity", resolution=28)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["fam_a/x1", "fam_b/x2", "fam_b/x3"]
    x1 = by_id["fam_a/x1"]
    assert x1["abs_rel"] == pytest.approx(X1_ABS_REL, rel=1e-6)
    assert x1["rmse"] == pytest.approx(X1_RMSE, rel=1e-6)
    assert (x1["delta1"], x1["delta2"], x1["delta3"]) == X1_DELTA
    assert x1["n_valid"] == H * W and x1["failure"] == "" and x1["space"] == "depth"
    for sid in ("fam_b/x2", "fam_b/x3"):  # the GT itself and an affine transform of it
        assert by_id[sid]["abs_rel"] == pytest.approx(0.0, abs=1e-6) and by_id[sid]["delta1"] == 1.0
    for r in rows:
        assert r["constant_abs_rel"] == pytest.approx(CONST_ABS_REL, rel=1e-9)
        assert r["constant_delta1"] == CONST_DELTA1 and r["constant_delta2"] == CONST_DELTA2
        assert r["constant_rmse"] == pytest.approx(CONST_RMSE, rel=1e-9)
        assert r["vertical_ramp_abs_rel"] == pytest.approx(_ramp_abs_rel_numpy(), rel=1e-6)
        assert r["vs_constant"] == "win"
    # headline: per sample, per family, then across families (fam_a = x1, fam_b = mean(0, 0))
    assert summary["n"] == 3 and summary["mean_over"] == "families"
    assert summary["abs_rel"] == pytest.approx(X1_ABS_REL / 2, rel=1e-5)
    assert summary["delta1"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["sample_mean"]["abs_rel"] == pytest.approx(X1_ABS_REL / 3, rel=1e-5)
    assert summary["families"]["fam_a"] == pytest.approx(
        {"n": 1, "abs_rel": X1_ABS_REL, "delta1": 0.75, "delta2": 1.0, "delta3": 1.0, "rmse": X1_RMSE}, rel=1e-6)
    assert summary["families"]["fam_b"]["n"] == 2
    const = summary["baselines"]["constant"]
    assert const["n"] == 3 and const["abs_rel"] == pytest.approx(CONST_ABS_REL) and const["delta1"] == 0.0
    assert summary["baselines"]["vertical_ramp"]["abs_rel"] == pytest.approx(_ramp_abs_rel_numpy(), rel=1e-6)
    assert summary["wins"]["constant"] == {"wins": 3, "losses": 0, "ties": 0}
    w = summary["wins"]["vertical_ramp"]
    assert w["wins"] + w["losses"] + w["ties"] == 3
    assert summary["protocol"]["align"] == "disparity" and summary["protocol"]["resolution"] == 28


def test_affine_invariance_through_evaluate(hand_dataset):
    """3·p + 0.7 of any prediction scores exactly like p under disparity alignment."""
    _, base = evaluate(red_channel, f"folder:{hand_dataset}", resolution=28)
    _, affine = evaluate(lambda x: 3.0 * x[:, 0] + 0.7, f"folder:{hand_dataset}", resolution=28)
    for k in ("abs_rel", "delta1", "delta2", "delta3", "rmse"):
        assert affine[k] == pytest.approx(base[k], rel=1e-6, abs=1e-9)


def test_failures_are_scored_not_skipped(hand_dataset):
    nan_rows, nan_sum = evaluate(lambda x: torch.full_like(x[:, 0], float("nan")), f"folder:{hand_dataset}",
                                 resolution=28)
    assert nan_sum["n"] == 3 and nan_sum["failures"]["nonfinite"] == 3
    assert all(r["failure"] == "nonfinite" and r["delta1"] == 0.0 and math.isfinite(r["abs_rel"]) for r in nan_rows)
    flat_rows, flat_sum = evaluate(lambda x: torch.full_like(x[:, 0], 2.0), f"folder:{hand_dataset}", resolution=28)
    assert flat_sum["n"] == 3 and flat_sum["failures"]["constant"] == 3
    for r in flat_rows:  # a flat map is the constant baseline: same numbers, a tie
        assert r["failure"] == "constant" and r["abs_rel"] == pytest.approx(CONST_ABS_REL) and r["vs_constant"] == "tie"
    assert flat_sum["wins"]["constant"] == {"wins": 0, "losses": 0, "ties": 3}


def test_no_valid_gt_is_listed_not_scored(tmp_path):
    folder = tmp_path / "holes"
    _write(folder, "a", np.full((H, W), 50), np.ones((H, W)))
    _write(folder, "b", np.full((H, W), 50), np.zeros((H, W)))  # no measurement at all
    rows, summary = evaluate(red_channel, f"folder:{folder}", resolution=28)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["failure"] == "no_valid_gt" and rows[1]["n_valid"] == 0
    assert summary["n"] == 1 and summary["n_no_gt"] == 1 and summary["failures"]["no_valid_gt"] == 1


def test_pictures(hand_dataset):
    got = {}
    evaluate(red_channel, f"folder:{hand_dataset}", resolution=28, pictures=2,
             on_picture=lambda stem, png: got.setdefault(stem, png))
    assert sorted(got) == ["folder_hand_fam_a_x1", "folder_hand_fam_b_x3"]  # spread: first and last
    for png in got.values():
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.size[0] > 3 * img.size[1]  # four panels side by side


@pytest.mark.parametrize("space", ["disparity", "depth", "inverse_depth"])
def test_gt_itself_scores_perfect_on_realeval(space):
    """The GT (as disparity) and, under disparity alignment, an affine map of it score AbsRel 0, δ1 1 on
    every real sample — depth GT (Kinect, LiDAR, RealSense) and stereo-disparity GT alike."""
    ds = open_dataset(f"realeval:{REALEVAL}")
    seen = 0
    for sample in ds:
        disp = gt_disparity(sample)
        preds = [disp] + ([3.0 * disp + 0.25] if space == "disparity" else [])
        for pred in preds:
            res = score_sample(pred, sample, space, ds.min_depth, ds.max_depth)
            assert res["n_valid"] == int(sample.valid.sum()) > 0
            assert res["abs_rel"] == pytest.approx(0.0, abs=1e-5), sample.id
            assert res["delta1"] == 1.0 and res["failure"] == ""
        seen += 1
    assert seen == 15


def test_aggregate_single_family_is_plain_mean():
    rows = [{"family": "f", "abs_rel": a, "delta1": d, "delta2": 1.0, "delta3": 1.0, "rmse": 0.0}
            for a, d in ((0.1, 0.5), (0.3, 1.0))]
    out = aggregate(rows)
    assert out["mean_over"] == "samples" and out["abs_rel"] == pytest.approx(0.2) and out["delta1"] == 0.75


# -- `dad eval` end to end on realeval ------------------------------------------------------------

RES = 28  # tiny resolution: the numbers are meaningless, completeness and equality are the point


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    """A tiny random student saved as a checkpoint and also configured as a `checkpoint` teacher;
    `dad eval` run with --checkpoint and with --teacher on realeval."""
    import pipeline.cli
    from student.checkpoint import save_checkpoint
    from student.model import build_student

    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = build_student("tiny")
    torch.nn.init.constant_(model.head.out_conv3.bias, 1.0)  # a random head outputs ReLU(·) = 0 everywhere
    ckpt = tmp / "tiny-student.pt"
    save_checkpoint(model, str(ckpt))
    cfg = tmp / "dad.toml"
    cfg.write_text(f"""
[run]
root = "{tmp / 'run'}"
[corpus]
sources = ["unused"]
[teachers.tiny]
adapter = "checkpoint"
model = "{ckpt}"
input_size = {RES}
[eval]
datasets = ["realeval:{REALEVAL}"]
resolution = {RES}
pictures = 2
""")
    runner = CliRunner()
    results = {}
    for flag, value in (("--checkpoint", str(ckpt)), ("--teacher", "tiny")):
        res = runner.invoke(pipeline.cli.app, ["eval", "-c", str(cfg), flag, value])
        assert res.exit_code == 0, res.output
        results[flag] = res.output
    return tmp / "run" / "eval", results


def _read(run: Path, name: str):
    metrics = json.loads((run / name / "metrics.json").read_text())
    with open(run / name / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return metrics, rows


def test_eval_checkpoint_and_teacher_give_identical_numbers(eval_runs):
    run, _ = eval_runs
    m_ck, rows_ck = _read(run, "tiny-student")
    m_te, rows_te = _read(run, "teacher-tiny")
    for m in (m_ck, m_te):
        for ds in m["datasets"].values():
            ds.pop("seconds")  # timing is the only thing allowed to differ
    assert m_ck["datasets"] == m_te["datasets"] != {}
    assert rows_ck == rows_te
    # the student is not a flat map: the comparison is between real predictions
    assert all(r["failure"] == "" and float(r["scale"]) != 0.0 for r in rows_ck)


def test_eval_realeval_scores_every_manifest_sample(eval_runs):
    run, outputs = eval_runs
    metrics, rows = _read(run, "tiny-student")
    with open(REALEVAL / "manifest.csv", newline="") as f:
        manifest = {r["id"]: r for r in csv.DictReader(f)}
    assert [r["id"] for r in rows] == list(manifest) and len(rows) == 15
    assert list(rows[0]) == CSV_COLUMNS
    for r in rows:
        assert r["dataset"] == "realeval" and r["family"] == manifest[r["id"]]["group_family"]
        assert int(r["n_valid"]) > 0 and math.isfinite(float(r["abs_rel"]))
        assert (int(r["height"]), int(r["width"])) == (int(manifest[r["id"]]["height"]), int(manifest[r["id"]]["width"]))
        assert r["space"] == ("disparity" if manifest[r["id"]]["gt_type"] == "disparity" else "depth")
    m = metrics["datasets"]["realeval"]
    assert m["n"] == 15 and m["n_listed"] == 15 and m["n_no_gt"] == 0 and m["mean_over"] == "families"
    fams = {r["group_family"] for r in manifest.values()}
    assert set(m["families"]) == fams and sum(f["n"] for f in m["families"].values()) == 15
    assert m["abs_rel"] == pytest.approx(np.mean([f["abs_rel"] for f in m["families"].values()]))
    assert m["sample_mean"]["abs_rel"] == pytest.approx(np.mean([float(r["abs_rel"]) for r in rows]))
    for b in BASELINES:
        assert m["baselines"][b]["n"] == 15 and sum(m["wins"][b].values()) == 15
        assert m["baselines"][b]["abs_rel"] == pytest.approx(
            np.mean([np.mean([float(r[f"{b}_abs_rel"]) for r in rows if r["family"] == f]) for f in fams]))
    assert m["protocol"]["align"] == "disparity" and m["protocol"]["resolution"] == RES
    pics = sorted(p.name for p in (run / "tiny-student" / "pictures").iterdir())
    assert pics == ["realeval_kinect2_esanet.png", "realeval_tabletop_uoc_5.png"]
    assert "realeval" in outputs["--checkpoint"] and "tiny-student" in outputs["--checkpoint"]


def test_run_without_model_evaluates_the_runs_student(eval_runs, hand_dataset, tmp_path):
    """`dad run` calls run(cfg): it evaluates train/<train.name>/model.pt, or skips without datasets."""
    import shutil

    from pipeline.config import load_config
    from stages import evaluate as stage

    run_dir, _ = eval_runs
    raw = {"run": {"root": str(tmp_path / "root")}, "corpus": {"sources": ["unused"]},
           "train": {"name": "mine"}, "eval": {"resolution": 28, "pictures": 0}}
    assert stage.run(load_config(raw=raw)) == {"stage": "eval", "skipped": "no eval.datasets configured"}
    raw["eval"]["datasets"] = [f"folder:{hand_dataset}"]
    with pytest.raises(FileNotFoundError, match="train/mine/model.pt"):
        stage.run(load_config(raw=raw))
    (tmp_path / "root" / "train" / "mine").mkdir(parents=True)
    shutil.copy(run_dir.parent.parent / "tiny-student.pt", tmp_path / "root" / "train" / "mine" / "model.pt")
    summary = stage.run(load_config(raw=raw))
    assert summary["name"] == "mine" and summary["folder:hand.n"] == 3
    metrics = json.loads((tmp_path / "root" / "eval" / "mine" / "metrics.json").read_text())
    assert metrics["datasets"]["folder:hand"]["n"] == 3
    # a training folder given as --checkpoint means its model.pt (as infra/k8s/rayjob-eval.yaml does)
    again = stage.run(load_config(raw=raw), checkpoint=str(tmp_path / "root" / "train" / "mine"), name="again")
    assert again["folder:hand.abs_rel"] == summary["folder:hand.abs_rel"]
    assert json.loads((tmp_path / "root" / "eval" / "again" / "metrics.json").read_text())["model"]["checkpoint"] \
        .endswith("train/mine/model.pt")
