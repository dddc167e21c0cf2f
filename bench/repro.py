"""The paper's ablations (Tables 1, 2 and 4) with real teachers on real photographs, 3 seeds.

    python -m bench.repro [--quick] [--seeds N] [--steps N] [--root DIR] [--arms ARM …] [--out FILE]

The corpus is sharded, taught and scored once; every arm trains the PyDNet v2 graph student from the same
weights and steps, differing only in the setting under test, with seeds 0, 1, 2. A claim is *held*, *not
held* or *not resolved* by the mean AbsRel difference against the noise (seed spread, twice the paired
per-image SE). Finished runs are reused. Outputs: `bench/results/repro.json`, `report/pages/repro.html`.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SETTING = REPO / "configs" / "quickstart.toml"
RESULTS_DIR = REPO / "bench" / "results"
SHARED = (REPO / ".." / "shared").resolve()
PHOTOS = "../shared/data/unlabeled/images/"
HIRES = "../shared/data/unlabeled_hires/images/"
REALEVAL = SHARED / "data" / "realeval"
PRIMARY, ASSISTANT = "pydnet", "fastdepth"
TIE_REL = 0.02  # a "tie" claim tolerates this relative difference (or the noise, if larger)
METRIC = "abs_rel"  # the paper's tables report AbsRel (lower is better)

log = logging.getLogger("dad.repro")


# -- the experiment's shape ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    corpus: str          # glob of the photo corpus (relative to the repository)
    hires: str | None    # glob of the high-resolution corpus; None: no hires arms
    steps: int           # training steps of every arm
    batch: int
    seeds: int           # training seeds per arm
    eval_scenes: int     # held-out rendered views (exact depth), 256²
    realeval: bool
    warmup: int
    extra: tuple[str, ...] = ()  # more config overrides for every run (tests: toy sizes)


SIZES = {
    "full": Sizes(corpus=PHOTOS + "*_000[0-3]?.jpg", hires=HIRES + "*.jpg", steps=300, batch=4, seeds=3,
                  eval_scenes=128, realeval=True, warmup=20),
    "quick": Sizes(corpus=PHOTOS + "*_0000[0-2].jpg", hires=HIRES + "*_0000[0-1].jpg", steps=30, batch=4, seeds=1,
                   eval_scenes=32, realeval=True, warmup=5),
}
HIRES_CROPS = ["corpus.max_region=1536", "crops.min_region=768", "crops.patch=384"]


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    norm: str = "hybrid"
    use_sc: bool = True
    use_lg: bool = True
    policy: str = "paper"
    priors: tuple[float, float] | None = None  # (primary, assistant); None = the setting's 0.7 : 0.3
    corpus: str = "photos"                      # photos | hires

    def overrides(self) -> list[str]:
        out = [f'train.norm="{self.norm}"', f"train.use_sc={str(self.use_sc).lower()}",
               f"train.use_lg={str(self.use_lg).lower()}", f'score.policy="{self.policy}"']
        if self.priors is not None:
            out += [f"teachers.{PRIMARY}.prior={self.priors[0]}", f"teachers.{ASSISTANT}.prior={self.priors[1]}"]
        else:
            out += [f"teachers.{PRIMARY}.prior=0.7", f"teachers.{ASSISTANT}.prior=0.3"]
        return out


NORMS = ("global", "hybrid", "local", "none")
ARMS: tuple[Arm, ...] = (
    *(Arm(f"sc-{n}", f"shared-context only, {n} normalisation", norm=n, use_lg=False) for n in NORMS),
    *(Arm(f"lg-{n}", f"local-global only, {n} normalisation", norm=n, use_sc=False) for n in NORMS),
    Arm("sclg-hybrid", "shared-context + local-global, hybrid, per-step teacher draw 0.7 : 0.3"),
    Arm("sclg-mix", "shared-context + local-global, hybrid, per-sample weighted average of the teachers",
        policy="mix"),
    Arm(f"sclg-{PRIMARY}", "shared-context + local-global, hybrid, PyDNet v2 (flip-averaged) only", priors=(1.0, 0.0)),
    Arm(f"sclg-{ASSISTANT}", "shared-context + local-global, hybrid, FastDepth only", priors=(0.0, 1.0)),
    Arm("hires-sc-hybrid", "high-resolution photos: shared-context only, hybrid", use_lg=False, corpus="hires"),
    Arm("hires-lg-hybrid", "high-resolution photos: local-global only, hybrid", use_sc=False, corpus="hires"),
    Arm("hires-sclg-hybrid", "high-resolution photos: both terms, hybrid", corpus="hires"),
)
ARM = {a.name: a for a in ARMS}

# Table rows: (label, arm, paper's numbers as "ETH3D / DIODE")
TABLE1 = [(n, f"sc-{n}", f"lg-{n}") for n in NORMS]
PAPER1 = {"global": ("0.064 / 0.259", "0.065 / 0.239"), "hybrid": ("0.057 / 0.238", "0.064 / 0.238"),
          "local": ("0.070 / 0.245", "0.076 / 0.244"), "none": ("0.057 / 0.239", "0.273 / 0.300")}
TABLE2 = [("✗", "✗", "sc-global", "0.075 / 0.270"), ("✗", "✓", "lg-hybrid", "0.064 / 0.238"),
          ("✓", "✗", "sc-hybrid", "0.058 / 0.237"), ("✓", "✓", "sclg-hybrid", "0.056 / 0.232")]
TABLE2_HIRES = [("✗", "✓", "hires-lg-hybrid"), ("✓", "✗", "hires-sc-hybrid"), ("✓", "✓", "hires-sclg-hybrid")]
TABLE4 = [("PyDNet v2 only (prior 1 : 0)", f"sclg-{PRIMARY}", "D. alone 0.131 / 0.262"),
          ("FastDepth only (prior 0 : 1)", f"sclg-{ASSISTANT}", "G. alone 0.096 / 0.226"),
          ("Avg.: per-sample weighted average (score.policy = mix)", "sclg-mix", "0.228 / 0.371"),
          ("Select.: per-step draw 0.7 : 0.3 (score.policy = paper)", "sclg-hybrid", "0.054 / 0.258")]


@dataclass(frozen=True)
class Claim:
    id: str
    table: str
    text: str
    a: str            # the arm the paper says is better (lower AbsRel), or the tie's reference
    b: str
    kind: str = "better"   # better: a < b ; tie: |a − b| small
    primary: bool = True   # one of the counted claims; secondary ones are shown, not counted


CLAIMS = (
    Claim("1a", "Table 1", "shared-context: hybrid normalisation beats global", "sc-hybrid", "sc-global"),
    Claim("1b", "Table 1", "shared-context: no normalisation is practically tied with hybrid", "sc-hybrid",
          "sc-none", kind="tie"),
    Claim("1c", "Table 1", "local-global: no normalisation collapses (worse than hybrid)", "lg-hybrid", "lg-none"),
    Claim("2a", "Table 2", "both terms beat shared-context only", "sclg-hybrid", "sc-hybrid"),
    Claim("2b", "Table 2", "both terms beat local-global only", "sclg-hybrid", "lg-hybrid"),
    Claim("2c", "Table 2", "both terms beat neither (shared input, global normalisation)", "sclg-hybrid",
          "sc-global"),
    Claim("3", "Table 4", "per-step teacher selection beats averaging the teachers", "sclg-hybrid", "sclg-mix"),
    Claim("H1", "Table 2, hi-res", "high resolution: both terms beat shared-context only", "hires-sclg-hybrid",
          "hires-sc-hybrid"),
    Claim("H2", "Table 2, hi-res", "high resolution: both terms beat local-global only", "hires-sclg-hybrid",
          "hires-lg-hybrid"),
    Claim("1d", "Table 1", "shared-context: hybrid beats local", "sc-hybrid", "sc-local", primary=False),
    Claim("1e", "Table 1", "local-global: hybrid beats local", "lg-hybrid", "lg-local", primary=False),
    Claim("1f", "Table 1", "local-global: hybrid beats global (paper: nearly tied)", "lg-hybrid", "lg-global",
          primary=False),
    Claim("4a", "Table 4", "selection beats the primary teacher's labels alone", "sclg-hybrid", f"sclg-{PRIMARY}",
          primary=False),
    Claim("4b", "Table 4", "selection beats the assistant's labels alone", "sclg-hybrid", f"sclg-{ASSISTANT}",
          primary=False),
)


# -- statistics and verdicts (pure: tested on synthetic results) -----------------------------------

def mean_std(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def aggregate(runs: list[dict], datasets: list[str], metric: str = METRIC) -> dict:
    """runs ([{arm, seed, metrics: {dataset: {abs_rel, per_sample?, …}}}]) → {arm: {dataset: mean_std}},
    each with `per_sample` (image id → the metric averaged over seeds) when the runs carry it."""
    out: dict[str, dict] = {}
    for r in runs:
        for ds in datasets:
            m = (r.get("metrics") or {}).get(ds) or {}
            out.setdefault(r["arm"], {}).setdefault(ds, []).append(m)
    agg = {}
    for arm, per in out.items():
        agg[arm] = {}
        for ds, ms in per.items():
            agg[arm][ds] = mean_std([m.get(metric) for m in ms])
            images = [m.get("per_sample") for m in ms if m.get("per_sample")]
            if images:
                common = set.intersection(*(set(p) for p in images))
                agg[arm][ds]["per_sample"] = {i: float(np.mean([p[i] for p in images])) for i in sorted(common)}
    return agg


def paired_se(a: dict, b: dict) -> tuple[float | None, int]:
    """Standard error of the mean per-image difference b − a over the images both arms scored."""
    pa, pb = a.get("per_sample") or {}, b.get("per_sample") or {}
    d = np.array([pb[i] - pa[i] for i in pa if i in pb and math.isfinite(pa[i]) and math.isfinite(pb[i])])
    if len(d) < 2:
        return None, len(d)
    return float(d.std(ddof=1) / math.sqrt(len(d))), len(d)


def pooled_seed_std(agg: dict, dataset: str) -> float | None:
    """The seed standard deviation pooled over the arms run with ≥ 2 seeds (variances weighted by n − 1):
    the seed noise of an arm run once, assuming training seeds scatter every arm alike."""
    per = [(ms["n"] - 1, ms["std"] ** 2) for arm in agg.values() if (ms := arm.get(dataset))
           and ms.get("std") is not None]
    dof = sum(d for d, _ in per)
    return math.sqrt(sum(d * v for d, v in per) / dof) if dof else None


def judge(claim: Claim, agg: dict, dataset: str, pooled: float | None = None) -> dict:
    """Does `claim` hold on `dataset`? {verdict, holds, delta (b − a; > 0: a is better), noise, rule, …}.
    `pooled`: the seed std used for an arm run with one seed (see `pooled_seed_std`)."""
    a, b = (agg.get(claim.a) or {}).get(dataset), (agg.get(claim.b) or {}).get(dataset)
    if not a or not b or a["mean"] is None or b["mean"] is None:
        return {"verdict": "not run", "holds": None, "delta": None, "noise": None, "se": None,
                "rule": "missing runs", "seeds": 0}
    delta = b["mean"] - a["mean"]
    se, n_img = paired_se(a, b)
    stds = [x["std"] if x["std"] is not None else pooled for x in (a, b)]
    parts = [s for s in stds if s is not None] + ([2 * se] if se is not None else [])
    noise = max(parts) if parts else 0.0
    seeds = min(a["n"], b["n"])
    if claim.kind == "tie":
        tol = max(noise, TIE_REL * abs(a["mean"]))
        verdict = "held" if abs(delta) <= tol else "not held"
        rule = f"|Δ| ≤ max(noise, {TIE_REL:.0%} of reference) = {tol:.4f}"
    else:
        verdict = "not resolved" if abs(delta) <= noise else ("held" if delta > 0 else "not held")
        rule = f"|Δ| > noise = {noise:.4f} (max seed std, 2 × paired SE)"
    return {"verdict": verdict, "holds": {"held": True, "not held": False}.get(verdict), "delta": float(delta),
            "relative": float(delta / a["mean"]) if a["mean"] else None, "noise": noise, "se": se,
            "images": n_img, "rule": rule, "seeds": seeds}


def verdicts(agg: dict, datasets: list[str]) -> list[dict]:
    pooled = {ds: pooled_seed_std(agg, ds) for ds in datasets}
    return [{**asdict(c), "per_dataset": {ds: judge(c, agg, ds, pooled[ds]) for ds in datasets}} for c in CLAIMS]


def fmt(ms: dict | None, digits: int = 4) -> str:
    if not ms or ms.get("mean") is None:
        return "—"
    s = f"{ms['mean']:.{digits}f}"
    return s + (f" ± {ms['std']:.{digits}f}" if ms.get("std") is not None else "")


def tables(agg: dict, datasets: list[str], labels: dict[str, str]) -> dict[str, dict]:
    """The paper's Tables 1, 2 and 4 (and the hi-res Table 2) as {title, header, rows} of strings."""
    short = [labels[d] for d in datasets]
    t1 = {"title": "Table 1 — normalisation × distillation paradigm (AbsRel ↓, mean ± std over seeds)",
          "header": ["normalisation", *[f"shared-context: {s}" for s in short],
                     *[f"local-global: {s}" for s in short], "paper SC (ETH3D / DIODE)", "paper LG"],
          "rows": [[n, *[fmt(agg.get(sc, {}).get(d)) for d in datasets], *[fmt(agg.get(lg, {}).get(d)) for d in datasets],
                    *PAPER1[n]] for n, sc, lg in TABLE1]}

    def rel(arm: str, d: str, base_arm: str) -> str:
        m, base = ((agg.get(x, {}).get(d) or {}).get("mean") for x in (arm, base_arm))
        return "" if m is None or not base or arm == base_arm else f" ({(m - base) / base:+.1%})"

    t2 = {"title": "Table 2 — the two distillation terms, hybrid normalisation (AbsRel ↓; change vs the first row)",
          "header": ["shared-context", "local-global", "run", *short, "paper (ETH3D / DIODE)"],
          "rows": [[sc, lg, arm + (" (DAv2-style: global norm)" if arm == "sc-global" else ""),
                    *[fmt(agg.get(arm, {}).get(d)) + rel(arm, d, "sc-global") for d in datasets], paper]
                   for sc, lg, arm, paper in TABLE2]}
    t2h = {"title": "Table 2 at high resolution — 1536 px photos, 768–1536 px regions, 384 px patches "
                    "(AbsRel ↓; change vs shared-context only)",
           "header": ["shared-context", "local-global", "run", *short],
           "rows": [[sc, lg, arm, *[fmt(agg.get(arm, {}).get(d)) + rel(arm, d, "hires-sc-hybrid") for d in datasets]]
                    for sc, lg, arm in TABLE2_HIRES]}
    t4 = {"title": "Table 4 — teacher selection vs averaging (AbsRel ↓)",
          "header": ["setting", "run", *short, "paper (ETH3D / DIODE)"],
          "rows": [[label, arm, *[fmt(agg.get(arm, {}).get(d)) for d in datasets], paper]
                   for label, arm, paper in TABLE4]}
    return {"table1": t1, "table2": t2, "table2_hires": t2h, "table4": t4}


