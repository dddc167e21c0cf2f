"""Does the student end stronger than its teacher? PyDNet v2 distilled into its own graph, 3 seeds.

    python -m bench.distill [--quick] [--seeds N] [--steps N] [--root DIR]

`distilled` (both terms, hybrid normalisation, per-sample selection between the flip-averaged primary and
FastDepth) and `control` (single-pass PyDNet v2 global labels, global normalisation, no local-global term)
train the PyDNet v2 graph student from the teacher's weights for the same steps and seeds; each run is
scored on realeval and held-out renders beside the teachers. Results: `bench/results/distill.json`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import time
from pathlib import Path

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "distill.json"
PYDNET = {"adapter": "tflite", "sha256": "e96ce0fec7ef75c225998bbd8635ffeebe410d4d193695c9ccd8f794c493b40c",
          "model": "https://github.com/Suraj520/OMA/raw/a7c85e5b68b87bb39364c40055df69af7e080058/ARPydnet/app/"
                   "src/main/assets/pydnet_v2_half_float16.tflite",
          "output_space": "disparity", "license": "research-only", "batch_size": 8, "num_cpus": 1, "actors": 2}
FASTDEPTH = {"adapter": "tflite", "sha256": "e8957602750f16ac130210868f4403b38b4042f0d10c00b89ec03fc3dc840125",
             "model": "https://github.com/openmv/openmv/raw/49a017eafd3aebda9b6b827bd2a367ded1592efc/lib/models/"
                      "fast_depth_224.tflite",
             "output_space": "metric_depth", "license": "MIT", "batch_size": 8, "num_cpus": 0.5, "actors": 1}
DISTILLED_SCORE = {"policy": "best", "metric": "combined"}  # the best labels in bench/label_quality.py
ARMS = {
    "distilled": {"priors": {"pydnet": 0.7, "pydnet_plain": 0.0, "fastdepth": 0.3}, "score": DISTILLED_SCORE,
                  "train": {"norm": "hybrid", "use_lg": True}},
    "control": {"priors": {"pydnet": 0.0, "pydnet_plain": 1.0, "fastdepth": 0.0}, "score": {"policy": "paper"},
                "train": {"norm": "global", "use_lg": False}},
}
# One seed each, to say which part of the method moves the result: the distilled arm without the
# local-global term, and the flip-averaged labels alone (global normalisation, no local-global, no assistant).
ABLATIONS = {
    "sc-only": {**ARMS["distilled"], "train": {"norm": "hybrid", "use_lg": False}},
    "flip-labels": {"priors": {"pydnet": 1.0, "pydnet_plain": 0.0, "fastdepth": 0.0}, "score": {"policy": "paper"},
                    "train": {"norm": "global", "use_lg": False}},
}
TEACHER = "pydnet_plain"  # the model to beat: one pass of PyDNet v2, as its README measures it


def raw_config(root: str, arm: str, seed: int, steps: int, sources: list[str]) -> dict:
    a = {**ARMS, **ABLATIONS}[arm]
    teachers = {"pydnet": {**PYDNET, "flip_average": True}, "pydnet_plain": dict(PYDNET), "fastdepth": dict(FASTDEPTH)}
    for name, prior in a["priors"].items():
        teachers[name]["prior"] = prior
    return {"run": {"root": root, "seed": 0, "model_mirror": ["../shared/models"]},
            "corpus": {"sources": sources, "shard_size": 32, "image_format": "jpeg"},
            "crops": {"min_region": 256, "patch": 224, "local_count": 2, "global_size": 392, "local_store": 196},
            "teachers": teachers, "score": a["score"],
            "student": {"arch": "tflite", "init_from": "teacher:pydnet", "input_size": [256, 448]},
            "train": {"name": f"{arm}-s{seed}", "seed": seed, "steps": steps, "batch_size": 4, "lr_decoder": 5e-5,
                      "warmup_steps": 20, "checkpoint_every": max(50, steps // 4), "log_every": 10,
                      "cpus_per_worker": 2, **a["train"]},
            "eval": {"datasets": ["realeval:../shared/data/realeval", "scenes:n=64,seed=900000,size=256"],
                     "align": "inverse_depth", "resolution": 392, "pictures": 2}}


def evaluate_once(cfg, checkpoint: str, name: str) -> None:
    """Evaluate unless eval/<name> already scored this very checkpoint file (a rerun only adds what is new)."""
    import stages.evaluate

    metrics, ckpt = Path(cfg.run.root) / "eval" / name / "metrics.json", Path(checkpoint)
    if not metrics.exists() or metrics.stat().st_mtime < ckpt.stat().st_mtime:
        stages.evaluate.run(cfg, checkpoint=checkpoint, name=name)


def per_image(root: str, name: str, dataset: str) -> dict[str, float]:
    text = (Path(root) / "eval" / name / "per_sample.csv").read_text()
    return {r["id"]: float(r["abs_rel"]) for r in csv.DictReader(io.StringIO(text))
            if r["dataset"] == dataset and r["abs_rel"] not in ("", "nan")}


def scores(root: str, name: str) -> dict[str, dict]:
    metrics = json.loads((Path(root) / "eval" / name / "metrics.json").read_text())
    return {ds: {"abs_rel": m["abs_rel"], "delta1": m["delta1"], "n": m["n"]} for ds, m in metrics["datasets"].items()}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def run(quick: bool = False, seeds: int = 3, steps: int = 300, root: str | None = None,
        arms: list[str] | None = None) -> dict[str, dict]:
    """Every arm × seed (finished trainings are skipped by the train stage, so a rerun only evaluates)."""
    import stages.evaluate
    import stages.score
    import stages.shard
    import stages.teach
    import stages.train

    t0 = time.time()
    os.chdir(REPO)  # sources are relative to the repository, as in configs/quickstart.toml
    root = root or str(REPO / "runs" / ("distill-quick" if quick else "distill"))
    sources = ["../shared/data/unlabeled/images/" + ("*_0000[0-3].jpg" if quick else "*_000[0-3]?.jpg")]
    seeds, steps = (1, 20) if quick else (seeds, steps)
    base = load_config(raw=raw_config(root, "distilled", 0, steps, sources))
    stages.shard.run(base)
    stages.teach.run(base)
    evals = {}
    for teacher in base.teachers:
        if not (Path(root) / "eval" / f"teacher-{teacher}" / "metrics.json").exists():
            stages.evaluate.run(base, teacher=teacher)
        evals[f"teacher-{teacher}"] = scores(root, f"teacher-{teacher}")
    runs: dict[str, list[dict]] = {}
    plan = [(arm, seed) for arm in arms or list(ARMS) for seed in range(seeds)]
    plan += [(arm, 0) for arm in ABLATIONS if not arms and not quick]
    for arm, seed in plan:
        cfg = load_config(raw=raw_config(root, arm, seed, steps, sources))
        stages.score.run(cfg)
        stages.train.run(cfg)
        name = cfg.train.name
        evaluate_once(cfg, f"{root}/train/{name}/model.pt", name)
        if "start" not in evals:
            evaluate_once(cfg, f"{root}/train/{name}/init.pt", "start")
            evals["start"] = scores(root, "start")
        result = scores(root, name)
        for ds in result:
            teacher, mine = per_image(root, f"teacher-{TEACHER}", ds), per_image(root, name, ds)
            result[ds]["wins_vs_teacher"] = sum(mine[i] < teacher[i] for i in mine if i in teacher)
            result[ds]["losses_vs_teacher"] = sum(mine[i] > teacher[i] for i in mine if i in teacher)
        runs.setdefault(arm, []).append({"seed": seed, **result})
    if not set(ARMS) <= set(runs):
        print_tables({"references": evals, "table": {}, "runs": runs, "seeds": seeds})
        return {}
    datasets = list(evals[f"teacher-{TEACHER}"])
    table = {arm: {ds: {k: mean_std([r[ds][k] for r in rs]) for k in ("abs_rel", "delta1")}
                   for ds in datasets} for arm, rs in runs.items()}  # ablations: one run, std 0
    detail = {"runs": runs, "table": table, "references": evals, "arms": {**ARMS, **ABLATIONS}, "teacher_to_beat": TEACHER,
              "seeds": seeds, "steps": steps, "batch_size": 4, "corpus": sources,
              "minutes": round((time.time() - t0) / 60, 1)}
    if not quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(detail, indent=2) + "\n")
    print_tables(detail)
    real, renders = datasets[0], datasets[-1]
    teacher = evals[f"teacher-{TEACHER}"]
    d = table["distilled"]
    return {
        "distill_realeval_absrel_ratio": {
            "value": round(d[real]["abs_rel"]["mean"] / teacher[real]["abs_rel"], 4), "unit": "student ÷ teacher",
            "goal": "<= 0.97", "detail": detail},
        "distill_realeval_delta1_gain": {
            "value": round(d[real]["delta1"]["mean"] - teacher[real]["delta1"], 4), "unit": "δ1 student − teacher",
            "goal": "> 0", "detail": None},
        "distill_renders_absrel_ratio": {
            "value": round(d[renders]["abs_rel"]["mean"] / teacher[renders]["abs_rel"], 4),
            "unit": "student ÷ teacher", "goal": "<= 1.0", "detail": None},
        "distill_vs_control_realeval": {
            "value": round(d[real]["abs_rel"]["mean"] / table["control"][real]["abs_rel"]["mean"], 4),
            "unit": "distilled ÷ control AbsRel", "goal": "< 1.0", "detail": None},
    }


def print_tables(detail: dict) -> None:
    refs, table = detail["references"], detail["table"]
    datasets = list(next(iter(refs.values())))
    head = " | ".join(f"{ds} AbsRel | δ1" for ds in datasets)
    print(f"| model | {head} |")
    for name, res in refs.items():
        print(f"| {name} | " + " | ".join(f"{res[ds]['abs_rel']:.4f} | {res[ds]['delta1']:.4f}" for ds in datasets) + " |")
    for arm, res in table.items():
        cells = [f"{res[ds]['abs_rel']['mean']:.4f} ± {res[ds]['abs_rel']['std']:.4f} | "
                 f"{res[ds]['delta1']['mean']:.4f} ± {res[ds]['delta1']['std']:.4f}" for ds in datasets]
        print(f"| {arm} ({len(detail['runs'][arm])} seed(s)) | " + " | ".join(cells) + " |")
    for arm, rs in detail["runs"].items():
        for r in rs:
            print(f"  {arm} seed {r['seed']}: " + "; ".join(
                f"{ds} wins/losses vs teacher {r[ds]['wins_vs_teacher']}/{r[ds]['losses_vs_teacher']}" for ds in datasets))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--root")
    p.add_argument("--arms", nargs="*", choices=list(ARMS), help="run only these arms (default: all)")
    a = p.parse_args()
    out = run(a.quick, a.seeds, a.steps, a.root, a.arms)
    print(json.dumps({k: v["value"] for k, v in out.items()}, indent=2))
