"""Eval stage: the zero-shot protocol (`student.evaluation`) for a student checkpoint or any teacher.

`dad eval -c FILE (--checkpoint CKPT | --teacher NAME) [--dataset kind:PATH …] [--align SPACE]` writes
`eval/<name>/per_sample.csv`, `eval/<name>/pictures/` and, last (it is the completion marker),
`eval/<name>/metrics.json`; `<name>` is the checkpoint's stem or `teacher-<name>` unless given. Teacher
outputs are converted to disparity first. Samples without enough valid GT are not scored: they are named
on the console and listed in both files. Protocol, outputs and deviations: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Sequence

from pipeline.config import DadConfig
from pipeline.datasets import open_dataset
from pipeline.layout import MODEL, eval_run, train_run
from pipeline.redact import redact_tree
from pipeline.storage import Root
from stages.teachers.predictor import default_device, load_predictor
from student.evaluation import BASELINES, SKIPS, SUMMARY_KEYS, evaluate, safe_name
from student.metrics import METRIC_KEYS

log = logging.getLogger("dad.eval")
STAGE = "eval"
CSV_COLUMNS = (["dataset", "id", "family", "gt_type", "height", "width", "n_valid", "space", "failure", "skipped",
                *METRIC_KEYS, "scale", "shift"]
               + [f"{b}_{k}" for b in BASELINES for k in SUMMARY_KEYS]
               + [f"vs_{b}" for b in BASELINES])


# -- the stage -----------------------------------------------------------------------------------

def _json_clean(obj):
    if isinstance(obj, float):  # strict JSON: NaN (no score) → null, an open depth range → "inf"
        return obj if math.isfinite(obj) else (None if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    return obj


def per_sample_csv(rows: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue().encode()


def print_table(name: str, results: dict[str, dict]) -> None:
    """One row per (dataset, model | baseline): n, AbsRel, δ1, and the model's wins/losses/ties against
    that baseline by per-image AbsRel. Narrow enough for an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dad eval — {name}", caption="AbsRel lower is better, δ1 higher; "
                  "W/L/T = images where the model beats / loses to / ties the baseline (AbsRel)")
    for col, justify in (("dataset", "left"), ("predictions", "left"), ("n", "right"), ("AbsRel", "right"),
                         ("δ1", "right"), ("model W/L/T", "right")):
        table.add_column(col, justify=justify)

    def f(v) -> str:
        return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    for ds, m in results.items():
        table.add_row(ds, f"[bold]{name}[/]", str(m["n"]), f(m["abs_rel"]), f(m["delta1"]), "")
        for b in BASELINES:
            bm, w = m["baselines"][b], m["wins"][b]
            table.add_row("", b, str(bm["n"]), f(bm["abs_rel"]), f(bm["delta1"]),
                          f"{w['wins']}/{w['losses']}/{w['ties']}")
    Console().print(table)


def skipped_message(name: str, label: str, summary: dict) -> str:
    """One console line: how many samples have no score, why, which (the first few), and where they are listed."""
    counts = {f: sum(s["failure"] == f for s in summary["skipped"]) for f in SKIPS}
    why = ", ".join(f"{k} {SKIPS[f]}" + (f" (< eval.min_valid_pixels = {summary['protocol']['min_valid_pixels']})"
                                          if f == "few_valid_gt" else "") for f, k in counts.items() if k)
    ids = [s["id"] for s in summary["skipped"]]
    first = ", ".join(ids[:3]) + (", …" if len(ids) > 3 else "")
    return (f"eval {name} on {label}: {summary['n_skipped']} of {summary['n'] + summary['n_skipped']} samples skipped, "
            f"not scored — {why} ({first}); each is listed with its reason in eval/{name}/per_sample.csv and metrics.json")


def run(cfg: DadConfig, checkpoint: str | None = None, teacher: str | None = None,
        datasets: list[str] | None = None, name: str | None = None, **_: object) -> dict:
    """Evaluate and write eval/<name>/. Without checkpoint and teacher (as `dad run` calls it) the run's
    own trained student `train/<train.name>/model.pt` is evaluated as `<train.name>`; with no dataset
    configured that call is skipped (an explicit `dad eval` without a dataset is an error)."""
    t0 = time.time()
    root = Root(cfg.run.root)
    e = cfg.eval
    specs = list(datasets or e.datasets)
    if not checkpoint and not teacher:
        if not specs:
            return {"stage": STAGE, "skipped": "no eval.datasets configured"}
        if not root.exists(*train_run(cfg.train.name, MODEL)):
            raise FileNotFoundError(f"nothing to evaluate: no trained student train/{cfg.train.name}/model.pt in "
                                    f"{root.url}; give --checkpoint CKPT or --teacher NAME")
        checkpoint, name = root.uri(*train_run(cfg.train.name, MODEL)), name or cfg.train.name
    if not specs:
        raise ValueError("no evaluation datasets: pass --dataset kind:PATH or set eval.datasets in the config")
    opened = [(spec, open_dataset(spec)) for spec in specs]  # fail on a bad spec before loading a model
    predict_fn, default_name, model_info = load_predictor(checkpoint, teacher, cfg)
    name = safe_name(name) if name else default_name
    device = default_device()
    from pipeline.runtime import progress

    all_rows: list[dict] = []
    results: dict[str, dict] = {}
    for spec, ds in opened:
        label = ds.name if ds.name not in results else f"{ds.name}-{len(results) + 1}"
        n = len(ds) if e.max_samples is None else min(len(ds), e.max_samples)

        def save_picture(stem: str, png: bytes) -> None:
            root.write_bytes(png, *eval_run(name, "pictures", f"{stem}.png"))

        with progress(n, f"eval {name} on {label}") as bar:
            task = bar.tasks[0].id
            rows, summary = evaluate(predict_fn, ds, align=e.align, resolution=e.resolution,
                                     max_samples=e.max_samples, pictures=e.pictures, on_picture=save_picture,
                                     device=device, label=label, on_sample=lambda _row, bar=bar, task=task: bar.advance(task),
                                     min_valid_pixels=e.min_valid_pixels)
        summary["spec"] = spec
        results[label] = summary
        all_rows.extend(rows)
        log.info("eval %s on %s: n=%d AbsRel=%.4f δ1=%.4f", name, label, summary["n"], summary["abs_rel"],
                 summary["delta1"])
        if summary["n_skipped"]:
            log.warning("%s", skipped_message(name, label, summary))
    root.write_bytes(per_sample_csv(all_rows), *eval_run(name, "per_sample.csv"))
    metrics = {"name": name, "model": redact_tree(model_info), "datasets": results,  # no URL credentials
               "protocol": {"align": e.align, "resolution": e.resolution, "max_samples": e.max_samples,
                            "min_valid_pixels": e.min_valid_pixels},
               "seconds": round(time.time() - t0, 2)}
    root.write_json(_json_clean(metrics), *eval_run(name, "metrics.json"))  # last: the completion marker
    print_table(name, results)
    out = {"stage": STAGE, "name": name, "path": root.uri(*eval_run(name))}
    for ds, m in results.items():
        out.update({f"{ds}.n": m["n"], f"{ds}.abs_rel": _round(m["abs_rel"]), f"{ds}.delta1": _round(m["delta1"])})
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _round(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None
