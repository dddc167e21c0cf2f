"""The paper in miniature: its ablations (Tables 1, 2 and 4) run on this machine, with seeds.

    python -m bench.repro [--quick] [--seeds N] [--steps N] [--zoo DIR] [--root DIR] [--out FILE]

One corpus is sharded, taught (both zoo teachers) and scored **once**; every arm trains the tiny
student from the same initialisation (`zoo/layout.pt`) on exactly those cached targets, for the same
number of steps, batch size and learning rates, with the same training seeds (`train.seed`; `run.seed`
fixes the corpus and its crop plan and is never varied). Arms differ only in the setting under test:

* Table 1 — `train.norm` ∈ {global, hybrid, local, none} × {shared-context only (`use_lg = false`),
  local-global only (`use_sc = false`)}.
* Table 2 — {neither, local-global only, shared-context only, both}, hybrid normalisation. The paper's
  "neither" row is DAv2-style distillation: teacher and student see the same input, global
  normalisation, no cross-context term. Here every arm's global regions come from the same crop plan
  (random squares of 224–256 px of 256² renders: the random crop is nearly the whole image), so the
  analogue is the shared-context arm with global normalisation — the `sc-global` run of Table 1.
* Table 4 — teacher selection: the paper's per-step draw (`score.policy = "paper"`, 0.7 : 0.3) against a
  pixel-wise weighted average of the teachers (`score.policy = "mix"`), and each teacher alone
  (priors 1 : 0 and 0 : 1), all with both terms and hybrid normalisation.

Every run is evaluated on held-out rendered scenes (exact depth) and on realeval, with the standard
protocol (`stages.evaluate.evaluate`, per-image least-squares fit in inverse depth). Tables give the
AbsRel mean ± std over seeds. A claim of the paper *holds here* when the mean difference has the
paper's sign and is larger than the larger of the two arms' seed standard deviations (ddof = 1); a
"tie" claim holds when the difference is within max(seed std, 2 % of the reference). With one seed
(`--quick`) there is no spread and only the sign is judged — read those verdicts as indicative. The
verdict counted is the one on the held-out renders (in-domain, exact depth, many images); realeval's
(15 real photographs, where small render-trained models barely beat a vertical ramp) is shown beside it.

Outputs: `bench/results/repro.json` (`repro-quick.json` with --quick): every run's metrics, the
aggregated tables, the verdicts, the machine and the wall time; `<root>/report/pages/repro.html`
(picked up by the report stage, which is run at the end). Finished runs are reused when the command is
run again on the same root (the train stage skips them; their evaluations are cached in
`<root>/repro/evals/`).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "renders.toml"
RESULTS_DIR = REPO / "bench" / "results"
REALEVAL = (REPO / ".." / "shared" / "data" / "realeval").resolve()
ZOO_ENV = "DAD_REPRO_ZOO"
TIE_REL = 0.02  # a "tie" claim tolerates this relative difference (or the seeds' std, if larger)
METRIC = "abs_rel"  # the paper's tables report AbsRel (lower is better)

log = logging.getLogger("dad.repro")


# -- the experiment's shape ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    corpus_scenes: int   # rendered unlabeled views in the corpus (+ scikit-image's photographs)
    steps: int           # training steps of every arm
    batch: int
    seeds: int           # training seeds per arm
    eval_scenes: int     # held-out rendered views (exact depth)
    realeval: bool
    warmup: int
    scene_size: int = 256  # rendered views (corpus and held-out) are scene_size² px


SIZES = {
    "full": Sizes(corpus_scenes=240, steps=100, batch=4, seeds=3, eval_scenes=100, realeval=True, warmup=10),
    "quick": Sizes(corpus_scenes=48, steps=30, batch=4, seeds=1, eval_scenes=24, realeval=True, warmup=5),
}


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    norm: str = "hybrid"
    use_sc: bool = True
    use_lg: bool = True
    policy: str = "paper"
    priors: tuple[float, float] | None = None  # (layout, detail); None = the config's 0.7 : 0.3

    def overrides(self) -> list[str]:
        out = [f'train.norm="{self.norm}"', f"train.use_sc={str(self.use_sc).lower()}",
               f"train.use_lg={str(self.use_lg).lower()}", f'score.policy="{self.policy}"']
        if self.priors is not None:
            out += [f"teachers.layout.prior={self.priors[0]}", f"teachers.detail.prior={self.priors[1]}"]
        return out


NORMS = ("global", "hybrid", "local", "none")
ARMS: tuple[Arm, ...] = (
    *(Arm(f"sc-{n}", f"shared-context only, {n} normalisation", norm=n, use_lg=False) for n in NORMS),
    *(Arm(f"lg-{n}", f"local-global only, {n} normalisation", norm=n, use_sc=False) for n in NORMS),
    Arm("sclg-hybrid", "shared-context + local-global, hybrid, per-step teacher draw 0.7 : 0.3"),
    Arm("sclg-mix", "shared-context + local-global, hybrid, pixel-wise weighted average of the teachers",
        policy="mix"),
    Arm("sclg-layout", "shared-context + local-global, hybrid, layout teacher only", priors=(1.0, 0.0)),
    Arm("sclg-detail", "shared-context + local-global, hybrid, detail teacher only", priors=(0.0, 1.0)),
)
ARM = {a.name: a for a in ARMS}

# Table rows: (label, arm, paper's numbers as "ETH3D / DIODE")
TABLE1 = [(n, f"sc-{n}", f"lg-{n}") for n in NORMS]
PAPER1 = {"global": ("0.064 / 0.259", "0.065 / 0.239"), "hybrid": ("0.057 / 0.238", "0.064 / 0.238"),
          "local": ("0.070 / 0.245", "0.076 / 0.244"), "none": ("0.057 / 0.239", "0.273 / 0.300")}
TABLE2 = [("✗", "✗", "sc-global", "0.075 / 0.270"), ("✗", "✓", "lg-hybrid", "0.064 / 0.238"),
          ("✓", "✗", "sc-hybrid", "0.058 / 0.237"), ("✓", "✓", "sclg-hybrid", "0.056 / 0.232")]
TABLE4 = [("layout teacher only (prior 1 : 0)", "sclg-layout", "D. alone 0.131 / 0.262"),
          ("detail teacher only (prior 0 : 1)", "sclg-detail", "G. alone 0.096 / 0.226"),
          ("Avg.: pixel-wise weighted average (score.policy = mix)", "sclg-mix", "0.228 / 0.371"),
          ("Select.: per-step draw 0.7 : 0.3 (score.policy = paper)", "sclg-hybrid", "0.054 / 0.258")]


@dataclass(frozen=True)
class Claim:
    id: str
    table: str
    text: str
    a: str            # the arm the paper says is better (lower AbsRel), or the tie's reference
    b: str
    kind: str = "better"   # better: a < b ; tie: |a − b| small
    primary: bool = True   # one of the claims (counted); secondary ones are shown, not counted


CLAIMS = (
    Claim("1a", "Table 1", "shared-context: hybrid normalisation beats global", "sc-hybrid", "sc-global"),
    Claim("1b", "Table 1", "shared-context: no normalisation is practically tied with hybrid", "sc-hybrid",
          "sc-none", kind="tie"),
    Claim("1c", "Table 1", "local-global: no normalisation collapses (worse than hybrid)", "lg-hybrid", "lg-none"),
    Claim("2a", "Table 2", "both terms beat shared-context only", "sclg-hybrid", "sc-hybrid"),
    Claim("2b", "Table 2", "both terms beat local-global only", "sclg-hybrid", "lg-hybrid"),
    Claim("2c", "Table 2", "both terms beat neither (shared input, global normalisation)", "sclg-hybrid",
          "sc-global"),
    Claim("3", "Table 4", "per-step teacher selection beats pixel-wise averaging", "sclg-hybrid", "sclg-mix"),
    Claim("1d", "Table 1", "shared-context: hybrid beats local", "sc-hybrid", "sc-local", primary=False),
    Claim("1e", "Table 1", "local-global: hybrid beats local", "lg-hybrid", "lg-local", primary=False),
    Claim("1f", "Table 1", "local-global: hybrid beats global (paper: nearly tied)", "lg-hybrid", "lg-global",
          primary=False),
    Claim("4a", "Table 4", "selection beats the primary (layout) teacher alone", "sclg-hybrid", "sclg-layout",
          primary=False),
    Claim("4b", "Table 4", "selection beats the assistant (detail) teacher alone (paper: only on ETH3D)",
          "sclg-hybrid", "sclg-detail", primary=False),
)


# -- statistics and verdicts (pure: tested on synthetic results) -----------------------------------

def mean_std(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def aggregate(runs: list[dict], datasets: list[str], metric: str = METRIC) -> dict:
    """runs ([{arm, seed, metrics: {dataset: {abs_rel, …}}}]) → {arm: {dataset: mean_std}}."""
    out: dict[str, dict] = {}
    for r in runs:
        for ds in datasets:
            m = (r.get("metrics") or {}).get(ds) or {}
            out.setdefault(r["arm"], {}).setdefault(ds, []).append(m.get(metric))
    return {arm: {ds: mean_std(v) for ds, v in per.items()} for arm, per in out.items()}


def judge(claim: Claim, agg: dict, dataset: str) -> dict:
    """Does `claim` hold on `dataset`? {holds, delta (b − a; > 0: a is better), noise, rule, seeds}."""
    a, b = (agg.get(claim.a) or {}).get(dataset), (agg.get(claim.b) or {}).get(dataset)
    if not a or not b or a["mean"] is None or b["mean"] is None:
        return {"holds": None, "delta": None, "noise": None, "rule": "missing runs", "seeds": 0}
    delta = b["mean"] - a["mean"]
    stds = [s for s in (a["std"], b["std"]) if s is not None]
    noise = max(stds) if stds else None
    seeds = min(a["n"], b["n"])
    if claim.kind == "tie":
        tol = max(noise or 0.0, TIE_REL * abs(a["mean"]))
        holds = abs(delta) <= tol
        rule = f"|Δ| ≤ max(seed std, {TIE_REL:.0%} of reference) = {tol:.4f}"
    else:
        holds = delta > 0 and (noise is None or delta > noise)
        rule = "Δ > 0 (one seed: sign only)" if noise is None else f"Δ > 0 and Δ > max seed std = {noise:.4f}"
    return {"holds": bool(holds), "delta": float(delta), "relative": float(delta / a["mean"]) if a["mean"] else None,
            "noise": noise, "rule": rule, "seeds": seeds}


def verdicts(agg: dict, datasets: list[str], primary_dataset: str) -> list[dict]:
    out = []
    for c in CLAIMS:
        per = {ds: judge(c, agg, ds) for ds in datasets}
        main = per.get(primary_dataset, {"holds": None})
        out.append({**asdict(c), "per_dataset": per, "holds": main["holds"],
                    "verdict": _word(main["holds"]) + ("" if main.get("seeds", 0) > 1 else " (1 seed: sign only)")
                    if main["holds"] is not None else "not run"})
    return out


def _word(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "—"}[holds]


def fmt(ms: dict | None, digits: int = 3) -> str:
    if not ms or ms.get("mean") is None:
        return "—"
    s = f"{ms['mean']:.{digits}f}"
    return s + (f" ± {ms['std']:.{digits}f}" if ms.get("std") is not None else "")


def tables(agg: dict, datasets: list[str], labels: dict[str, str]) -> dict[str, dict]:
    """The paper's Tables 1, 2 and 4 as {title, header, rows} of strings (Markdown-ready)."""
    short = [labels[d] for d in datasets]
    t1 = {"title": "Table 1 — normalisation × distillation paradigm (AbsRel ↓, mean ± std over seeds)",
          "header": ["normalisation", *[f"shared-context: {s}" for s in short],
                     *[f"local-global: {s}" for s in short], "paper SC (ETH3D / DIODE)", "paper LG"],
          "rows": [[n, *[fmt(agg.get(sc, {}).get(d)) for d in datasets], *[fmt(agg.get(lg, {}).get(d)) for d in datasets],
                    *PAPER1[n]] for n, sc, lg in TABLE1]}
    base = {d: (agg.get("sc-global", {}).get(d) or {}).get("mean") for d in datasets}

    def rel(arm: str, d: str) -> str:
        m = (agg.get(arm, {}).get(d) or {}).get("mean")
        if m is None or not base[d] or arm == "sc-global":
            return ""
        return f" ({(m - base[d]) / base[d]:+.1%})"

    t2 = {"title": "Table 2 — the two distillation terms, hybrid normalisation (AbsRel ↓; change vs the first row)",
          "header": ["shared-context", "local-global", "run", *short, "paper (ETH3D / DIODE)"],
          "rows": [[sc, lg, arm + (" (analogue: global norm)" if arm == "sc-global" else ""),
                    *[fmt(agg.get(arm, {}).get(d)) + rel(arm, d) for d in datasets], paper]
                   for sc, lg, arm, paper in TABLE2]}
    t4 = {"title": "Table 4 — teacher selection vs averaging (AbsRel ↓)",
          "header": ["setting", "run", *short, "paper (ETH3D / DIODE)"],
          "rows": [[label, arm, *[fmt(agg.get(arm, {}).get(d)) for d in datasets], paper]
                   for label, arm, paper in TABLE4]}
    return {"table1": t1, "table2": t2, "table4": t4}