def headline(agg: dict, refs: dict, families: dict[str, str], arm: str = "sclg-hybrid",
             dataset: str = "realeval") -> dict:
    """The distilled student against its primary teacher, the assistant and its own start, per family of
    `dataset` (mean AbsRel over the family's images; the student's per-image values averaged over seeds)."""
    student = ((agg.get(arm) or {}).get(dataset) or {}).get("per_sample") or {}
    models = {"student": student, **{name: (r.get(dataset) or {}).get("per_sample") or {} for name, r in refs.items()}}
    rows = {}
    for fam in sorted(set(families.values())) + ["all"]:
        ids = [i for i, f in families.items() if fam in ("all", f) and i in student]
        if ids:
            rows[fam] = {"n": len(ids), **{m: float(np.mean([v[i] for i in ids])) if all(i in v for i in ids) else None
                                           for m, v in models.items()}}
    return {"arm": arm, "dataset": dataset, "families": rows}


def markdown_table(t: dict) -> str:
    lines = [f"**{t['title']}**", "", "| " + " | ".join(t["header"]) + " |",
             "|" + "|".join("---" for _ in t["header"]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def claims_table(claims: list[dict], labels: dict[str, str]) -> dict:
    rows = []
    for c in claims:
        per = c["per_dataset"]
        cells = []
        for d in labels:
            j = per[d]
            cells.append("—" if j["delta"] is None else
                         f"{j['delta']:+.4f} (noise {j['noise']:.4f}" + (f", SE {j['se']:.4f}" if j["se"] else "") + ")")
        rows.append([c["id"] + ("" if c["primary"] else " (secondary)"), c["text"], *cells,
                     *[f"**{per[d]['verdict']}**" for d in labels]])
    return {"title": "Claims — Δ = AbsRel(b) − AbsRel(a), > 0 when the paper's better arm is better",
            "header": ["claim", "paper", *[f"Δ {v}" for v in labels.values()], *[f"on {v}" for v in labels.values()]],
            "rows": rows}


def headline_table(h: dict) -> dict:
    names = [m for m in next(iter(h["families"].values()), {}) if m != "n"]
    return {"title": f"The distilled student ({h['arm']}, mean of seeds) against its teachers, per family of "
                     f"{h['dataset']} (AbsRel ↓)",
            "header": ["family", "images", *names],
            "rows": [[fam, r["n"], *["—" if r[m] is None else f"{r[m]:.4f}" for m in names]]
                     for fam, r in h["families"].items()]}


# -- running it -----------------------------------------------------------------------------------

def machine_info() -> dict:
    model = platform.processor()
    try:
        model = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cores": os.cpu_count(), "cpu": model, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_start": list(os.getloadavg())}


@dataclass
class Experiment:
    sizes: Sizes
    root: Path
    seeds: list[int] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)  # key → spec
    _selection: dict = field(default_factory=dict)           # corpus → selection fingerprint now on disk
    _eval_sets: dict = field(default_factory=dict)

    def root_of(self, corpus: str) -> Path:
        return self.root if corpus == "photos" else self.root / "hires"

    def config(self, arm: Arm | None = None, seed: int | None = None, corpus: str = "photos"):
        import tomllib

        from pipeline.config import apply_overrides, load_config

        s, corpus = self.sizes, (arm.corpus if arm else corpus)
        sets = [f'run.root="{self.root_of(corpus)}"', 'run.executor="inline"',
                f'corpus.sources=["{s.corpus if corpus == "photos" else s.hires}"]',
                f"train.steps={s.steps}", f"train.batch_size={s.batch}", f"train.warmup_steps={s.warmup}",
                f"train.checkpoint_every={s.steps}", f"train.log_every={max(1, s.steps // 10)}",
                *(HIRES_CROPS if corpus == "hires" else []), *s.extra]
        if arm is not None:
            sets += [*arm.overrides(), f'train.name="{arm.name}-s{seed}"', f"train.seed={seed}"]
        raw = tomllib.loads(SETTING.read_text())
        raw["train"].pop("val_dataset", None)  # no validation curve: every arm is evaluated at the end instead
        return load_config(raw=apply_overrides(raw, sets))

    def prepare(self, corpus: str) -> dict:
        """Shard, teach and score one corpus (reused by every arm on it; skipped when already done)."""
        from stages import score, shard, teach

        cfg, t0, out = self.config(corpus=corpus), time.time(), {}
        for name, stage in (("shard", shard), ("teach", teach), ("score", score)):
            t = time.time()
            res = stage.run(cfg)
            out[name] = {"seconds": round(time.time() - t, 1),
                         **{k: v for k, v in res.items() if isinstance(v, (int, float, str))}}
            log.info("%s %s: %s", corpus, name, out[name])
        self._selection[corpus] = _selection_key(cfg)
        out["seconds"] = round(time.time() - t0, 1)
        return out

    def eval_set(self, key: str):
        """The evaluation datasets, loaded (rendered) once and held in memory for every run."""
        if key not in self._eval_sets:
            from pipeline.datasets import open_dataset
            from pipeline.datasets.evalbase import EvalDataset

            ds = open_dataset(self.datasets[key])
            samples = [ds[i] for i in range(len(ds))]
            self._eval_sets[key] = EvalDataset(ds.name, samples, lambda s: s, ds.min_depth, ds.max_depth, ds.skipped)
        return self._eval_sets[key]

    def evaluate(self, predict_fn, resolution: int) -> dict:
        """Every dataset, on one torch thread (many small tensor ops: a second thread slows them on a busy
        machine, and one thread keeps the numbers identical whatever the training used)."""
        import torch

        from student.evaluation import evaluate

        out, threads = {}, torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key in self.datasets:
                rows, summary = evaluate(predict_fn, self.eval_set(key), align="inverse_depth", resolution=resolution)
                out[key] = {"n": summary["n"], **{k: summary[k] for k in ("abs_rel", "delta1", "rmse")},
                            "baselines": {b: {k: v[k] for k in ("abs_rel", "delta1")}
                                          for b, v in summary["baselines"].items()},
                            "per_sample": {r["id"]: r["abs_rel"] for r in rows
                                           if r.get("abs_rel") is not None and math.isfinite(r["abs_rel"])},
                            "families": {r["id"]: r.get("family") or "" for r in rows}}
        finally:
            torch.set_num_threads(threads)
        return out

    def _cached(self, name: str, key: dict):
        path = self.root / "repro" / "evals" / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return data["metrics"]
        return None

    def _store(self, name: str, key: dict, metrics: dict) -> None:
        path = self.root / "repro" / "evals" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1))

    def references(self, start: Path) -> dict:
        """Both teachers as they label (PyDNet v2 flip-averaged) and the student's start (PyDNet v2's
        weights in the torch graph, one pass: the network itself)."""
        from stages.teachers.predictor import load_predictor

        cfg, out = self.config(), {}
        for name in (PRIMARY, ASSISTANT):
            spec = {k: v for k, v in cfg.teachers[name].model_dump(mode="json").items() if k != "prior"}
            key = {"teacher": spec, "resolution": cfg.eval.resolution, "datasets": self.datasets}
            if (m := self._cached(f"teacher-{name}", key)) is None:
                fn, _, _ = load_predictor(teacher=name, cfg=cfg, device="cpu")
                m = self.evaluate(fn, resolution=cfg.eval.resolution)
                self._store(f"teacher-{name}", key, m)
            out[f"teacher {name}"] = m
        key = {"init": hashlib.sha256(start.read_bytes()).hexdigest()[:16], "datasets": self.datasets}
        if (m := self._cached("start", key)) is None:
            fn, _, _ = load_predictor(checkpoint=str(start), device="cpu")
            m = self.evaluate(fn, resolution=cfg.eval.resolution)
            self._store("start", key, m)
        out["student at step 0 (PyDNet v2 weights)"] = m
        return out

    def run_one(self, arm: Arm, seed: int) -> dict:
        from stages import score, train
        from stages.teachers import lineage_for
        from stages.teachers.predictor import load_predictor

        cfg = self.config(arm, seed)
        if _selection_key(cfg) != self._selection.get(arm.corpus):  # selection.parquet holds one policy at a time
            score.run(cfg)
            self._selection[arm.corpus] = _selection_key(cfg)
        t0 = time.time()
        res = train.run(cfg)
        name, run_dir = cfg.train.name, self.root_of(arm.corpus) / "train" / cfg.train.name
        # a reused run: the training time recorded when it ran (summary.json), not this call's 0 s
        train_s = json.loads((run_dir / "summary.json").read_text())["seconds"] if res.get("skipped") \
            else time.time() - t0
        key = {"train": lineage_for(cfg).train, "steps": cfg.train.steps, "datasets": self.datasets}
        t1 = time.time()
        cache_name = name if arm.corpus == "photos" else f"hires-{name}"
        metrics = None if not res.get("skipped") else self._cached(cache_name, key)
        if metrics is None:
            fn, _, _ = load_predictor(checkpoint=str(run_dir / "model.pt"), device="cpu")
            metrics = self.evaluate(fn, resolution=cfg.eval.resolution)
            self._store(cache_name, key, metrics)
        hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        last = hist[-1] if hist else {}
        return {"arm": arm.name, "seed": seed, "train_name": name, "metrics": metrics,
                "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1),
                "reused": bool(res.get("skipped")),
                "final": {k: last.get(k) for k in ("loss_total", "loss_sc", "loss_lg", "loss_grad", "pred_median",
                                                   "pred_spread", "teachers")}}


