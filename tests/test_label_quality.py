"""bench.label_quality: the pure scoring of a cached label against GT (hand-worked inputs), and one slow
end-to-end run of the bench on realeval with the real TFLite teachers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.label_quality import (
    cut_region,
    expected_draw,
    family_mean,
    kendall_tau,
    label_disparity,
    label_score,
    oracle_pick,
)
from pipeline.datasets import EvalSample


def depth_sample(h: int = 40, w: int = 50, gt_type: str = "depth", family: str = "f") -> EvalSample:
    """A GT whose depth varies in both directions (1 … ~4 m), so depth and disparity are far from affine."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gt = (1.0 + 0.05 * xx + 0.03 * yy + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 4.0)).astype(np.float32)
    rgb = np.zeros((h, w, 3), np.uint8)
    return EvalSample(id="s", rgb=rgb, gt=gt, gt_type=gt_type, valid=np.ones((h, w), bool), family=family)


REGION = (7, 3, 32)  # x0, y0, side


def region_of(a: np.ndarray, region=REGION) -> np.ndarray:
    x0, y0, s = region
    return a[y0:y0 + s, x0:x0 + s]


def test_label_equal_to_gt_disparity_up_to_scale_and_shift_scores_zero():
    smp = depth_sample()
    label = 3.7 / region_of(smp.gt) + 0.25  # disparity, affine in 1/depth
    res = label_score(label, "disparity", REGION, smp)
    assert res["abs_rel"] < 1e-5 and res["delta1"] == pytest.approx(1.0)
    assert res["n_valid"] == REGION[2] ** 2


def test_resized_label_is_brought_to_region_size():
    smp = depth_sample()
    full = 2.0 / region_of(smp.gt)
    small = full[::2, ::2]  # a G×G label at half the region's side
    out = label_disparity(small, "disparity", (32, 32))
    assert out.shape == (32, 32)
    assert label_score(small, "disparity", REGION, smp)["abs_rel"] < 0.02  # only interpolation error


def test_depth_space_label_is_inverted():
    smp = depth_sample()
    depth_label = 4.0 * region_of(smp.gt)  # depth up to scale: its inverse is GT disparity up to scale
    assert label_score(depth_label, "depth", REGION, smp)["abs_rel"] < 1e-5
    assert label_score(depth_label, "metric_depth", REGION, smp)["abs_rel"] < 1e-5
    # the same map taken as disparity (larger = nearer) is wrong (a negative LSQ scale hides part of it)
    assert label_score(depth_label, "disparity", REGION, smp)["abs_rel"] > 0.02
    np.testing.assert_allclose(label_disparity(np.full((4, 4), 2.0, np.float32), "depth", (4, 4)), 0.5)


def test_stereo_disparity_gt_is_scored_in_disparity():
    smp = depth_sample(gt_type="disparity")  # gt holds a disparity in pixels
    label = 0.5 * region_of(smp.gt) - 1.0
    assert label_score(label, "disparity", REGION, smp)["abs_rel"] < 1e-5


def test_region_cut_picks_the_right_gt_pixels():
    smp = depth_sample()
    x0, y0, s = REGION
    marked = smp.gt.copy()
    marked[y0, x0] = 99.0            # the region's top-left pixel
    marked[y0 + s - 1, x0 + s - 1] = 77.0  # its bottom-right pixel
    marked[y0 - 1, x0] = 55.0        # just outside
    smp = EvalSample(smp.id, smp.rgb, marked, smp.gt_type, smp.valid, smp.family)
    cut = cut_region(smp, REGION)
    assert cut.gt.shape == (s, s) and cut.rgb.shape == (s, s, 3) and cut.valid.shape == (s, s)
    assert cut.gt[0, 0] == 99.0 and cut.gt[-1, -1] == 77.0 and 55.0 not in cut.gt
    # a label of the right region scores 0; the same label against a region shifted by one pixel does not
    label = 1.0 / region_of(marked)
    assert label_score(label, "disparity", REGION, smp)["abs_rel"] < 1e-5
    assert label_score(label, "disparity", (x0 + 1, y0, s), smp)["abs_rel"] > 0.01
    with pytest.raises(ValueError, match="leaves"):
        cut_region(smp, (30, 0, 32))