def markdown_table(t: dict) -> str:
    lines = [f"**{t['title']}**", "", "| " + " | ".join(t["header"]) + " |",
             "|" + "|".join("---" for _ in t["header"]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def claims_markdown(claims: list[dict], labels: dict[str, str]) -> str:
    lines = ["| claim | paper | Δ AbsRel (" + " / ".join(labels.values()) + ") | verdict here | "
             + " | ".join(f"on {v}" for v in labels.values()) + " |",
             "|---|---|---|---|" + "---|" * len(labels)]
    for c in claims:
        per = c["per_dataset"]
        deltas = " / ".join("—" if per[d]["delta"] is None else f"{per[d]['delta']:+.4f}" for d in labels)
        lines.append(f"| {c['id']}{'' if c['primary'] else ' (secondary)'} | {c['text']} | {deltas} | "
                     f"**{c['verdict']}** | " + " | ".join(_word(per[d]["holds"]) for d in labels) + " |")
    return "\n".join(lines)


# -- running it -----------------------------------------------------------------------------------

def find_zoo(flag: str | None) -> Path:
    """The teachers' folder: --zoo, else $DAD_REPRO_ZOO, else the committed zoo/."""
    for cand in (flag, os.environ.get(ZOO_ENV), str(REPO / "zoo")):
        if cand and (Path(cand) / "layout.pt").exists() and (Path(cand) / "detail.pt").exists():
            return Path(cand).resolve()
        if cand and cand == flag:
            raise FileNotFoundError(f"--zoo {flag}: no layout.pt and detail.pt there")
    raise FileNotFoundError(f"no zoo teachers: build them (`dad zoo build --out zoo`), or pass --zoo DIR / set {ZOO_ENV}")


def zoo_info(zoo: Path) -> dict:
    info = {"path": str(zoo), "committed": zoo == (REPO / "zoo").resolve()}
    h = hashlib.sha256()
    for name in ("layout", "detail"):
        data = (zoo / f"{name}.pt").read_bytes()
        h.update(data)
        info[f"{name}_sha256"] = hashlib.sha256(data).hexdigest()[:16]
        card = zoo / f"{name}.md"
        if card.exists():
            line = next((x for x in card.read_text().splitlines() if x.startswith("| training |")), "")
            info[f"{name}_training"] = line.strip("| ").removeprefix("training |").strip()
    info["fingerprint"] = h.hexdigest()[:10]
    return info


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
    zoo: Path
    root: Path
    mode: str
    seeds: list[int] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)  # key → spec
    extra: list[str] = field(default_factory=list)  # more config overrides, after the experiment's own (tests)
    _selection: str | None = None
    _eval_sets: dict = field(default_factory=dict)

    def base_overrides(self) -> list[str]:
        s, z = self.sizes, self.zoo
        return [f'run.root="{self.root}"', 'run.executor="inline"', "run.seed=0",
                f'corpus.sources=["scenes:n={s.corpus_scenes},seed=100000,size={s.scene_size}", "skimage:photos"]',
                f'teachers.layout.model="{z / "layout.pt"}"', f'teachers.detail.model="{z / "detail.pt"}"',
                f'train.init_from="{z / "layout.pt"}"', f"train.steps={s.steps}", f"train.batch_size={s.batch}",
                f"train.warmup_steps={s.warmup}", f"train.checkpoint_every={s.steps}",
                f"train.log_every={max(1, s.steps // 10)}", *self.extra]

    def config(self, arm: Arm | None = None, seed: int | None = None):
        from pipeline.config import load_config

        extra = [] if arm is None else [*arm.overrides(), f'train.name="{arm.name}-s{seed}"', f"train.seed={seed}"]
        return load_config(QUICKSTART, overrides=self.base_overrides() + extra)

    def prepare(self) -> dict:
        """Shard, teach and score the corpus once (reused by every arm; skipped when already done)."""
        from stages import score, shard, teach

        cfg, t0, out = self.config(), time.time(), {}
        for name, stage in (("shard", shard), ("teach", teach), ("score", score)):
            t = time.time()
            res = stage.run(cfg)
            out[name] = {"seconds": round(time.time() - t, 1),
                         **{k: v for k, v in res.items() if isinstance(v, (int, float, str))}}
            log.info("%s: %s", name, out[name])
        self._selection = _selection_key(cfg)
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

    def evaluate(self, predict_fn, resolution: int = 224) -> dict:
        """Both datasets, always on one torch thread: the metrics are many small tensor ops, which a
        second thread slows down badly on a busy machine (and one thread keeps the numbers identical
        whatever `threads` the training used)."""
        import torch

        from stages.evaluate import evaluate

        out, threads = {}, torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for key in self.datasets:
                out[key] = self._evaluate_one(evaluate, predict_fn, key, resolution)
        finally:
            torch.set_num_threads(threads)
        return out

    def _evaluate_one(self, evaluate, predict_fn, key: str, resolution: int) -> dict:
        _, summary = evaluate(predict_fn, self.eval_set(key), align="inverse_depth", resolution=resolution)
        return {"n": summary["n"], **{k: summary[k] for k in ("abs_rel", "delta1", "rmse")},
                "baselines": {b: {k: v[k] for k in ("abs_rel", "delta1")} for b, v in summary["baselines"].items()},
                "wins_vs_ramp": summary["wins"]["vertical_ramp"]}

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

    def references(self) -> dict:
        """The two teachers and the student's starting point (zoo/layout.pt at the student's resolution)."""
        from stages.evaluate import load_predictor

        cfg, out = self.config(), {}
        for name in ("layout", "detail"):
            key = {"teacher": name, "zoo": zoo_info(self.zoo)["fingerprint"], "datasets": self.datasets}
            if (m := self._cached(f"teacher-{name}", key)) is None:
                fn, _, _ = load_predictor(teacher=name, cfg=cfg, device="cpu")
                m = self.evaluate(fn, resolution=cfg.teachers[name].input_size or 224)
                self._store(f"teacher-{name}", key, m)
            out[f"teacher {name}"] = m
        key = {"init": str(self.zoo / "layout.pt"), "zoo": zoo_info(self.zoo)["fingerprint"], "datasets": self.datasets}
        if (m := self._cached("init", key)) is None:
            fn, _, _ = load_predictor(checkpoint=str(self.zoo / "layout.pt"), device="cpu")
            m = self.evaluate(fn, resolution=cfg.eval.resolution)
            self._store("init", key, m)
        out["student at init (layout.pt, 0 steps)"] = m
        return out

    def run_one(self, arm: Arm, seed: int) -> dict:
        from stages import score, train
        from stages.evaluate import load_predictor
        from stages.train import train_fingerprint

        cfg = self.config(arm, seed)
        if _selection_key(cfg) != self._selection:  # selection.parquet holds one policy at a time
            score.run(cfg)
            self._selection = _selection_key(cfg)
        t0 = time.time()
        res = train.run(cfg)
        train_s = time.time() - t0
        name = cfg.train.name
        key = {"train": train_fingerprint(cfg), "steps": cfg.train.steps, "datasets": self.datasets}
        t1 = time.time()
        metrics = None if not res.get("skipped") else self._cached(name, key)
        if metrics is None:
            fn, _, _ = load_predictor(checkpoint=str(self.root / "train" / name / "model.pt"), device="cpu")
            metrics = self.evaluate(fn, resolution=cfg.eval.resolution)
            self._store(name, key, metrics)
        hist = [json.loads(x) for x in (self.root / "train" / name / "metrics.jsonl").read_text().splitlines() if x]
        last = hist[-1] if hist else {}
        return {"arm": arm.name, "seed": seed, "train_name": name, "metrics": metrics,
                "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t1, 1),
                "reused": bool(res.get("skipped")),
                "final": {k: last.get(k) for k in ("loss_total", "loss_sc", "loss_lg", "loss_grad", "pred_median",
                                                   "pred_spread", "teachers")}}


def _selection_key(cfg) -> str:
    from stages.score import metrics_fingerprint, selection_fingerprint, teacher_fps

    return selection_fingerprint(cfg, metrics_fingerprint(cfg, teacher_fps(cfg)))


def experiment(quick: bool = False, seeds: int | None = None, steps: int | None = None, zoo: str | None = None,
               root: str | None = None, arms: list[str] | None = None, out: str | None = None,
               report: bool = True, threads: int = 0, sizes: Sizes | None = None, extra: list[str] | None = None,
               echo=print) -> dict:
    """Run the grid and write the results JSON and the report page; returns the results.

    `threads`: torch threads for teaching and training, the same for every arm (evaluation always uses
    one); 0 = automatic: every core when the machine is idle (1-minute load below half the cores), else one.
    On a busy 2-core machine torch's second thread mostly waits for a core and small tensor ops then
    cost tens of times more (measured: a 256² evaluation 27× slower with 2 threads at load 9); on an
    idle one 2 threads make a training step ≈ 1.6× faster (0.8 s instead of 1.3 s at 224², batch 4).
    `sizes` / `extra` (config overrides) replace the mode's sizes and extend its config (tests)."""
    import torch

    previous = torch.get_num_threads()
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or (cores if os.getloadavg()[0] < cores / 2 else 1))
    try:
        return _experiment(quick, seeds, steps, zoo, root, arms, out, report, sizes, extra, echo)
    finally:
        torch.set_num_threads(previous)


