"""The evaluation protocol: the standard zero-shot protocol as pure functions (no files).

Per image (batch size 1, as Marigold's eval script): resize so the short side is `resolution` (sides
multiples of 14), predict, resize bilinearly to the GT size, fit scale and shift by least squares in the
`align` space, clip to the dataset's range, score; average per image, then per family. Failures are
scored, never skipped; samples with too few valid GT pixels have no score and say why. Every dataset is
also scored with the `constant` and `vertical_ramp` baselines. Spec: docs/evaluation.md.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.config import EvalCfg
from pipeline.datasets import EvalDataset, EvalSample, open_dataset
from student.infer import predict_disparity
from student.metrics import METRIC_KEYS, Aligned, align_and_score, baseline_predictions

SUMMARY_KEYS = ("abs_rel", "delta1", "delta2", "delta3", "rmse")
BASELINES = ("constant", "vertical_ramp")
WIN_METRIC = "abs_rel"  # lower is better
FIT_MAX_RES = {"eth3d": 1024}  # Marigold `alignment_max_res` per dataset
ERROR_CAP = 0.5  # pictures: per-pixel relative error shown on [0, ERROR_CAP]
MIN_VALID_PIXELS = EvalCfg.model_fields["min_valid_pixels"].default
# Why a sample has no score (the `failure` of a skipped row): never a prediction's fault, always the data's.
SKIPS = {"no_valid_gt": "no valid ground-truth pixel", "few_valid_gt": "too few valid ground-truth pixels",
         "no_gt": "no ground truth"}

PredictFn = Callable[[torch.Tensor], torch.Tensor]


# -- one sample ----------------------------------------------------------------------------------

def alignment_max_res(dataset: EvalDataset) -> int | None:
    """Marigold's `alignment_max_res` for this dataset (the least-squares fit on a subsample), or None."""
    return FIT_MAX_RES.get(dataset.name)


def gt_disparity(sample: EvalSample) -> np.ndarray:
    """The sample's GT as disparity (1/depth, or the stereo disparity itself); 0 where invalid."""
    valid = sample.valid & (sample.gt > 0)
    if sample.gt_type == "disparity":
        return np.where(valid, sample.gt, 0.0).astype(np.float32)
    return np.where(valid, 1.0 / np.where(valid, sample.gt, 1.0), 0.0).astype(np.float32)


def _fit_input(pred_disp: np.ndarray, sample: EvalSample, space: str) -> np.ndarray:
    """What the least-squares fit sees: depth for depth-space alignment of depth GT, else disparity."""
    if space == "depth" and sample.gt_type == "depth":
        p = np.asarray(pred_disp, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, 1.0 / p, np.nan)  # non-positive / NaN disparity → failed pixel
    return np.asarray(pred_disp)


def score_sample(pred_disp: np.ndarray, sample: EvalSample, space: str = "disparity",
                 min_depth: float | None = None, max_depth: float | None = None,
                 fit_max_res: int | None = None) -> dict:
    """`score_and_align` without the maps."""
    return score_and_align(pred_disp, sample, space, min_depth, max_depth, fit_max_res)[0]


def score_and_align(pred_disp: np.ndarray, sample: EvalSample, space: str = "disparity",
                    min_depth: float | None = None, max_depth: float | None = None,
                    fit_max_res: int | None = None) -> tuple[dict, Aligned]:
    """Score one disparity prediction already at GT size: METRIC_KEYS, scale, shift, n_valid, space, failure;
    and the aligned maps the pictures show.

    `failure` is "" (ok), "nonfinite" (no finite prediction on the valid pixels), "partial_nonfinite"
    (some), or "constant" (flat: the least-squares scale is 0). Failures are scored, not skipped.
    """
    pred_disp = np.asarray(pred_disp)
    if pred_disp.shape != sample.gt.shape:
        raise ValueError(f"{sample.id}: prediction {pred_disp.shape} is not at the GT size {sample.gt.shape}")
    fit_in = _fit_input(pred_disp, sample, space)
    res, maps = align_and_score(fit_in, sample.gt, sample.gt_type, sample.valid, space=space, min_depth=min_depth,
                                max_depth=max_depth, fit_max_res=fit_max_res)
    used = sample.valid & (sample.gt > 0) & np.isfinite(sample.gt)
    finite = np.isfinite(fit_in[used])
    if used.any() and not finite.any():
        failure = "nonfinite"
    elif not finite.all():
        failure = "partial_nonfinite"
    elif used.any() and res["scale"] == 0.0:
        failure = "constant"
    else:
        failure = ""
    return {**res, "failure": failure}, maps