def test_invalid_gt_pixels_are_not_scored():
    smp = depth_sample()
    valid = smp.valid.copy()
    valid[:, :20] = False
    gt = np.where(valid, smp.gt, 0.0).astype(np.float32)
    smp = EvalSample(smp.id, smp.rgb, gt, smp.gt_type, valid, smp.family)
    label = 1.0 / np.maximum(region_of(smp.gt), 1e-3)  # garbage where the GT is 0
    label[:, : 20 - REGION[0]] = 123.0
    res = label_score(label, "disparity", REGION, smp)
    assert res["n_valid"] == 32 * (32 - (20 - REGION[0])) and res["abs_rel"] < 1e-5


def test_expected_draw_is_the_probability_weighted_abs_rel():
    smp = depth_sample()
    base = 1.0 / region_of(smp.gt)
    rng = np.random.default_rng(0)
    labels = {"a": base, "b": base + rng.normal(0, 0.05, base.shape), "c": base[::-1]}
    absrel = {t: label_score(m, "disparity", REGION, smp)["abs_rel"] for t, m in labels.items()}
    probs = {"a": 0.7, "b": 0.15, "c": 0.15}
    want = 0.7 * absrel["a"] + 0.15 * absrel["b"] + 0.15 * absrel["c"]
    assert expected_draw(probs, absrel) == pytest.approx(want)
    assert expected_draw({"a": 0.0, "b": 1.0, "c": 0.0}, absrel) == pytest.approx(absrel["b"])
    # a teacher with probability 0 never counts, even with no score
    assert expected_draw({"a": 1.0, "b": 0.0}, {"a": 0.2, "b": math.nan}) == pytest.approx(0.2)
    assert math.isnan(expected_draw({"a": 0.0}, {"a": 0.2}))


def test_oracle_is_the_per_row_minimum():
    rows = [{"a": 0.3, "b": 0.1, "c": 0.2}, {"a": 0.05, "b": 0.1, "c": math.nan}, {"a": 0.4, "b": 0.4, "c": 0.5}]
    picks = [oracle_pick(r) for r in rows]
    assert picks == [("b", 0.1), ("a", 0.05), ("a", 0.4)]
    none, value = oracle_pick({"a": math.nan})
    assert none is None and math.isnan(value)
    for r, (_, v) in zip(rows, picks):
        assert v == min(x for x in r.values() if np.isfinite(x))


def test_family_mean_averages_families_first():
    out = family_mean([0.1, 0.3, 0.5, math.nan], ["x", "x", "y", "y"])
    assert out["families"] == {"x": pytest.approx(0.2), "y": pytest.approx(0.5)}
    assert out["mean"] == pytest.approx(0.35) and out["sample_mean"] == pytest.approx(0.3)
    assert out["n"] == 3 and out["n_missing"] == 1


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [20, 10, 30]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1, math.nan], [1, 2]))


@pytest.mark.slow
def test_bench_runs_end_to_end():
    from bench import label_quality

    if not (label_quality.REALEVAL / "manifest.csv").exists() or not label_quality.MODELS.is_dir():
        pytest.skip("needs ../shared/data/realeval and ../shared/models")
    res = label_quality.run(quick=True)
    assert {"label_quality_paper", "label_quality_best", "label_quality_oracle_gap",
            "label_quality_pick_agreement"} <= set(res)
    for entry in res.values():
        assert {"value", "unit", "goal", "detail"} <= set(entry)
    table = res["label_quality_paper"]["detail"]["table"]
    assert set(table["teachers"]) == set(label_quality.TEACHERS)
    for t, v in table["teachers"].items():
        assert 0.0 < v["abs_rel"]["mean"] < 1.0, t
        assert v["abs_rel"]["n"] == 15
    assert {"paper", "best_lg_consistency", "best_agreement", "best_combined", "weighted", "mix"} \
        == set(table["policies"])
    oracle = table["oracle"]["abs_rel"]["mean"]
    assert oracle <= min(v["abs_rel"]["mean"] for v in table["teachers"].values()) + 1e-12
    for p in table["policies"].values():
        assert np.isfinite(p["abs_rel"]["mean"])
        if p["policy"] != "mix":  # an expected draw is never below the per-image minimum; a mixed map can be
            assert p["gap_to_oracle"] >= -1e-9
    assert math.isfinite(res["label_quality_paper"]["value"]) and res["label_quality_paper"]["goal"] == "<= 1.0"