def _experiment(quick, seeds, steps, zoo, root, arms, out, report, sizes, extra, echo) -> dict:
    t_start = time.time()
    mode = "quick" if quick else "full"
    sizes = sizes or SIZES[mode]
    if steps:
        sizes = Sizes(**{**asdict(sizes), "steps": steps})
    n_seeds = seeds or sizes.seeds
    zoo_dir = find_zoo(zoo)
    zinfo = zoo_info(zoo_dir)
    # a root per (sizes, zoo): runs of other step counts or teachers never mix with these (more seeds do)
    shape = hashlib.sha256(json.dumps({**asdict(sizes), "seeds": None}, sort_keys=True).encode()).hexdigest()[:6]
    root_dir = Path(root) if root else REPO / "runs" / "repro" / f"{mode}-{shape}-{zinfo['fingerprint']}"
    root_dir = root_dir.resolve()
    datasets = {"scenes": f"scenes:n={sizes.eval_scenes},seed=900000,size={sizes.scene_size}"}
    if sizes.realeval and REALEVAL.exists():
        datasets["realeval"] = f"realeval:{REALEVAL}"
    labels = {"scenes": f"held-out renders (n={sizes.eval_scenes})", "realeval": "realeval"}
    labels = {k: labels[k] for k in datasets}
    chosen = [ARM[a] for a in arms] if arms else list(ARMS)
    exp = Experiment(sizes, zoo_dir, root_dir, mode, list(range(n_seeds)), datasets, list(extra or []))
    base = exp.config()
    machine = machine_info()
    echo(f"repro ({mode}): {len(chosen)} arms × {n_seeds} seed(s), {sizes.steps} steps × batch {sizes.batch}; "
         f"zoo {zoo_dir}; root {root_dir}; {machine['cores']} cores")
    prep = exp.prepare()
    echo(f"corpus sharded, taught and scored in {prep['seconds']:.0f} s")
    refs = exp.references()
    runs = []
    for seed in exp.seeds:  # seed-major: an interrupted grid still has every arm at the first seeds
        for arm in chosen:
            r = exp.run_one(arm, seed)
            runs.append(r)
            echo(f"  {arm.name:<12} seed {seed}: " + ", ".join(
                f"{k} AbsRel {v['abs_rel']:.4f}" for k, v in r["metrics"].items())
                 + f"  (train {r['train_seconds']:.0f} s{', reused' if r['reused'] else ''}, eval {r['eval_seconds']:.0f} s)")
    agg = aggregate(runs, list(datasets))
    tbl = tables(agg, list(datasets), labels)
    claims = verdicts(agg, list(datasets), "scenes")
    primary = [c for c in claims if c["primary"] and c["holds"] is not None]
    held = sum(bool(c["holds"]) for c in primary)
    held_both = sum(all(c["per_dataset"][d]["holds"] for d in datasets) for c in primary)
    machine["load_avg_end"] = list(os.getloadavg())
    results = {
        "mode": mode, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": round(time.time() - t_start, 1),
        "machine": machine, "zoo": zinfo, "root": str(root_dir), "sizes": asdict(sizes), "seeds": exp.seeds,
        "datasets": datasets, "dataset_labels": labels, "metric": METRIC, "protocol": {
            "align": "inverse_depth", "resolution": base.eval.resolution, "corpus": base.corpus.sources,
            "crops": base.crops.model_dump(), "teachers": {n: t.model_dump() for n, t in base.teachers.items()},
            "train": {k: v for k, v in base.train.model_dump().items() if k not in ("name", "seed", "norm", "use_sc",
                                                                                  "use_lg")},
            "neither_row": "sc-global: shared input, global normalisation (the paper's DAv2-style baseline; "
                           "no separate no-crop corpus)",
            "rule": f"a claim holds when the mean AbsRel difference has the paper's sign and exceeds the larger "
                    f"seed std (ddof=1) of the two arms; ties: |Δ| ≤ max(seed std, {TIE_REL:.0%} of the reference); "
                    f"one seed: sign only. Counted verdict: held-out renders; realeval shown beside it."},
        "prepare": prep, "references": refs, "arms": {a.name: asdict(a) for a in chosen}, "runs": runs,
        "aggregate": agg, "tables": tbl, "claims": claims,
        "held": held, "held_on_all_datasets": held_both, "claims_counted": len(primary),
    }
    text = render_text(results)
    echo(text)
    out_path = Path(out) if out else RESULTS_DIR / ("repro-quick.json" if quick else "repro.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    page = root_dir / "report" / "pages" / "repro.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_html(results))
    echo(f"results: {out_path}\nreport page: {page}")
    if report:
        try:
            from stages import report as report_stage

            echo(f"report: {report_stage.run(base)['path']}")
        except Exception as err:  # noqa: BLE001 - the results are written; the report is a convenience
            echo(f"report stage skipped: {type(err).__name__}: {err}")
    return results