def _selection_key(cfg) -> str:
    from stages.teachers import lineage_for

    return lineage_for(cfg).selection


def experiment(quick: bool = False, seeds: int | None = None, steps: int | None = None, root: str | None = None,
               arms: list[str] | None = None, out: str | None = None, report: bool = True, threads: int = 0,
               sizes: Sizes | None = None, finished_only: bool = False, echo=print) -> dict:
    """Run the grid and write the results JSON and the report page; returns the results.

    `threads`: torch threads for teaching and training, the same for every arm (evaluation always uses
    one); 0 = every core when the machine is idle (1-minute load below half the cores), else one.
    `sizes` replaces the mode's sizes (tests). `finished_only`: train nothing; tabulate the arm × seed runs
    that have finished (an interrupted or partial grid)."""
    import torch

    previous = torch.get_num_threads()
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or (cores if os.getloadavg()[0] < cores / 2 else 1))
    try:
        return _experiment(quick, seeds, steps, root, arms, out, report, sizes, finished_only, echo)
    finally:
        torch.set_num_threads(previous)


def _experiment(quick, seeds, steps, root, arms, out, report, sizes, finished_only, echo) -> dict:
    t_start = time.time()
    os.chdir(REPO)  # the setting's paths are relative to the repository
    mode = "quick" if quick else "full"
    sizes = sizes or SIZES[mode]
    if steps:
        sizes = replace(sizes, steps=steps)
    n_seeds = seeds or sizes.seeds
    # a root per sizes: runs of other step counts or corpora never mix with these (more seeds do)
    shape = hashlib.sha256(json.dumps({**asdict(sizes), "seeds": None}, sort_keys=True).encode()).hexdigest()[:6]
    root_dir = (Path(root) if root else REPO / "runs" / "repro" / f"{mode}-{shape}").resolve()
    datasets = {"scenes": f"scenes:n={sizes.eval_scenes},seed=900000,size=256"}
    if sizes.realeval and REALEVAL.exists():
        datasets["realeval"] = f"realeval:{REALEVAL}"
    labels = {"scenes": f"held-out renders (n={sizes.eval_scenes})", "realeval": "realeval (15 photos)"}
    labels = {k: labels[k] for k in datasets}
    chosen = [ARM[a] for a in arms] if arms else [a for a in ARMS if sizes.hires or a.corpus == "photos"]
    exp = Experiment(sizes, root_dir, list(range(n_seeds)), datasets)
    machine = machine_info()
    echo(f"repro ({mode}): {len(chosen)} arms × {n_seeds} seed(s), {sizes.steps} steps × batch {sizes.batch}; "
         f"root {root_dir}; {machine['cores']} cores")
    prep = {}
    for corpus in dict.fromkeys(a.corpus for a in chosen):
        prep[corpus] = exp.prepare(corpus)
        echo(f"{corpus}: sharded, taught and scored in {prep[corpus]['seconds']:.0f} s")
    runs = []
    for seed in exp.seeds:  # seed-major: an interrupted grid still has every arm at the first seeds
        for arm in chosen:
            if finished_only and not (exp.root_of(arm.corpus) / "train" / f"{arm.name}-s{seed}" / "model.pt").exists():
                continue
            r = exp.run_one(arm, seed)
            runs.append(r)
            echo(f"  {arm.name:<18} seed {seed}: " + ", ".join(
                f"{k} AbsRel {v['abs_rel']:.4f}" for k, v in r["metrics"].items())
                 + f"  (train {r['train_seconds']:.0f} s{', reused' if r['reused'] else ''}, eval {r['eval_seconds']:.0f} s)")
    first = next(a for a in chosen if any(r["arm"] == a.name for r in runs))
    start = exp.root_of(first.corpus) / "train" / f"{first.name}-s0" / "init.pt"
    refs = exp.references(start)
    agg = aggregate(runs, list(datasets))
    claims = verdicts(agg, list(datasets))
    counted = [c for c in claims if c["primary"] and any(j["verdict"] != "not run" for j in c["per_dataset"].values())]
    tally = {ds: {v: sum(c["per_dataset"][ds]["verdict"] == v for c in counted)
                  for v in ("held", "not held", "not resolved")} for ds in datasets}
    families = next(iter(refs.values())).get("realeval", {}).get("families", {})
    machine["load_avg_end"] = list(os.getloadavg())
    cfg = exp.config()
    results = {
        "mode": mode, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": round(time.time() - t_start, 1),
        "train_seconds_total": round(sum(r["train_seconds"] for r in runs), 1),
        "machine": machine, "root": str(root_dir), "sizes": asdict(sizes), "seeds": exp.seeds,
        "datasets": datasets, "dataset_labels": labels, "metric": METRIC, "protocol": {
            "setting": str(SETTING.relative_to(REPO)), "align": "inverse_depth", "resolution": cfg.eval.resolution,
            "corpus": sizes.corpus, "hires_corpus": sizes.hires, "hires_overrides": HIRES_CROPS,
            "crops": cfg.crops.model_dump(), "teachers": {n: t.model_dump() for n, t in cfg.teachers.items()},
            "student": cfg.student.model_dump(),
            "train": {k: v for k, v in cfg.train.model_dump().items()
                      if k not in ("name", "seed", "norm", "use_sc", "use_lg")},
            "rule": "per evaluation set: held / not held when |Δ| exceeds the noise with the paper's / the opposite "
                    "sign, else not resolved; noise = max(seed std of either arm (ddof=1), 2 × paired SE over "
                    f"images); ties hold when |Δ| ≤ max(noise, {TIE_REL:.0%} of the reference)"},
        "prepare": prep, "references": refs, "arms": {a.name: asdict(a) for a in chosen}, "runs": runs,
        "aggregate": agg, "tables": tables(agg, list(datasets), labels), "claims": claims, "tally": tally,
        "claims_counted": len(counted),
        "seeds_per_arm": {arm: max(ms["n"] for ms in per.values()) for arm, per in agg.items()},
        "pooled_seed_std": {ds: pooled_seed_std(agg, ds) for ds in datasets},
        "headline": headline(agg, refs, families) if "realeval" in datasets else None,
        "realeval_families": families,
    }
    echo(render_text(results))
    out_path = Path(out) if out else RESULTS_DIR / ("repro-quick.json" if quick else "repro.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(_slim(results), indent=1, default=str) + "\n")
    page = root_dir / "report" / "pages" / "repro.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(results))
    echo(f"results: {out_path}\nreport page: {page}")
    if report:
        try:
            from stages import report as report_stage

            echo(f"report: {report_stage.run(cfg)['path']}")
        except Exception as err:  # noqa: BLE001 - the results are written; the report is a convenience
            echo(f"report stage skipped: {type(err).__name__}: {err}")
    return results


def _slim(results: dict) -> dict:
    """The JSON keeps per-image values once per run (not again in the aggregate) and no family maps."""
    out = json.loads(json.dumps(results, default=str))
    for per in out["aggregate"].values():
        for ms in per.values():
            ms.pop("per_sample", None)
    for m in [r["metrics"] for r in out["runs"]] + list(out["references"].values()):
        for ds in m.values():
            ds.pop("families", None)
    return out


def _doc_tables(results: dict) -> list[dict]:
    labels = results["dataset_labels"]
    out = list(results["tables"].values()) + [references_table(results), claims_table(results["claims"], labels)]
    if results.get("headline"):
        out.append(headline_table(results["headline"]))
    return out


def render_text(results: dict) -> str:
    parts = [(f"## The paper's ablations with real teachers ({results['mode']}, {len(results['seeds'])} seed(s), "
              f"{results['sizes']['steps']} steps × batch {results['sizes']['batch']})"), "",
             (f"Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}), wall time "
              f"{results['wall_seconds'] / 60:.1f} min; training of all runs, as recorded when each ran: "
              f"{results.get('train_seconds_total', 0) / 3600:.1f} h."), ""]
    parts += [x for t in _doc_tables(results) for x in (markdown_table(t), "")]
    for ds, t in results["tally"].items():
        parts.append(f"{results['dataset_labels'][ds]}: " + ", ".join(f"{v} {n}" for v, n in t.items())
                     + f" of {results['claims_counted']} claims")
    return "\n".join(parts)


def references_table(results: dict) -> dict:
    labels = results["dataset_labels"]
    rows = [[name, *[f"{m[d]['abs_rel']:.4f}" for d in labels]] for name, m in results["references"].items()]
    first = next(iter(results["references"].values()))
    for b in ("constant", "vertical_ramp"):
        rows.append([f"baseline: {b}", *[f"{first[d]['baselines'][b]['abs_rel']:.4f}" for d in labels]])
    return {"title": "References (AbsRel ↓): the teachers, the student before training, trivial baselines",
            "header": ["model", *labels.values()], "rows": rows}


def render_html(results: dict) -> str:
    def table(t: dict) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in t["header"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c).replace('**', ''))}</td>" for c in row) + "</tr>"
                       for row in t["rows"])
        return f"<h3>{html.escape(t['title'])}</h3><table><tr>{head}</tr>{body}</table>"

    parts = [f"<h2>The paper's ablations with real teachers ({html.escape(results['mode'])})</h2>",
             (f"<p>{len(results['seeds'])} seed(s) per arm, {results['sizes']['steps']} steps × batch "
              f"{results['sizes']['batch']}; corpus {html.escape(results['protocol']['corpus'])}, taught once by "
              f"PyDNet v2 (flip-averaged) and FastDepth; student: PyDNet v2's graph from its own weights. "
              f"Machine: {results['machine']['cores']} cores, wall time {results['wall_seconds'] / 60:.1f} min. "
              f"AbsRel after per-image least squares in inverse depth; mean ± std over seeds. "
              f"{html.escape(results['protocol']['rule'])}.</p>")]
    parts += [table(t) for t in _doc_tables(results)]
    return "\n".join(parts)


