"""Report stage: `report/index.html` — what a person looks at after a run.

Static HTML with PNGs next to it, readable offline: what each stage did (counts, rejects, time,
from the ledger), teacher vs student metrics per dataset with the constant / vertical-ramp
baselines, pictures (input, each teacher's target, the student, ground truth, error), loss curves,
score histograms and selection shares. Everything is read from the run root; nothing is recomputed
except the student's predictions on a few corpus samples for the picture grid.
"""

from __future__ import annotations

import base64
import html
import logging
import time

import numpy as np

from pipeline.cache import as_disparity, open_cache, read_rows
from pipeline.config import DadConfig
from pipeline.corpus import iter_shard, manifest, tar_record
from pipeline.layout import (
    METRICS_LOG,
    MODEL,
    REJECTS,
    REPORT_INDEX,
    REPORT_PAGES,
    SELECTION_SUMMARY,
    SUMMARY,
    VAL_LOG,
    cache_group,
    eval_run,
    report_page,
    score_plot,
    train_run,
)
from pipeline.ledger import Ledger
from pipeline.lineage import SCORE, SHARD, TEACH, TRAIN, Lineage
from pipeline.plots import colorize, line_plot, png_bytes
from pipeline.storage import Root

log = logging.getLogger("dad.report")
STAGE = "report"