def render_text(results: dict) -> str:
    labels = results["dataset_labels"]
    z = results["zoo"]
    parts = [(f"## The paper's ablations in miniature ({results['mode']}, {len(results['seeds'])} seed(s), "
              f"{results['sizes']['steps']} steps × batch {results['sizes']['batch']})"), "",
             (f"Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}), wall time "
              f"{results['wall_seconds'] / 60:.1f} min. Teachers: {z['path']}"
              + ("" if z.get("committed") else " (not the committed zoo)")
              + (f" — layout: {z['layout_training']}" if z.get("layout_training") else "")), ""]
    for t in results["tables"].values():
        parts += [markdown_table(t), ""]
    parts += [markdown_table(references_table(results)), ""]
    parts += ["**Claims** — " + results["protocol"]["rule"], "", claims_markdown(results["claims"], labels), "",
              (f"Claims holding on the held-out renders: {results['held']} of {results['claims_counted']} "
               f"({results['held_on_all_datasets']} on every dataset).")]
    return "\n".join(parts)


def references_table(results: dict) -> dict:
    labels = results["dataset_labels"]
    rows = [[name, *[f"{m[d]['abs_rel']:.3f}" for d in labels]] for name, m in results["references"].items()]
    first = next(iter(results["references"].values()))
    for b in ("constant", "vertical_ramp"):
        rows.append([f"baseline: {b}", *[f"{first[d]['baselines'][b]['abs_rel']:.3f}" for d in labels]])
    return {"title": "References (AbsRel ↓): the teachers, the student before training, trivial baselines",
            "header": ["model", *labels.values()], "rows": rows}


