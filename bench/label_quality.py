"""Label quality: how good are the pseudo-labels the score stage selects, measured against real ground truth?

    python -m bench label_quality        (or: python -m bench.label_quality [--quick])

shard → teach → score on the 15 realeval images used as if unlabeled (no stage sees the GT), with three
real TFLite teachers; each cached global label is cut to its region and scored with the eval protocol.
Reported: each teacher, the per-image oracle, each policy's label (a draw policy's expected AbsRel), and
how often a metric picks the oracle's teacher. `CROPS` scales the paper's crops to these 277-480 px
photos. Evaluation data: the bench measures, it must not be used to tune anything.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DAD_SHARED", str(REPO.parent / "shared")))
REALEVAL = SHARED / "data" / "realeval"
MODELS = SHARED / "models"
ALIGN = "inverse_depth"

TEACHERS: dict[str, dict] = {
    "pydnet": {
        "adapter": "tflite",
        "model": "https://github.com/Suraj520/OMA/raw/a7c85e5b68b87bb39364c40055df69af7e080058/ARPydnet/app/src/"
                 "main/assets/pydnet_v2_half_float16.tflite",
        "sha256": "e96ce0fec7ef75c225998bbd8635ffeebe410d4d193695c9ccd8f794c493b40c",
        "output_space": "disparity", "license": "research-only", "flip_average": True, "prior": 0.7,
        "batch_size": 8, "num_cpus": 1, "actors": 2,
    },
    "fastdepth": {
        "adapter": "tflite",
        "model": "https://github.com/openmv/openmv/raw/49a017eafd3aebda9b6b827bd2a367ded1592efc/lib/models/"
                 "fast_depth_224.tflite",
        "sha256": "e8957602750f16ac130210868f4403b38b4042f0d10c00b89ec03fc3dc840125",
        "output_space": "metric_depth", "license": "MIT", "prior": 0.15,
        "batch_size": 8, "num_cpus": 1, "actors": 1,
    },
    "pydnetpp": {
        "adapter": "tflite",
        "model": "https://github.com/FilippoAleotti/mobilePydnet/raw/0fc3030630cd76ef8f0a64da43818340ee3dfb65/"
                 "Android/app/src/main/assets/optimized_pydnet++.tflite",
        "sha256": "ba97991edb4a516096557aedf56e61bf4aa4c30e34d6a38f061ef449ecf16bc7",
        "output_space": "depth", "output_index": 0, "license": "research-only", "prior": 0.15,
        "batch_size": 8, "num_cpus": 1, "actors": 2,
    },
}
CROPS = {"min_region": 256, "patch": 224, "local_count": 2, "global_size": 392, "local_store": 196}
METRICS = ("lg_consistency", "agreement", "combined")
# (label, score.policy, score.metric); the first is the config's own selection (the default policy)
POLICIES = (("paper", "paper", "combined"),
            *((f"best_{m}", "best", m) for m in METRICS),
            ("weighted", "weighted", "combined"),
            ("mix", "mix", "combined"))


# -- pure part: one label against ground truth ----------------------------------------------------

def cut_region(sample, region: Sequence[int]):
    """The EvalSample restricted to the square region (x0, y0, side) in native pixels."""
    from pipeline.datasets import EvalSample

    x0, y0, side = (int(v) for v in region)
    h, w = sample.gt.shape
    if x0 < 0 or y0 < 0 or x0 + side > w or y0 + side > h:
        raise ValueError(f"{sample.id}: region {tuple(region)} leaves the {w}x{h} image")
    ys, xs = slice(y0, y0 + side), slice(x0, x0 + side)
    return EvalSample(id=sample.id, rgb=np.ascontiguousarray(sample.rgb[ys, xs]),
                      gt=np.ascontiguousarray(sample.gt[ys, xs]), gt_type=sample.gt_type,
                      valid=np.ascontiguousarray(sample.valid[ys, xs]), family=sample.family)


def label_disparity(label: np.ndarray, space: str, size: tuple[int, int]) -> np.ndarray:
    """A cached label (G×G, in `space`) → disparity at `size` (bilinear, NaN where the label is invalid)."""
    import torch
    import torch.nn.functional as F

    from pipeline.cache import as_disparity

    disp = torch.from_numpy(np.ascontiguousarray(as_disparity(np.asarray(label), space), dtype=np.float32))
    if tuple(disp.shape) == tuple(size):
        return disp.numpy()
    return F.interpolate(disp[None, None], size=tuple(int(s) for s in size), mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def label_score(label: np.ndarray, space: str, region: Sequence[int], sample, align: str = ALIGN,
                min_depth: float | None = None, max_depth: float | None = None) -> dict:
    """Score one label covering `region` of `sample` with the eval protocol (`score_sample`): abs_rel, delta1, …"""
    from student.evaluation import score_sample

    cut = cut_region(sample, region)
    pred = label_disparity(label, space, cut.gt.shape)
    return score_sample(pred, cut, align, min_depth, max_depth)


def expected_draw(probs: Mapping[str, float], values: Mapping[str, float]) -> float:
    """Expected value of a per-step draw: Σ_t p_t·v_t over the teachers with p_t > 0 (p renormalised)."""
    used = {t: float(p) for t, p in probs.items() if p > 0}
    total = sum(used.values())
    if total <= 0:
        return math.nan
    return float(sum(p * float(values[t]) for t, p in used.items()) / total)


def oracle_pick(values: Mapping[str, float]) -> tuple[str | None, float]:
    """The teacher with the lowest finite value (ties: the first name in sorted order), and that value."""
    finite = {t: float(v) for t, v in values.items() if v is not None and np.isfinite(v)}
    if not finite:
        return None, math.nan
    best = min(finite, key=lambda t: (finite[t], t))
    return best, finite[best]


def family_mean(values: Sequence[float], families: Sequence[str]) -> dict:
    """Per-image values → {mean (over family means), sample_mean, families, n}; NaNs left out and counted."""
    fams: dict[str, list[float]] = {}
    for v, f in zip(values, families):
        if v is not None and np.isfinite(v):
            fams.setdefault(f, []).append(float(v))
    per = {f: float(np.mean(vs)) for f, vs in sorted(fams.items())}
    kept = [v for vs in fams.values() for v in vs]
    return {"mean": float(np.mean(list(per.values()))) if per else math.nan,
            "sample_mean": float(np.mean(kept)) if kept else math.nan,
            "families": per, "n": len(kept), "n_missing": len(values) - len(kept)}


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall τ-a between two short rankings (NaN pairs skipped); NaN with fewer than two pairs."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and np.isfinite(x) and np.isfinite(y)]
    s, n = 0.0, 0
    for i in range(len(pairs)):
        for j in range(i + 1, len(pairs)):
            s += np.sign(pairs[i][0] - pairs[j][0]) * np.sign(pairs[i][1] - pairs[j][1])
            n += 1
    return float(s / n) if n else math.nan


# -- the run -----------------------------------------------------------------------------------------

def base_raw(root: str, quick: bool) -> dict:
    crops = dict(CROPS, local_count=1) if quick else dict(CROPS)
    return {"run": {"root": root, "seed": 0, "num_cpus": 2, "model_mirror": [str(MODELS)]},
            "corpus": {"sources": [str(REALEVAL / "rgb" / "*.png")], "shard_size": 8, "image_format": "png"},
            "crops": crops, "teachers": {n: dict(t) for n, t in TEACHERS.items()},
            "score": {"policy": "paper"}, "eval": {"align": ALIGN}}


def run_stages(raw: dict) -> tuple[dict, dict[str, dict]]:
    """shard → teach → score (paper), then score again per policy; (stage seconds, selections by label)."""
    from pipeline.config import load_config
    from pipeline.storage import Root
    from stages import score, shard, teach

    seconds, selections = {}, {}
    cfg = load_config(raw=raw)
    for name, stage in (("shard", shard), ("teach", teach)):
        t0 = time.time()
        stage.run(cfg)
        seconds[name] = round(time.time() - t0, 2)
    root = Root(cfg.run.root)
    for label, policy, metric in POLICIES:
        c = load_config(raw=raw, overrides=[f'score.policy="{policy}"', f'score.metric="{metric}"'])
        t0 = time.time()
        summary = score.run(c)
        seconds[f"score_{label}"] = round(time.time() - t0, 2)
        sel = root.read_table("scores", "selection.parquet").to_pylist()
        selections[label] = {"rows": {r["row"]: {t: r[f"p_{t}"] for t in c.teachers} for r in sel},
                             "dropped": summary["dropped"], "policy": policy, "metric": metric}
    return seconds, selections


def measure(root_url: str, selections: dict[str, dict]) -> dict:
    """Score every teacher's, policy's and the oracle's label on every sample against the GT."""
    from pipeline.cache import as_disparity, open_cache, read_rows
    from pipeline.datasets.realeval import open_realeval
    from pipeline.storage import Root
    from pipeline.targets import mix_targets
    from stages.score import quality

    root = Root(root_url)
    plan = {r["row"]: r for r in root.read_table("crops", "plan.parquet").to_pylist()}
    man = sorted(root.read_table("corpus", "manifest.parquet").to_pylist(), key=lambda r: r["row"])
    scores = {(r["row"], r["teacher"]): r for r in root.read_table("scores", "scores.parquet").to_pylist()}
    ds = open_realeval(str(REALEVAL))
    index = {Path(item["rgb_path"]).stem: i for i, item in enumerate(ds.items)}
    rows = [r["row"] for r in man]
    names = list(TEACHERS)
    cache, spaces = {}, {}
    for t in names:
        group = open_cache(root, t)
        spaces[t] = group.attrs["output_space"]
        cache[t] = read_rows(group, rows)
    per_image = []
    for i, rec in enumerate(man):
        stem = Path(rec["source_uri"]).stem
        sample = ds[index[stem]]
        p = plan[rec["row"]]
        if (sample.gt.shape[1], sample.gt.shape[0]) != (rec["width"], rec["height"]):
            raise ValueError(f"{stem}: manifest says {rec['width']}x{rec['height']}, GT is {sample.gt.shape[::-1]}")
        region = (p["region_x0"], p["region_y0"], p["region_side"])
        item = {"id": sample.id, "family": sample.family, "gt_type": sample.gt_type, "row": rec["row"],
                "region": list(region), "stored_side": p["stored_side"], "teachers": {}, "metrics": {},
                "policies": {}}
        for t in names:
            res = label_score(cache[t]["global"][i], spaces[t], region, sample, ALIGN, ds.min_depth, ds.max_depth)
            item["teachers"][t] = {"abs_rel": res["abs_rel"], "delta1": res["delta1"], "n_valid": res["n_valid"],
                                   "failure": res["failure"]}
            srow = scores[(rec["row"], t)]
            item["metrics"][t] = {m: quality(srow, m) for m in METRICS}
        absrel = {t: v["abs_rel"] for t, v in item["teachers"].items()}
        delta1 = {t: v["delta1"] for t, v in item["teachers"].items()}
        item["oracle"], item["oracle_abs_rel"] = oracle_pick(absrel)
        for label, sel in selections.items():
            probs = sel["rows"].get(rec["row"])
            if probs is None:  # dropped by the policy: no label for this sample
                item["policies"][label] = {"abs_rel": math.nan, "delta1": math.nan, "probs": None}
                continue
            if sel["policy"] == "mix":
                maps = [as_disparity(cache[t]["global"][i], spaces[t]) for t in names]
                valids = [cache[t]["global_valid"][i] for t in names]
                mixed, mv = mix_targets(maps, valids, [probs[t] for t in names])
                res = label_score(np.where(mv, mixed, np.nan), "disparity", region, sample, ALIGN,
                                  ds.min_depth, ds.max_depth)
                a, d = res["abs_rel"], res["delta1"]
            else:
                a, d = expected_draw(probs, absrel), expected_draw(probs, delta1)
            item["policies"][label] = {"abs_rel": a, "delta1": d, "probs": {t: round(v, 4) for t, v in probs.items()}}
        per_image.append(item)
    return summarize(per_image, selections)