NOTE_ZOO = (
    "The embedded default's teachers are <b>small models trained on rendered scenes</b> (the offline zoo in "
    "<code>zoo/</code>), not Depth Anything: public weights cannot be downloaded on every machine. To distil from "
    "real teachers, run <code>configs/paper.toml</code> (Depth Anything v2 Large + a GenPercept-style assistant at "
    "0.7/0.3, 560 px, hybrid normalization, the paper's loss weights) on a machine that can reach the model hub.")

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.note{background:#fff8e1;padding:.8em;border-left:4px solid #f0b400}
img{max-width:100%}.muted{color:#777}.best{font-weight:bold;background:#e8f5e9}"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list], best_col: dict[int, str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    best = {}
    for c, how in (best_col or {}).items():
        vals = [r[c] for r in rows if isinstance(r[c], (int, float)) and np.isfinite(r[c])]
        if vals:
            best[c] = min(vals) if how == "min" else max(vals)
    for r in rows:
        cells = []
        for c, v in enumerate(r):
            cls = ' class="best"' if c in best and v == best[c] else ""
            txt = f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
            cells.append(f"<td{cls}>{txt}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def stage_section(root: Root) -> str:
    """Each command's latest run (wall time, summary), then the cells each stage has done per scope."""
    ledger = Ledger(root)
    runs = [[r.get("stage", ""), r.get("name") or "", time.strftime("%H:%M:%S", time.localtime(r["finished"])),
             float(r.get("seconds") or 0.0),
             ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "name", "finished", "seconds", "path"))]
            for r in ledger.runs()]
    cells = []
    for stage in (SHARD, TEACH, SCORE, TRAIN):
        for scope in ledger.scopes(stage):
            markers = ledger.markers(stage, scope)
            final = [ledger.info(stage, scope, c, fp) for c, fps in markers.items() for fp in fps
                     if c in ("final", "selection")]
            detail = ", ".join(f"{k}={v}" for k, v in (final[-1] if final else {}).items()
                               if k in ("samples", "rejects", "shards", "kept", "dropped", "steps", "policy"))
            cells.append([stage, scope, len(markers), detail])
    parts = ["<h2>Stages</h2>"]
    if runs:
        total = sum(r[3] for r in runs)
        parts += [f"<p>Latest run of each command (wall time {total / 60:.1f} min in all):</p>",
                  _table(["command", "name", "finished", "seconds", "summary"], runs)]
    parts += ["<p>Cells done per stage and scope (ledger markers):</p>",
              _table(["stage", "scope", "cells", "summary"], cells)]
    if root.exists(*REJECTS):
        rj = root.read_table(*REJECTS).to_pylist()
        if rj:
            parts += ["<h3>Rejected inputs</h3>", _table(["source", "reason"], [[r["source_uri"], r["reason"]] for r in rj[:30]])]
            if len(rj) > 30:
                parts.append(f"<p class=muted>… and {len(rj) - 30} more in corpus/rejects.parquet</p>")
    return "\n".join(parts)


def eval_section(root: Root, cfg: DadConfig) -> str:
    runs = root.listdir("eval")
    if not runs:
        return "<h2>Evaluation</h2><p class=muted>No evaluation yet: run <code>dad eval</code>.</p>"
    by_dataset: dict[str, list[list]] = {}
    for name in runs:
        if not root.exists(*eval_run(name, "metrics.json")):
            continue
        metrics = root.read_json(*eval_run(name, "metrics.json"))
        for ds, m in metrics.get("datasets", metrics).items():
            if not isinstance(m, dict) or "abs_rel" not in m:
                continue
            rows = by_dataset.setdefault(ds, [])
            rows.append([name, m.get("n", ""), m["abs_rel"], m["delta1"], m.get("rmse", float("nan"))])
            for base, bm in (m.get("baselines") or {}).items():
                if not any(r[0] == f"baseline: {base}" for r in rows):
                    rows.append([f"baseline: {base}", bm.get("n", m.get("n", "")), bm["abs_rel"], bm["delta1"],
                                 bm.get("rmse", float("nan"))])
    parts = ["<h2>Evaluation: teachers vs student</h2>",
             "<p>Per-image least-squares scale and shift, then AbsRel (lower is better) and δ1 (higher is better), "
             "averaged per image (per family, then across families where the dataset has families). The constant and "
             "vertical-ramp baselines show what a prediction with no understanding scores.</p>"]
    for ds, rows in by_dataset.items():
        parts.append(f"<h3>{html.escape(ds)}</h3>")
        parts.append(_table(["model", "n", "AbsRel", "δ1", "RMSE"], rows, {2: "min", 3: "max"}))
    parts.append(verdicts(by_dataset, cfg))
    parts.append("<p class=muted>Per-model pictures of every evaluation: <code>eval/&lt;name&gt;/pictures/</code>.</p>")
    return "\n".join(parts)


def init_teacher(cfg: DadConfig) -> str | None:
    """The teacher whose weights the student started from (train.init_from is that teacher's model)."""
    import os

    if cfg.student.init_teacher:
        return cfg.student.init_teacher
    src = cfg.train.init_from
    for name, t in cfg.teachers.items():
        if src and (src == t.model or os.path.abspath(src) == os.path.abspath(t.model)):
            return name
    return None


def licence_note(root: Root, cfg: DadConfig) -> str:
    """The licences of the labels the student learned from: the student inherits their terms."""
    if not root.exists(*train_run(cfg.train.name, SUMMARY)):
        return ""
    summary = root.read_json(*train_run(cfg.train.name, SUMMARY))
    rows = [[n, t["license"], f"{100 * t['label_share']:.0f} %", t["weights"]]
            for n, t in summary.get("teachers", {}).items()]
    if not rows:
        return ""
    terms = ", ".join(summary.get("label_licenses", [])) or "none"
    start = summary.get("weights_from")
    init = (f" It started from the weights of teacher <i>{html.escape(start['teacher'])}</i> "
            f"({html.escape(start['license'])})." if start else "")
    return ("<h2>Licences of the labels</h2><p>The student was trained on labels under: <b>"
            f"{html.escape(terms)}</b>.{init} Its weights carry those terms (a student of a research-only "
            "teacher is research-only).</p>" + _table(["teacher", "licence", "share of labels", "weights"], rows))


def verdicts(by_dataset: dict[str, list[list]], cfg: DadConfig) -> str:
    """Plain sentences: is the student better than the teacher it started from (the paper's claim), than
    every teacher, than the vertical ramp? Says so either way."""
    student, start = f"student-{cfg.train.name}", init_teacher(cfg)
    lines = []
    for ds, rows in by_dataset.items():
        m = {r[0]: (r[2], r[3]) for r in rows}
        if student not in m:
            continue
        a, d = m[student]
        teachers = {k.removeprefix("teacher-"): v for k, v in m.items() if k.startswith("teacher-")}
        said = [f"student AbsRel {a:.3f}, δ1 {d:.3f}"]
        if start in teachers:
            ta, td = teachers[start]
            better = [w for w, ok in (("AbsRel", a < ta), ("δ1", d > td)) if ok]
            verdict = ("<b>better</b> than" if len(better) == 2 else "<b>not better</b> than" if not better
                       else f"<b>mixed</b> (better in {better[0]} only) against")
            said.append(f"{verdict} the teacher it started from, <i>{html.escape(start)}</i> "
                        f"({ta:.3f}, {td:.3f}; ΔAbsRel {a - ta:+.3f}, Δδ1 {d - td:+.3f})")
        if f"start-{cfg.train.name}" in m:
            sa, sd = m[f"start-{cfg.train.name}"]
            said.append(f"its own starting weights at the student's input size scored {sa:.3f}, {sd:.3f} "
                        f"(distillation: ΔAbsRel {a - sa:+.3f}, Δδ1 {d - sd:+.3f})")
        if teachers:
            beaten = sorted(t for t, (ta, _) in teachers.items() if a < ta)
            said.append(f"lower AbsRel than {len(beaten)} of {len(teachers)} teachers")
        if "baseline: vertical_ramp" in m:
            ra = m["baseline: vertical_ramp"][0]
            said.append(f"{'below' if a < ra else 'not below'} the vertical ramp's AbsRel ({ra:.3f})")
        lines.append(f"<li><b>{html.escape(ds)}</b>: " + "; ".join(said) + ".</li>")
    if not lines:
        return ""
    return "<h3>Verdict</h3><ul>" + "".join(lines) + "</ul>"


def heldout_grid(root: Root, cfg: DadConfig, per_dataset: int = 3) -> str:
    """Evaluation samples with ground truth: RGB | GT | each teacher | the student | the student's error,
    every prediction aligned to GT as in the eval protocol (recomputed here: a few images per dataset)."""
    from pipeline.datasets.eval_sets import open_dataset
    from stages.teachers.predictor import load_predictor
    from student.evaluation import alignment_max_res, comparison_picture
    from student.infer import predict_disparity

    e = cfg.eval
    if not e.datasets or not root.exists(*train_run(cfg.train.name, MODEL)):
        return ""
    models = {}
    for t in cfg.teachers:
        try:
            models[t] = load_predictor(teacher=t, cfg=cfg, device="cpu")[0]
        except Exception as err:  # noqa: BLE001 - a teacher that cannot load here (hub) is left out
            log.warning("report: teacher %s left out of the pictures: %s", t, err)
    models["student"] = load_predictor(checkpoint=root.uri(*train_run(cfg.train.name, MODEL)), device="cpu")[0]
    parts = ["<h2>Held-out samples: teachers and student against ground truth</h2>",
             "<p>Each prediction is least-squares aligned to the ground truth (as in the evaluation) and drawn on "
             "the ground truth's colour scale (warm = near); black = no ground truth.</p>"]
    for spec in e.datasets[:2]:
        try:
            ds = open_dataset(spec)
        except Exception as err:  # noqa: BLE001 - a dataset missing here: its metrics table still shows
            log.warning("report: %s left out of the pictures: %s", spec, err)
            continue
        for i in sorted({int(i) for i in np.linspace(0, len(ds) - 1, min(per_dataset, len(ds))).round()}):
            sample = ds[i]
            preds = {n: predict_disparity(fn, sample.rgb, e.resolution) for n, fn in models.items()}
            png = comparison_picture(sample, preds, e.align, ds.name, ds.min_depth, ds.max_depth, alignment_max_res(ds))
            parts.append(_img(png, f"{ds.name} {sample.id}"))
    return "\n".join(parts)


def train_section(root: Root) -> str:
    parts = ["<h2>Training</h2>"]
    for name in root.listdir("train"):
        if not root.exists(*train_run(name, METRICS_LOG)):
            continue
        hist = root.read_jsonl(*train_run(name, METRICS_LOG))  # a line cut short by a crash is dropped
        if not hist:
            continue
        steps = [h["step"] for h in hist]
        losses = {k.removeprefix("loss_"): (steps, [h[k] for h in hist]) for k in hist[0] if k.startswith("loss_")}
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_img(line_plot(losses, f"losses — {name}", "loss", log_y=True), "losses"))
        spread = {"median": (steps, [h["pred_median"] for h in hist]), "spread": (steps, [h["pred_spread"] for h in hist])}
        parts.append(_img(line_plot(spread, "student output range (scale drift watch)", "disparity"), "range"))
        if root.exists(*train_run(name, VAL_LOG)):
            val = root.read_jsonl(*train_run(name, VAL_LOG))
            vs = [v["step"] for v in val]
            curves = {"AbsRel": (vs, [v["val_abs_rel"] for v in val]), "δ1": (vs, [v["val_delta1"] for v in val])}
            parts.append(_img(line_plot(curves, f"validation ({val[-1]['val_n']} held-out images)", "metric"),
                              "validation"))
    return "\n".join(parts) if len(parts) > 1 else ""