def render_html(results: dict) -> str:
    labels = results["dataset_labels"]

    def table(t: dict) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in t["header"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t["rows"])
        return f"<h3>{html.escape(t['title'])}</h3><table><tr>{head}</tr>{body}</table>"

    claim_rows = []
    for c in results["claims"]:
        per = c["per_dataset"]
        claim_rows.append([c["id"] + ("" if c["primary"] else " (secondary)"), c["text"],
                           " / ".join("—" if per[d]["delta"] is None else f"{per[d]['delta']:+.4f}" for d in labels),
                           c["verdict"], *[_word(per[d]["holds"]) for d in labels]])
    z = results["zoo"]
    corpus = html.escape(", ".join(results["protocol"]["corpus"]))
    parts = [f"<h2>The paper's ablations in miniature ({html.escape(results['mode'])})</h2>",
             (f"<p>{len(results['seeds'])} seed(s) per arm, {results['sizes']['steps']} steps × batch "
              f"{results['sizes']['batch']}, one shared corpus ({corpus}) and its cached targets; teachers from "
              f"<code>{html.escape(z['path'])}</code>{'' if z.get('committed') else ' (not the committed zoo)'}. "
              f"Machine: {results['machine']['cores']} cores, wall time {results['wall_seconds'] / 60:.1f} min. "
              f"AbsRel after per-image least-squares alignment in inverse depth; mean ± std over seeds.</p>")]
    parts += [table(t) for t in results["tables"].values()]
    parts.append(table(references_table(results)))
    parts.append(table({"title": "Claims: " + results["protocol"]["rule"],
                        "header": ["claim", "paper", "Δ AbsRel (" + " / ".join(labels.values()) + ")", "verdict",
                                   *[f"on {v}" for v in labels.values()]], "rows": claim_rows}))
    parts.append(f"<p><b>{results['held']} of {results['claims_counted']}</b> of the paper's claims hold on the "
                 f"held-out renders ({results['held_on_all_datasets']} on every dataset).</p>")
    return "\n".join(parts)


