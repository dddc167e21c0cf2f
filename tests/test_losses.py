"""Losses (student/losses.py) against values worked out by hand, plus their invariances.

The running example: a 1x6 teacher map t = [0, 1, 2, 3, 4, 8] and student p = [0, 1, 2, 3, 4, 4].
Its depth range [0, 8] gives the HDN-DR contexts
  S=1: all;  S=2 (edge 4): {0,1,2,3}, {4,8};  S=4 (edges 2, 4, 6): {0,1}, {2,3}, {4}, {8}.
"""

import pytest
import torch

from student.losses import (
    LossConfig,
    crop_resample,
    depth_range_contexts,
    distillation_loss,
    feature_loss,
    gradient_loss,
    local_global_loss,
    normalized_l1,
    shared_context_terms,
    shift_scale,
)

T = torch.tensor([[[0.0, 1, 2, 3, 4, 8]]])
P = torch.tensor([[[0.0, 1, 2, 3, 4, 4]]])
FULL = torch.ones_like(T, dtype=torch.bool)


def test_depth_range_contexts_hand_worked():
    contexts = depth_range_contexts(T, FULL).int()[:, 0, 0].tolist()
    assert contexts == [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1],
    ]  # every pixel, the maximum 8 included, is in exactly one bin per level


def test_contexts_ignore_masked_pixels_for_the_range():
    t = torch.tensor([[[0.0, 1, 2, 3, 4, 8, 100]]])
    mask = torch.tensor([[[True] * 6 + [False]]])
    contexts = depth_range_contexts(t, mask)
    assert torch.equal(contexts[..., :6], depth_range_contexts(T, FULL))
    assert not contexts[..., 6].any()


def test_shift_scale_hand_worked_with_plus_one():
    contexts = depth_range_contexts(T, FULL)
    t, s = shift_scale(T, contexts, count_offset=1)
    # medians (lower middle for even counts): all -> 2; {0,1,2,3} -> 1; {4,8} -> 4; {0,1} -> 0; {2,3} -> 2
    assert t[:, 0].tolist() == [2, 1, 4, 0, 2, 4, 8]
    # s = sum|x - t| / (count + 1): 12/7, 4/5, 4/3, 1/3, 1/3, 0/2, 0/2
    expected = torch.tensor([12 / 7, 4 / 5, 4 / 3, 1 / 3, 1 / 3, 0, 0])
    torch.testing.assert_close(s[:, 0], expected)
    t_glob, s_glob = shift_scale(T, FULL[None], count_offset=0)  # Eq. 1: plain mean deviation 12/6
    assert t_glob.item() == 2 and s_glob.item() == pytest.approx(2.0)


def test_global_hand_worked():
    # t: median 2, MAD 12/6 = 2; p: median 2, MAD 8/6 = 4/3.
    # |(p-2)*3/4 - (t-2)/2| = |t-2|/4 on pixels 0..4 (sum 6/4), pixel 5: |1.5 - 3| = 1.5 -> 3 / 6
    assert normalized_l1(P, T, norm="global").item() == pytest.approx(0.5, rel=1e-5)


def test_hybrid_hand_worked():
    # S=1: t scale 12/7, p scale 8/7 (p: median 2, sum 8); residual |7/8 - 7/12|*|t-2| = 7/24*|t-2| on
    #      pixels 0..4 (sum 7/24*6 = 1.75), pixel 5: |2*7/8 - 6*7/12| = 1.75  -> 3.5
    # S=2: {0,1,2,3} identical -> 0; {4,8}: p=[4,4] has s=0 -> N=0, t -> [0, (8-4)/(4/3)=3] -> 3
    # S=4: every bin identical after normalisation -> 0
    # per pixel /3 contexts, summed: 6.5/3; divided by 6 valid pixels -> 13/36 (26/72 without the +1)
    assert normalized_l1(P, T, norm="hybrid").item() == pytest.approx(13 / 36, rel=1e-5)