def score_section(root: Root) -> str:
    parts = ["<h2>Teacher scores and selection</h2>"]
    if root.exists(*SELECTION_SUMMARY):
        s = root.read_json(*SELECTION_SUMMARY)
        parts.append(f"<p>Policy <b>{html.escape(s['policy'])}</b>: {s['kept']} samples kept, {s['dropped']} dropped"
                     + (f"; excluded by licence: {', '.join(s['excluded_by_license'])}" if s["excluded_by_license"] else "")
                     + ".</p>")
        for n, frac in s.get("anticorrelated", {}).items():
            parts.append(f"<p><b>Warning:</b> teacher <b>{html.escape(n)}</b> runs against the other teachers on "
                         f"{100 * frac:.0f} % of samples: check <code>teachers.{html.escape(n)}.output_space</code>.</p>")
    for png in ("metrics_hist.png", "selection_share.png"):
        if root.exists(*score_plot(png)):
            parts.append(_img(root.read_bytes(*score_plot(png)), png))
    return "\n".join(parts) if len(parts) > 1 else ""


def picture_grid(root: Root, cfg: DadConfig, n: int = 4) -> str:
    """Corpus samples: input | each teacher's global target | the student's prediction."""
    try:
        rows = manifest(root, ["row", "shard"]).to_pylist()[:n]
    except FileNotFoundError:
        return ""
    if not rows:
        return ""
    student = None
    ckpt = root.uri(*train_run(cfg.train.name, MODEL))
    if root.exists(*train_run(cfg.train.name, MODEL)):
        from student.checkpoint import load_checkpoint  # report is a stage: it may use the student

        student, _ = load_checkpoint(ckpt)
        student.eval()
    import matplotlib.pyplot as plt
    import torch

    teachers = [t for t in cfg.teachers if root.exists(*cache_group(t), "zarr.json")]
    cols = 1 + len(teachers) + (student is not None)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.6 * len(rows)), squeeze=False)
    g = cfg.crops.global_size
    wanted = {r["row"] for r in rows}
    images = {}
    corpus_fp = Lineage(cfg).shard
    for shard in sorted({r["shard"] for r in rows}):
        for sample in iter_shard(root, shard, expect=tar_record(root, corpus_fp, shard)):  # checked before use
            if sample.record["row"] in wanted:
                images[sample.record["row"]] = sample.view(g)
    for i, r in enumerate(rows):
        axes[i][0].imshow(images[r["row"]])
        axes[i][0].set_title("input" if i == 0 else "")
        for j, t in enumerate(teachers, start=1):
            grp = open_cache(root, t)
            disp = as_disparity(read_rows(grp, [r["row"]])["global"][0], grp.attrs["output_space"])
            axes[i][j].imshow(colorize(disp))
            axes[i][j].set_title(f"teacher {t}" if i == 0 else "")
        if student is not None:
            with torch.no_grad():
                x = torch.from_numpy(np.array(images[r["row"]])).permute(2, 0, 1)[None].float() / 255
                axes[i][-1].imshow(colorize(student(x)[0].numpy()))
            axes[i][-1].set_title("student" if i == 0 else "")
    for ax in axes.flat:
        ax.axis("off")
    return "<h2>Corpus samples: teachers and student</h2>" + _img(png_bytes(fig), "samples")


def run(cfg: DadConfig, **_: object) -> dict:
    t0 = time.time()
    root = Root(cfg.run.root)
    body = [f"<h1>dad run report</h1><p class=muted>{html.escape(root.url)} — {time.strftime('%Y-%m-%d %H:%M')}</p>",
            f'<p class="note">{NOTE_ZOO}</p>' if any(t.adapter == "checkpoint" for t in cfg.teachers.values()) else "",
            licence_note(root, cfg),
            stage_section(root), eval_section(root, cfg), heldout_grid(root, cfg), picture_grid(root, cfg), train_section(root), score_section(root)]
    for extra in root.listdir(*REPORT_PAGES):
        body.append(root.read_bytes(*report_page(extra)).decode())
    page = f"<!doctype html><meta charset=utf-8><title>dad report</title><style>{CSS}</style>" + "\n".join(body)
    root.write_bytes(page.encode(), *REPORT_INDEX)
    return {"stage": STAGE, "path": root.uri(*REPORT_INDEX), "seconds": round(time.time() - t0, 2)}