# -- entry points ----------------------------------------------------------------------------------

def run(quick: bool) -> dict:
    """`python -m bench` entry: how many of the paper's claims held, and the wall time."""
    res = experiment(quick=quick, echo=lambda s: print(s, file=sys.stderr, flush=True))
    held = [c["id"] for c in res["claims"] if c["primary"] and c["holds"]]
    return {
        "repro_claims_held": {"value": res["held"], "unit": f"of {res['claims_counted']} claims", "goal": None,
                              "detail": f"claims of the paper holding in miniature on held-out renders: "
                                        f"{', '.join(held) or 'none'} ({len(res['seeds'])} seed(s), "
                                        f"{res['sizes']['steps']} steps; zoo {res['zoo']['path']}); "
                                        f"see bench/results/repro{'-quick' if quick else ''}.json"},
        "repro_wall_time": {"value": res["wall_seconds"], "unit": "s", "goal": "<= 600" if quick else "<= 3600",
                            "detail": f"whole grid on {res['machine']['cores']} cores ({len(res['runs'])} runs)"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repro", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and eval images, 1 seed (≈ 5–10 min)")
    ap.add_argument("--seeds", type=int, help="training seeds per arm (default: 3, or 1 with --quick)")
    ap.add_argument("--steps", type=int, help="training steps per arm (default: 100, or 30 with --quick)")
    ap.add_argument("--zoo", help=f"folder with layout.pt and detail.pt (default: zoo/, or ${ZOO_ENV})")
    ap.add_argument("--root", help="run root (default: runs/repro/<mode>-<sizes>-<zoo fingerprint>)")
    ap.add_argument("--arms", nargs="+", choices=sorted(ARM), metavar="ARM",
                    help=f"only these arms (tables then have gaps): {', '.join(ARM)}")
    ap.add_argument("--out", help="results JSON (default: bench/results/repro.json, repro-quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for teaching and training, every arm (default: all cores if the "
                         "machine is idle at the start, else 1; evaluation always uses 1)")
    ap.add_argument("--no-report", action="store_true", help="do not run the report stage at the end")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    experiment(quick=args.quick, seeds=args.seeds, steps=args.steps, zoo=args.zoo, root=args.root, arms=args.arms,
               out=args.out, report=not args.no_report, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