def test_local_hand_worked():
    assert normalized_l1(P, T, norm="local").item() == pytest.approx(0.0, abs=1e-6)  # p = t in every S=4 bin
    # swap the first two pixels: bin {0,1} has p=[1,0] (median 0, s=1/3 -> N=[3,0]) vs t N=[0,3]: 6 / 6
    p2 = torch.tensor([[[1.0, 0, 2, 3, 4, 4]]])
    assert normalized_l1(p2, T, norm="local").item() == pytest.approx(1.0, rel=1e-5)


def test_none_hand_worked():
    assert normalized_l1(P, T, norm="none").item() == pytest.approx(4 / 6)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        normalized_l1(P, T, norm="median")


@pytest.mark.parametrize("norm", ["global", "hybrid", "local", "none"])
@pytest.mark.parametrize("garbage", [100.0, float("nan")])
def test_masked_pixels_do_not_matter(norm, garbage):
    t = torch.tensor([[[0.0, 1, 2, 3, 4, 8, garbage]]])
    p = torch.tensor([[[0.0, 1, 2, 3, 4, 4, -50]]], requires_grad=True)
    mask = torch.tensor([[[True] * 6 + [False]]])
    loss = normalized_l1(p, t, mask, norm) + gradient_loss(p, t, mask, norm)
    expected = normalized_l1(P, T, None, norm) + gradient_loss(P, T, None, norm)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad[0, 0, 6] == 0


def test_batch_pools_pixels_over_images():
    torch.manual_seed(0)
    p, t = torch.rand(2, 5, 7), torch.rand(2, 5, 7)
    mask = torch.rand(2, 5, 7) > 0.3
    counts = mask.flatten(1).sum(1).float()
    each = torch.stack([normalized_l1(p[i:i + 1], t[i:i + 1], mask[i:i + 1]) for i in range(2)])
    pooled = (each * counts).sum() / counts.sum()
    assert normalized_l1(p, t, mask).item() == pytest.approx(pooled.item(), rel=1e-5)


@pytest.mark.parametrize("norm", ["global", "hybrid", "local"])
def test_normalized_losses_ignore_affine_maps_of_the_student(norm):
    torch.manual_seed(1)
    t = torch.rand(2, 16, 16) * 5
    p = t + 0.3 * torch.randn(2, 16, 16)
    mask = torch.rand(2, 16, 16) > 0.2
    base = normalized_l1(p, t, mask, norm).item()
    assert base > 0.05
    for a, b in [(3.0, 2.0), (0.1, -7.0), (40.0, 0.5)]:
        assert normalized_l1(a * p + b, t, mask, norm).item() == pytest.approx(base, rel=1e-4)


def test_no_normalization_is_not_affine_invariant():
    torch.manual_seed(1)
    t = torch.rand(1, 8, 8)
    assert normalized_l1(t, t, norm="none").item() == 0
    assert normalized_l1(2 * t + 1, t, norm="none").item() > 1.0


def test_gradients_finite_when_contexts_are_empty():
    t = torch.zeros(3, 4, 4)
    t[0, :, 2:] = 8.0  # two values only: the S=4 bins [2, 4) and [4, 6) are empty
    t[1] = 5.0  # flat teacher: zero range
    mask = torch.ones(3, 4, 4, dtype=torch.bool)
    mask[2] = False  # an image with no valid pixel at all
    p = torch.randn(3, 4, 4, requires_grad=True)
    for norm in ["global", "hybrid", "local", "none"]:
        p.grad = None
        loss = normalized_l1(p, t, mask, norm) + gradient_loss(p, t, mask, norm)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
        assert p.grad[2].abs().sum() == 0  # the fully masked image gets no gradient
    contexts = depth_range_contexts(t, mask)
    assert contexts[:, 0].flatten(1).sum(1).tolist() == [16, 8, 8, 8, 0, 0, 8]


