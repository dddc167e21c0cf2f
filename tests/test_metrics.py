"""student/metrics.py: alignment and metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from student.metrics import (
    METRIC_KEYS,
    align,
    align_disparity,
    baseline_predictions,
    depth_metrics,
    evaluate_prediction,
    fit_scale_shift,
)

GT = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)  # depth, metres
ALL = np.ones((2, 2), bool)


def test_fit_scale_shift_hand_computed():
    # p = 1..4, y = 2, 4, 6, 9: mean p 2.5, mean y 5.25, cov 2.875, var 1.25 → s 2.3, t −0.5
    p = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = np.array([[2.0, 4.0], [6.0, 9.0]])
    s, t = fit_scale_shift(p, y, ALL)
    assert float(s) == pytest.approx(2.3) and float(t) == pytest.approx(-0.5)
    # masked-out pixels (even NaN / garbage) do not take part
    p3 = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 100.0]])
    y3 = np.array([[2.0, 4.0, 7.0], [6.0, 9.0, -5.0]])
    m3 = np.array([[1, 1, 1], [1, 1, 0]], bool)
    s, t = fit_scale_shift(p3, y3, m3)
    assert float(s) == pytest.approx(2.3) and float(t) == pytest.approx(-0.5)


def test_fit_max_res_subsamples_columns_like_marigold():
    # 2×8, max_res 4 → scale 0.5 along W only (Marigold's (1, H, W) nn.Upsample): columns 0, 2, 4, 6
    pred = np.arange(16, dtype=np.float64).reshape(2, 8)
    target = 2 * pred + 1
    target[:, 1::2] = -50.0  # odd columns disagree
    mask = np.ones((2, 8), bool)
    s, t = fit_scale_shift(pred, target, mask, max_res=4)
    assert float(s) == pytest.approx(2.0) and float(t) == pytest.approx(1.0)
    assert float(fit_scale_shift(pred, target, mask)[0]) != pytest.approx(2.0)
    assert float(fit_scale_shift(pred, target, mask, max_res=8)[0]) != pytest.approx(2.0)  # no-op: sf ≥ 1


def test_gt_as_disparity_scores_perfect_and_affine_invariant():
    disp = 1.0 / GT
    for pred in (disp, 3.0 * disp + 0.7):
        aligned = align(pred, GT, ALL, space="disparity")
        assert torch.allclose(aligned, torch.as_tensor(GT, dtype=aligned.dtype), rtol=1e-9)
        m = depth_metrics(aligned, GT, ALL)
        assert m["abs_rel"] == pytest.approx(0.0, abs=1e-9) and m["delta1"] == 1.0
        assert m["silog"] == pytest.approx(0.0, abs=1e-5)


def test_align_depth_space():
    aligned = align(2.0 * GT - 1.0, GT, ALL, space="depth")
    assert torch.allclose(aligned, torch.as_tensor(GT, dtype=aligned.dtype))


def test_align_disparity_for_disparity_gt():
    gt_disp = np.array([[10.0, 20.0], [30.0, 0.0]], np.float32)  # 0 = no GT
    valid = gt_disp > 0
    pred = 0.5 * gt_disp - 4.0
    pred[1, 1] = 1e6  # an invalid pixel must not enter the fit
    out = align_disparity(pred, gt_disp, valid)
    assert torch.allclose(out[valid], torch.tensor([10.0, 20.0, 30.0], dtype=out.dtype))
    r = evaluate_prediction(pred, gt_disp, "disparity", valid)
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-9) and r["delta1"] == 1.0
    assert r["space"] == "disparity" and r["n_valid"] == 3
    assert r["scale"] == pytest.approx(2.0) and r["shift"] == pytest.approx(8.0)


def test_depth_metrics_hand_computed():
    # one pixel of four off by 1.5: gt 8 → pred 12
    pred = np.array([[1.0, 2.0], [4.0, 12.0]])
    m = depth_metrics(pred, GT, ALL)
    ln = math.log(1.5)
    expected = {"abs_rel": 0.5 / 4, "sq_rel": (16 / 8) / 4, "rmse": math.sqrt(16 / 4), "rmse_log": ln / 2,
                "log10": math.log10(1.5) / 4, "delta1": 0.75, "delta2": 1.0, "delta3": 1.0,
                "silog": 100 * ln * math.sqrt(3) / 4}
    assert set(m) == set(METRIC_KEYS)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-9), k


def test_depth_metrics_clips_to_range_then_floor():
    pred = np.array([[0.5, 2.0], [4.0, 20.0]])  # clipped to [1, 10] → 1, 2, 4, 10
    m = depth_metrics(pred, GT, ALL, min_depth=1.0, max_depth=10.0)
    assert m["abs_rel"] == pytest.approx((2 / 8) / 4)
    m = depth_metrics(np.full((2, 2), -3.0), GT, ALL)  # ≤ 0 → 1e-6
    assert m["abs_rel"] == pytest.approx(np.mean([(g - 1e-6) / g for g in (1, 2, 4, 8)]))


def test_constant_prediction_is_a_finite_failure():
    # disparity fit of a constant: s = 0, t = mean(1/gt) = 0.46875 → depth 1/0.46875 everywhere
    r = evaluate_prediction(np.full((2, 2), 3.0, np.float32), GT, "depth", ALL)
    d = 1 / 0.46875
    assert r["scale"] == 0.0 and r["shift"] == pytest.approx(0.46875)
    assert r["abs_rel"] == pytest.approx(np.mean([abs(d - g) / g for g in (1, 2, 4, 8)]))  # = 0.6
    assert r["abs_rel"] == pytest.approx(0.6) and r["delta1"] == 0.25
    assert all(math.isfinite(r[k]) for k in METRIC_KEYS)


def test_nan_prediction_scores_maximal_error():
    # NYU range (1e-3, 10): for gt 1..8 m the bound farther in log ratio is always 1e-3
    nan = np.full((2, 2), np.nan, np.float32)
    r = evaluate_prediction(nan, GT, "depth", ALL, min_depth=1e-3, max_depth=10.0)
    assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
    assert r["delta1"] == 0.0 and r["delta3"] == 0.0
    assert r["abs_rel"] == pytest.approx(np.mean([(g - 1e-3) / g for g in (1, 2, 4, 8)]))
    # with gt 8 m and bounds (1, 10): 1 is farther (ratio 8) than 10 (ratio 1.25)
    m = depth_metrics(nan, GT, ALL, min_depth=1.0, max_depth=10.0)
    # gt 1 → 10 (ratio 10 vs 1), gt 2 → 10 (5 vs 2), gt 4 → 1 (4 vs 2.5), gt 8 → 1
    assert m["abs_rel"] == pytest.approx(np.mean([9 / 1, 8 / 2, 3 / 4, 7 / 8]))


def test_partial_nan_excluded_from_fit_and_counted_as_error():
    pred = (1.0 / GT).astype(np.float32)
    pred[0, 0] = np.nan
    r = evaluate_prediction(pred, GT, "depth", ALL, min_depth=1e-3, max_depth=10.0)
    assert r["scale"] == pytest.approx(1.0) and r["shift"] == pytest.approx(0.0, abs=1e-12)
    # gt 1 m: bounds 1e-3 (ratio 1000) vs 10 (ratio 10) → 1e-3
    assert r["abs_rel"] == pytest.approx((1 - 1e-3) / 4) and r["delta1"] == 0.75


def test_empty_mask_gives_nan_not_a_score():
    r = evaluate_prediction(np.ones((2, 2)), GT, "depth", np.zeros((2, 2), bool))
    assert r["n_valid"] == 0 and math.isnan(r["abs_rel"])


def test_batched_matches_single():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 5, (3, 4, 5)).astype(np.float32)
    pred = (1 / gt + rng.normal(0, 0.05, gt.shape)).astype(np.float32)
    mask = rng.uniform(size=gt.shape) > 0.2
    batched = depth_metrics(align(pred, gt, mask), gt, mask, 1e-3, 10.0)
    for i in range(3):
        single = depth_metrics(align(pred[i], gt[i], mask[i]), gt[i], mask[i], 1e-3, 10.0)
        for k in METRIC_KEYS:
            assert float(batched[k][i]) == pytest.approx(single[k], rel=1e-12), k


def test_spaces_for_depth_gt():
    pred_disp = 2.0 / GT + 0.1
    for space, scored in (("disparity", "depth"), ("inverse_depth", "inverse_depth")):
        r = evaluate_prediction(pred_disp, GT, "depth", ALL, space=space, min_depth=1e-3, max_depth=10.0)
        assert r["space"] == scored and r["abs_rel"] == pytest.approx(0.0, abs=1e-6)  # float32 input
    r = evaluate_prediction(3 * GT + 1, GT, "depth", ALL, space="depth")
    assert r["space"] == "depth" and r["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        evaluate_prediction(pred_disp, GT, "depth", ALL, space="log")


def test_inverse_depth_hand_computed():
    # target 1/gt = 1, .5, .25, .125 and pred equal to it: exact fit (s 1, t 0)
    pred = np.array([[1.0, 0.5], [0.25, 0.125]])
    r = evaluate_prediction(pred, GT, "depth", ALL, space="inverse_depth")
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    # clip range in inverse depth: [1/max_depth, 1/min_depth] = [0.5, 1] → 1, .5, .5, .5
    r = evaluate_prediction(pred, GT, "depth", ALL, space="inverse_depth", min_depth=1.0, max_depth=2.0)
    assert r["abs_rel"] == pytest.approx((0 + 0 + 1 + 3) / 4)


def test_baselines():
    b = baseline_predictions((3, 2))
    assert b["constant"].shape == (3, 2) and np.all(b["constant"] == 1)
    np.testing.assert_allclose(b["vertical_ramp"][:, 0], [1 / 3, 2 / 3, 1.0])
    assert np.all(b["vertical_ramp"][:, 0] == b["vertical_ramp"][:, 1])
    # the ramp is the right answer for a scene whose disparity grows linearly towards the bottom
    gt = (1.0 / (1.0 + 2.0 * b["vertical_ramp"])).astype(np.float32)
    r = evaluate_prediction(b["vertical_ramp"], gt, "depth", np.ones((3, 2), bool))
    assert r["abs_rel"] == pytest.approx(0.0, abs=1e-6) and r["delta1"] == 1.0  # float32 gt