def summarize(per_image: list[dict], selections: dict[str, dict]) -> dict:
    """Per-image results → the table: teachers, policies, oracle (family means), gaps, metric agreement."""
    names = list(per_image[0]["teachers"]) if per_image else list(TEACHERS)
    fams = [r["family"] for r in per_image]

    def agg(values: list[float]) -> dict:
        return family_mean(values, fams)

    teachers = {t: {"abs_rel": agg([r["teachers"][t]["abs_rel"] for r in per_image]),
                    "delta1": agg([r["teachers"][t]["delta1"] for r in per_image])} for t in names}
    best_teacher = min(names, key=lambda t: (teachers[t]["abs_rel"]["mean"], t))
    best_abs = teachers[best_teacher]["abs_rel"]["mean"]
    oracle = {"abs_rel": agg([r["oracle_abs_rel"] for r in per_image]),
              "picks": {t: sum(r["oracle"] == t for r in per_image) for t in names}}
    policies = {}
    for label, sel in selections.items():
        a = agg([r["policies"][label]["abs_rel"] for r in per_image])
        d = agg([r["policies"][label]["delta1"] for r in per_image])
        share = {t: float(np.mean([(r["policies"][label]["probs"] or {}).get(t, 0.0) for r in per_image]))
                 for t in names}
        policies[label] = {"policy": sel["policy"], "metric": sel["metric"] if sel["policy"] != "paper" else None,
                           "abs_rel": a, "delta1": d, "gap_to_oracle": a["mean"] - oracle["abs_rel"]["mean"],
                           "ratio_to_best_teacher": a["mean"] / best_abs if best_abs > 0 else math.nan,
                           "dropped": sel["dropped"], "share": share,
                           "kind": "mixed map" if sel["policy"] == "mix" else "expected over the per-step draw"}
    agreement = {}
    for m in METRICS:
        picks = [oracle_pick({t: r["metrics"][t][m] for t in names})[0] for r in per_image]
        hits = [p == r["oracle"] for p, r in zip(picks, per_image)]
        taus = [kendall_tau([r["metrics"][t][m] for t in names], [r["teachers"][t]["abs_rel"] for t in names])
                for r in per_image]
        agreement[m] = {"agree": int(sum(hits)), "n": len(hits), "rate": float(np.mean(hits)) if hits else math.nan,
                        "kendall_tau": float(np.nanmean(taus)) if np.isfinite(taus).any() else math.nan,
                        "picks": {t: picks.count(t) for t in names}}
    primary = max(names, key=lambda t: TEACHERS.get(t, {}).get("prior", 0.0))
    hits = [r["oracle"] == primary for r in per_image]
    agreement["always_" + primary] = {"agree": int(sum(hits)), "n": len(hits),
                                      "rate": float(np.mean(hits)) if hits else math.nan,
                                      "note": "baseline: always pick the highest-prior teacher"}
    paper = policies.get("paper", {})
    return {"teachers": teachers, "best_teacher": best_teacher, "best_teacher_abs_rel": best_abs, "oracle": oracle,
            "policies": policies, "agreement": agreement,
            "paper_at_least_as_good_as_best_teacher": bool(paper and paper["abs_rel"]["mean"] <= best_abs),
            "per_image": [{**{k: r[k] for k in ("id", "family", "gt_type", "region", "stored_side", "oracle")},
                           "teachers": {t: round(v["abs_rel"], 4) for t, v in r["teachers"].items()},
                           "failures": {t: v["failure"] for t, v in r["teachers"].items() if v["failure"]},
                           "metrics": {t: {m: (round(v, 4) if v is not None and np.isfinite(v) else None)
                                           for m, v in ms.items()} for t, ms in r["metrics"].items()},
                           "policies": {p: round(v["abs_rel"], 4) for p, v in r["policies"].items()}}
                          for r in per_image],
            "averaging": "per image, then per group_family, then across families; sample_mean = plain mean"}