def test_crop_resample_hand_worked_on_a_ramp():
    ramp = torch.arange(8.0).repeat(8, 1)[None]  # value = column index; pixel centre i + 0.5
    boxes = torch.tensor([[[0.25, 0.0, 0.75, 1.0]]])  # columns 2..6 in edge coordinates
    crop = crop_resample(ramp, boxes, (8, 8))  # 4 px -> 8 samples, at 2 + (j + 0.5) / 2 - 0.5
    expected = 1.75 + 0.5 * torch.arange(8.0)
    torch.testing.assert_close(crop[0, 0], expected.repeat(8, 1))


def test_local_global_zero_when_student_matches_the_teacher_locals():
    torch.manual_seed(2)
    student = torch.rand(2, 8, 8) + 0.1
    # pixel-aligned boxes as (y0, x0, y1, x1) in pixels: rows 2..6 x cols 1..5, rows 0..4 x cols 4..8
    boxes = torch.tensor([[2, 1, 6, 5], [0, 4, 4, 8]], dtype=torch.float32)[None].repeat(2, 1, 1)
    boxes = boxes[..., [1, 0, 3, 2]] / 8  # -> (x0, y0, x1, y1) as fractions of the 8x8 map
    locals_ = torch.stack([torch.stack([s[2:6, 1:5], s[0:4, 4:8]]) for s in student])
    for norm in ["global", "hybrid", "local", "none"]:
        assert local_global_loss(student, locals_, boxes, norm=norm).item() == pytest.approx(0.0, abs=1e-5)
    # a teacher whose local predictions have their own scale and shift per box
    affine = locals_ * torch.tensor([3.0, 0.5])[None, :, None, None] + torch.tensor([1.0, -2.0])[None, :, None, None]
    assert local_global_loss(student, affine, boxes, norm="hybrid").item() == pytest.approx(0.0, abs=1e-4)
    assert local_global_loss(student, affine, boxes, norm="none").item() > 0.5
    student.requires_grad_(True)
    mask = torch.ones_like(locals_, dtype=torch.bool)
    mask[0, 1] = False
    local_global_loss(student, locals_ + torch.rand_like(locals_), boxes, mask).backward()
    assert torch.isfinite(student.grad).all() and student.grad[0, 0:4, 5:8].abs().sum() == 0  # only box 2 there


def test_gradient_loss_hand_worked_and_zero_for_identical_maps():
    t = torch.rand(2, 16, 16)
    assert gradient_loss(t, t).item() == 0
    assert gradient_loss(3 * t + 1, t, norm="global").item() == pytest.approx(0.0, abs=1e-4)
    ramp = torch.arange(4.0).repeat(4, 1)[None]  # residual = column index with norm="none"
    # stride 1: 12 horizontal unit steps / 16 px; stride 2: [[0,2],[0,2]] -> 2 steps of 2 / 4 px; strides 4, 8: 0
    assert gradient_loss(ramp, torch.zeros_like(ramp), norm="none").item() == pytest.approx(0.75 + 1.0)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, :, 3] = False  # stride 1: pairs (2,3) dropped, 8 unit steps / 12 px; stride 2 unchanged: 4 / 4
    assert gradient_loss(ramp, torch.zeros_like(ramp), mask, norm="none").item() == pytest.approx(8 / 12 + 1.0)
    mask[0, 0, 2] = False  # stride 1: row 0 keeps only (0,1): 7 steps / 11 px; stride 2: row 2 only, 2 / 3 px
    assert gradient_loss(ramp, torch.zeros_like(ramp), mask, norm="none").item() == pytest.approx(7 / 11 + 2 / 3)


def test_feature_loss_hand_worked():
    s = torch.tensor([[[1.0, 0], [1.0, 0], [0.0, 1]]])
    f = torch.tensor([[[0.6, 0.8], [0.8, 0.6], [0.0, 5.0]]])  # cos = 0.6, 0.8, 1.0 (excluded by the margin)
    assert feature_loss(s, f).item() == pytest.approx(1 - 0.7)
    assert feature_loss(s, f, margin=0.7).item() == pytest.approx(1 - 0.6)
    assert feature_loss(f, f).item() == 0  # all tokens aligned: nothing to pull