def _shown(maps: Aligned) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pictures: (GT, aligned prediction) as disparity-like maps (larger = nearer; NaN where unknown)
    and the per-pixel relative error |a − t| / t in the space the sample was scored in."""
    valid, target = maps.valid, maps.target
    with np.errstate(divide="ignore", invalid="ignore"):
        if maps.space == "depth":
            shown_pred = 1.0 / maps.clipped()
            shown_gt = np.where(valid, 1.0 / np.where(valid, target, 1.0), np.nan)
        else:
            shown_pred, shown_gt = maps.pred, np.where(valid, target, np.nan)
        err = np.where(valid, np.abs(maps.clipped() - target) / np.where(valid, target, 1.0), np.nan)
    err = np.where(valid & ~np.isfinite(err), np.inf, err)  # failed pixel: shown at the top of the scale
    return shown_gt, shown_pred, err


def render_picture(sample: EvalSample, maps: Aligned, result: dict, space: str, dataset_label: str) -> bytes:
    """PNG: RGB | ground truth | aligned prediction | relative error. GT and prediction share one colour
    scale (GT's 2–98 % range, disparity-like: warm = near); black = no ground truth / failed pixel."""
    import matplotlib.pyplot as plt

    from pipeline.plots import colorize

    gt_show, pred_show, err = _shown(maps)
    vals = gt_show[np.isfinite(gt_show)]
    lo, hi = (np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0))
    panels = [sample.rgb, colorize(gt_show, lo, hi), colorize(pred_show, lo, hi),
              colorize(np.where(np.isinf(err), ERROR_CAP, err), 0.0, ERROR_CAP, cmap="magma")]
    h, w = sample.gt.shape
    panel_h = 2.4
    panel_w = min(panel_h * w / h, 6.0)
    fig, axes = plt.subplots(1, 4, figsize=(4 * panel_w, panel_h + 0.5))
    shown = "disparity" if sample.gt_type == "disparity" else "1/depth"
    fit_space = "disparity" if sample.gt_type == "disparity" else space
    titles = ["RGB", f"ground truth (as {shown})", f"prediction, LSQ-aligned in {fit_space}",
              f"|error|/GT (0–{ERROR_CAP})  AbsRel {result['abs_rel']:.3f} δ1 {result['delta1']:.3f}"]
    return _panels_png(fig, axes, panels, titles, f"{dataset_label} / {sample.id} ({sample.family})")


def comparison_picture(sample: EvalSample, preds: dict[str, np.ndarray], space: str, dataset_label: str,
                       min_depth: float | None = None, max_depth: float | None = None,
                       fit_max_res: int | None = None) -> bytes:
    """PNG, one row: RGB | ground truth | each model's aligned prediction (titled with its AbsRel) | the
    last model's relative error. All depth panels share the GT's colour scale, as in render_picture."""
    import matplotlib.pyplot as plt

    from pipeline.plots import colorize

    shown, err, titles = [], None, []
    for name, disp in preds.items():
        res, maps = score_and_align(disp, sample, space, min_depth, max_depth, fit_max_res)
        gt_show, pred_show, err = _shown(maps)
        shown.append(pred_show)
        titles.append(f"{name}  AbsRel {res['abs_rel']:.3f}")
    vals = gt_show[np.isfinite(gt_show)]
    lo, hi = (np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0))
    panels = [sample.rgb, colorize(gt_show, lo, hi), *[colorize(p, lo, hi) for p in shown],
              colorize(np.where(np.isinf(err), ERROR_CAP, err), 0.0, ERROR_CAP, cmap="magma")]
    titles = ["RGB", "ground truth", *titles, f"|error|/GT of {list(preds)[-1]}"]
    h, w = sample.gt.shape
    panel_w = min(2.2 * w / h, 5.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * panel_w, 2.7))
    return _panels_png(fig, axes, panels, titles, f"{dataset_label} / {sample.id} ({sample.family})")