def print_table(table: dict, wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    fam_names = sorted({f for t in table["teachers"].values() for f in t["abs_rel"]["families"]})
    out = Table(title=f"label quality on realeval (AbsRel, align {ALIGN}; {wall:.0f} s)",
                caption="AbsRel, δ1 = mean over families of per-family means; per image = plain mean; "
                        "draw policies: expected value over the draw")
    for col in ("label", "AbsRel", "per image", "δ1", "− oracle", "÷ best", *fam_names):
        out.add_column(col, justify="left" if col == "label" else "right")

    def row(label: str, a: dict, d: dict | None, gap: float, ratio: float) -> None:
        cells = [f"{a['mean']:.3f}", f"{a['sample_mean']:.3f}", "" if d is None else f"{d['mean']:.3f}",
                 f"{gap:+.3f}", f"{ratio:.3f}"]
        out.add_row(label, *cells, *[f"{a['families'].get(f, math.nan):.3f}" for f in fam_names])

    o = table["oracle"]["abs_rel"]["mean"]
    best = table["best_teacher_abs_rel"]
    for t, v in table["teachers"].items():
        row(f"teacher {t}", v["abs_rel"], v["delta1"], v["abs_rel"]["mean"] - o, v["abs_rel"]["mean"] / best)
    for label, v in table["policies"].items():
        row(f"policy {label}", v["abs_rel"], v["delta1"], v["gap_to_oracle"], v["ratio_to_best_teacher"])
    row("oracle", table["oracle"]["abs_rel"], None, 0.0, o / best)
    console = Console(width=max(Console().width, 170))
    console.print(out)
    agree = Table(title="does the score pick the oracle's teacher?")
    for col in ("metric", "agrees", "rate", "Kendall τ", "picks"):
        agree.add_column(col, justify="left" if col in ("metric", "picks") else "right")
    for m, v in table["agreement"].items():
        tau = v.get("kendall_tau")
        agree.add_row(m, f"{v['agree']}/{v['n']}", f"{v['rate']:.2f}", "" if tau is None else f"{tau:+.2f}",
                      ", ".join(f"{t} {n}" for t, n in v.get("picks", {}).items()))
    agree.add_row("oracle", "", "", "", ", ".join(f"{t} {n}" for t, n in table["oracle"]["picks"].items()))
    console.print(agree)


def run(quick: bool = False, root: str | None = None) -> dict[str, dict]:
    t0 = time.time()
    from pipeline.runtime import shutdown_ray

    if not (REALEVAL / "manifest.csv").exists() or not MODELS.is_dir():
        raise FileNotFoundError(f"needs {REALEVAL} and {MODELS} (set DAD_SHARED to the shared folder)")
    tmp = None if root else tempfile.mkdtemp(prefix="dad-label-quality-")
    root = root or str(Path(tmp) / "run")
    try:
        raw = base_raw(root, quick)
        seconds, selections = run_stages(raw)
        t1 = time.time()
        table = measure(root, selections)
        seconds["measure"] = round(time.time() - t1, 2)
    finally:
        shutdown_ray()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.time() - t0
    settings = {"crops": raw["crops"], "corpus": raw["corpus"] | {"sources": ["realeval/rgb/*.png"]},
                "executor": "ray (local cluster, run.num_cpus = 2)", "align": ALIGN,
                "score": {"temperature": 0.05, "mix_metric": "combined", "weighted_metric": "combined"},
                "teachers": {n: {k: v for k, v in t.items() if k not in ("sha256",)} | {"file_sha256": t["sha256"][:16]}
                             for n, t in TEACHERS.items()}}
    detail = {"table": table, "settings": settings, "wall_s": round(wall, 1), "stage_seconds": seconds,
              "n_images": len(table["per_image"]), "quick": quick}
    print_table(table, wall)
    best, oracle = table["best_teacher_abs_rel"], table["oracle"]["abs_rel"]["mean"]
    paper, best_pol = table["policies"]["paper"], table["policies"]["best_combined"]
    return {
        "label_quality_paper": {
            "value": paper["ratio_to_best_teacher"], "unit": "AbsRel ratio (paper label ÷ best single teacher)",
            "goal": "<= 1.0", "detail": {"paper_abs_rel": paper["abs_rel"]["mean"], "best_teacher":
                                         table["best_teacher"], "best_teacher_abs_rel": best, **detail}},
        "label_quality_best": {
            "value": best_pol["ratio_to_best_teacher"],
            "unit": "AbsRel ratio (best/combined label ÷ best single teacher)", "goal": "<= 1.0",
            "detail": {"best_combined_abs_rel": best_pol["abs_rel"]["mean"], "best_teacher_abs_rel": best}},
        "label_quality_oracle_gap": {
            "value": paper["gap_to_oracle"], "unit": "AbsRel (paper label − per-image oracle)", "goal": None,
            "detail": {"oracle_abs_rel": oracle,
                       "gaps": {k: v["gap_to_oracle"] for k, v in table["policies"].items()}}},
        "label_quality_pick_agreement": {
            "value": table["agreement"]["combined"]["rate"], "unit": "fraction of images (combined pick = oracle)",
            "goal": None, "detail": table["agreement"]},
    }


if __name__ == "__main__":
    import json

    res = run(quick="--quick" in sys.argv)
    print(json.dumps({k: v["value"] for k, v in res.items()}, indent=1))