def test_distillation_loss_is_eq9_with_the_configured_terms_and_weights():
    """The one loss training uses: each term equals its own function (L_grad with the shared-context
    normalisation, global for "none"), the total is Eq. 9's weighted sum, and unused terms are absent."""
    assert LossConfig() == LossConfig("hybrid", True, True, 0.5, 1.0, 2.0, False)  # the paper's λ1, λ2, λ3
    torch.manual_seed(3)
    pred, target = torch.rand(2, 16, 16), torch.rand(2, 16, 16) + 0.1
    valid = torch.rand(2, 16, 16) > 0.1
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]])[None].repeat(2, 1, 1)
    batch = {"target": target, "valid": valid, "locals": torch.rand(2, 2, 6, 6) + 0.1, "boxes": boxes,
             "local_valid": torch.ones(2, 2, 6, 6, dtype=torch.bool)}
    fs, ff = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    for norm in ("hybrid", "none"):
        cfg = LossConfig(norm=norm, lambda_lg=0.3, lambda_feat=0.7, lambda_grad=1.5, feature_loss=True)
        terms = distillation_loss(pred, batch, cfg, fs, ff)
        assert set(terms) == {"sc", "lg", "grad", "feat", "total"}
        assert torch.allclose(terms["sc"], normalized_l1(pred, target, valid, norm=norm))
        assert torch.allclose(terms["lg"], local_global_loss(pred, batch["locals"], boxes, batch["local_valid"], norm))
        assert torch.allclose(terms["grad"], gradient_loss(pred, target, valid, "global" if norm == "none" else norm))
        assert terms["feat"] == feature_loss(fs, ff)
        expected = terms["sc"] + 0.3 * terms["lg"] + 1.5 * terms["grad"] + 0.7 * terms["feat"]
        assert terms["total"].item() == pytest.approx(expected.item())
    lg_only = distillation_loss(pred, batch, LossConfig(use_sc=False, lambda_lg=0.5))  # no L_grad without L_sc
    assert set(lg_only) == {"lg", "total"} and lg_only["total"].item() == pytest.approx(0.5 * lg_only["lg"].item())
    sc_only = distillation_loss(pred, batch, LossConfig(use_lg=False, lambda_grad=0.0), fs, ff)  # feat off
    assert set(sc_only) == {"sc", "total"} and torch.equal(sc_only["total"], sc_only["sc"])


class _Train:  # the [train] keys LossConfig.of reads
    norm, use_sc, use_lg, lambda_lg, lambda_feat, lambda_grad, feature_loss = "local", True, False, 0.2, 0.0, 3.0, True


def test_loss_config_reads_the_train_section():
    assert LossConfig.of(_Train()) == LossConfig("local", True, False, 0.2, 0.0, 3.0, True)
    assert LossConfig.of(_Train(), feature_loss=False).feature_loss is False


@pytest.mark.parametrize("norm,grad_norm", [("hybrid", None), ("global", None), ("local", None), ("none", "global")])
def test_shared_context_terms_equal_the_separate_losses_and_their_gradients(norm, grad_norm):
    """The training step computes L_sc and L_grad from one normalisation: same values, same gradients."""
    torch.manual_seed(5)
    teacher = torch.rand(2, 12, 12) + 0.1
    mask = torch.rand(2, 12, 12) > 0.2
    a = (torch.rand(2, 12, 12) * 3).requires_grad_()
    b = a.detach().clone().requires_grad_()
    sc, grad = shared_context_terms(a, teacher, mask, norm, grad_norm)
    sc_ref = normalized_l1(b, teacher, mask, norm)
    grad_ref = gradient_loss(b, teacher, mask, grad_norm or norm)
    assert sc.item() == pytest.approx(sc_ref.item(), rel=1e-6) and sc.item() > 0
    assert grad.item() == pytest.approx(grad_ref.item(), rel=1e-6) and grad.item() > 0
    (sc + 2 * grad).backward()
    (sc_ref + 2 * grad_ref).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