# -- one dataset ---------------------------------------------------------------------------------

def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows]
    return float(np.mean(vals)) if vals else math.nan


def aggregate(rows: list[dict], prefix: str = "") -> dict:
    """Per-image rows (with a valid score) → {n, SUMMARY_KEYS, sample_mean, families, mean_over}.

    Headline = mean over families of per-family means when there is more than one family, else the
    plain mean over images (docs/evaluation.md)."""
    keys = [prefix + k for k in SUMMARY_KEYS]
    sample_mean = {k: _mean(rows, pk) for k, pk in zip(SUMMARY_KEYS, keys)}
    fams: dict[str, list[dict]] = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    families = {f: {"n": len(rs), **{k: _mean(rs, pk) for k, pk in zip(SUMMARY_KEYS, keys)}}
                for f, rs in sorted(fams.items())}
    out = {"n": len(rows)}
    if len(families) > 1:
        out.update({k: float(np.mean([v[k] for v in families.values()])) for k in SUMMARY_KEYS})
        out["mean_over"] = "families"
    else:
        out.update(sample_mean)
        out["mean_over"] = "samples"
    out["sample_mean"] = sample_mean
    out["families"] = families
    return out


def _versus(model: float, base: float) -> str:
    if math.isclose(model, base, rel_tol=1e-9, abs_tol=1e-12):
        return "tie"
    return "win" if model < base else "loss"


def _picture_indices(n: int, k: int) -> set[int]:
    if k <= 0 or n <= 0:
        return set()
    return {int(i) for i in np.linspace(0, n - 1, min(k, n)).round()}


def _skipped_row(label: str, sid: str, family: str, failure: str, reason: str,
                 sample: EvalSample | None = None, n_valid: int = 0) -> dict:
    """The per-sample row of a sample that has no score: NaN metrics, the reason in `skipped`."""
    nan = math.nan
    row = {"dataset": label, "id": sid, "family": family, "gt_type": sample.gt_type if sample else "",
           "height": int(sample.gt.shape[0]) if sample else None, "width": int(sample.gt.shape[1]) if sample else None,
           "n_valid": n_valid, "space": "", "failure": failure, "skipped": reason,
           **{k: nan for k in METRIC_KEYS}, "scale": nan, "shift": nan}
    row.update({f"{b}_{k}": nan for b in BASELINES for k in SUMMARY_KEYS})
    row.update({f"vs_{b}": "" for b in BASELINES})
    return row


def _too_few(n_valid: int, min_valid_pixels: int) -> tuple[str, str]:
    if n_valid == 0:
        return "no_valid_gt", "no valid ground-truth pixel (all missing, zero, negative, non-finite or out of range)"
    return "few_valid_gt", f"{n_valid} valid ground-truth pixels < eval.min_valid_pixels = {min_valid_pixels}"