# -- entry points ----------------------------------------------------------------------------------

def run(quick: bool) -> dict:
    """`python -m bench` entry: how many claims held on each evaluation set, and the wall time."""
    res = experiment(quick=quick, echo=lambda s: print(s, file=sys.stderr, flush=True))
    out = {f"repro_claims_held_{ds}": {
        "value": t["held"], "unit": f"of {res['claims_counted']} claims", "goal": None,
        "detail": f"{t['not held']} not held, {t['not resolved']} not resolved ({len(res['seeds'])} seed(s), "
                  f"{res['sizes']['steps']} steps); see bench/results/repro{'-quick' if quick else ''}.json"}
        for ds, t in res["tally"].items()}
    out["repro_wall_time"] = {"value": res["wall_seconds"], "unit": "s", "goal": None,
                              "detail": f"whole grid on {res['machine']['cores']} cores ({len(res['runs'])} runs)"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repro", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 photos, 30 steps, 32 renders, 1 seed")
    ap.add_argument("--seeds", type=int, help="training seeds per arm (default: 3, or 1 with --quick)")
    ap.add_argument("--steps", type=int, help="training steps per arm (default: 300, or 30 with --quick)")
    ap.add_argument("--root", help="run root (default: runs/repro/<mode>-<sizes>)")
    ap.add_argument("--arms", nargs="+", choices=sorted(ARM), metavar="ARM",
                    help=f"only these arms (tables then have gaps): {', '.join(ARM)}")
    ap.add_argument("--out", help="results JSON (default: bench/results/repro.json, repro-quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for teaching and training (default: all cores if the machine is idle at "
                         "the start, else 1; evaluation always uses 1)")
    ap.add_argument("--no-report", action="store_true", help="do not run the report stage at the end")
    ap.add_argument("--finished-only", action="store_true",
                    help="train nothing: tabulate the runs that have finished (a partial or interrupted grid)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    experiment(quick=args.quick, seeds=args.seeds, steps=args.steps, root=args.root, arms=args.arms,
               out=args.out, report=not args.no_report, threads=args.threads, finished_only=args.finished_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