def evaluate(predict_fn: PredictFn, dataset: EvalDataset | str, align: str = "disparity", resolution: int = 518,
             max_samples: int | None = None, pictures: int = 0,
             on_picture: Callable[[str, bytes], None] | None = None, device: str | torch.device = "cpu",
             label: str | None = None, on_sample: Callable[[dict], None] | None = None,
             min_valid_pixels: int = MIN_VALID_PIXELS) -> tuple[list[dict], dict]:
    """Evaluate `predict_fn` on one dataset; no files are written. Returns (per-sample rows, summary).

    predict_fn: (B,3,h,w) float in [0,1] (h, w multiples of 14, short side `resolution`) →
    (B,h',w') disparity (any size: it is resized to the GT bilinearly). `dataset`: an EvalDataset or
    a `kind:PATH` spec. `max_samples` evaluates the first N only (recorded in the summary).
    `pictures` (with `on_picture(file_stem, png_bytes)`) renders that many samples spread evenly over
    the dataset. `on_sample(row)` is called after each sample (progress bars). A sample with fewer
    than `min_valid_pixels` valid GT pixels is not predicted nor averaged: its row names the reason,
    as do the rows of entries the loader could not pair (`skipped_items`); the summary lists them all.
    """
    ds = open_dataset(dataset) if isinstance(dataset, str) else dataset
    label = label or ds.name
    if resolution < 14 or resolution % 14:
        raise ValueError(f"resolution must be a positive multiple of 14, got {resolution}")
    if min_valid_pixels < 1:
        raise ValueError(f"min_valid_pixels must be at least 1, got {min_valid_pixels}")
    n_listed = len(ds)
    n = n_listed if max_samples is None else min(n_listed, int(max_samples))
    fit_max_res = alignment_max_res(ds)
    rng = (ds.min_depth, ds.max_depth)
    want_pics = _picture_indices(n, pictures) if on_picture is not None else set()
    rows: list[dict] = []
    t0 = time.time()
    for i in range(n):
        sample = ds[i]
        n_valid = int((sample.valid & (sample.gt > 0) & np.isfinite(sample.gt)).sum())
        if n_valid < min_valid_pixels:
            rows.append(_skipped_row(label, sample.id, sample.family, *_too_few(n_valid, min_valid_pixels),
                                     sample=sample, n_valid=n_valid))
            if on_sample is not None:
                on_sample(rows[-1])
            continue
        pred = predict_disparity(predict_fn, sample.rgb, resolution, device=device)
        res, maps = score_and_align(pred, sample, align, *rng, fit_max_res)
        row = {"dataset": label, "id": sample.id, "family": sample.family, "gt_type": sample.gt_type,
               "height": int(sample.gt.shape[0]), "width": int(sample.gt.shape[1]), "n_valid": res["n_valid"],
               "space": res["space"], "failure": res["failure"], "skipped": "",
               **{k: res[k] for k in METRIC_KEYS}, "scale": res["scale"], "shift": res["shift"]}
        for b, base_pred in baseline_predictions(sample.gt.shape).items():
            bres = score_sample(base_pred, sample, align, *rng, fit_max_res)
            row.update({f"{b}_{k}": bres[k] for k in SUMMARY_KEYS})
            row[f"vs_{b}"] = _versus(row[WIN_METRIC], row[f"{b}_{WIN_METRIC}"])
        rows.append(row)
        if i in want_pics:
            png = render_picture(sample, maps, res, align, label)
            on_picture(f"{safe_name(label)}_{safe_name(sample.id)}", png)
        if on_sample is not None:
            on_sample(row)
    rows.extend(_skipped_row(label, sid, fam, "no_gt", reason) for sid, fam, reason in ds.skipped_items)
    scored = [r for r in rows if not r["skipped"]]
    skipped = [{"id": r["id"], "family": r["family"], "failure": r["failure"], "reason": r["skipped"]}
               for r in rows if r["skipped"]]
    summary = {"dataset": label, **aggregate(scored)}
    summary["baselines"] = {b: aggregate(scored, prefix=f"{b}_") for b in BASELINES}
    summary["wins"] = {b: {plural: sum(r[f"vs_{b}"] == v for r in scored)
                           for v, plural in (("win", "wins"), ("loss", "losses"), ("tie", "ties"))}
                       for b in BASELINES}
    summary["win_metric"] = WIN_METRIC
    summary.update({
        "n_listed": n_listed, "n_no_gt": sum(r["failure"] == "no_valid_gt" for r in rows),
        "skipped_by_loader": ds.skipped, "max_samples": max_samples, "n_skipped": len(skipped), "skipped": skipped,
        "failures": {f: sum(r["failure"] == f for r in rows)
                     for f in ("nonfinite", "partial_nonfinite", "constant", *SKIPS)},
        "protocol": {"align": align, "resolution": resolution, "min_valid_pixels": min_valid_pixels,
                     "fit": "per-image least-squares scale and shift", "resize": "bilinear to GT size",
                     "depth_range": [ds.min_depth, ds.max_depth], "fit_max_res": fit_max_res,
                     "stereo_disparity_gt": "fitted and scored in disparity",
                     "average": "per image, then per family, then across families" if summary["mean_over"] == "families"
                                else "per image, then over images"},
        "seconds": round(time.time() - t0, 2),
    })
    return rows, summary


def safe_name(text: str) -> str:
    """A file-name-safe version of an id or name (slashes and colons become '_')."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def _panels_png(fig, axes, panels, titles, heading: str) -> bytes:
    from pipeline.plots import png_bytes

    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(heading, fontsize=9)
    return png_bytes(fig)
