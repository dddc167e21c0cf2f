"""Score stage: how good is each teacher on each sample, and which teacher should supervise it.

Per (sample, teacher), on disparity, one Ray task per corpus shard: `lg_consistency` (the teacher's local
predictions against its own global one), `agreement` (against the other teachers), `valid_fraction`,
`collapsed`, and `anticorrelated` (flags a sign-inverted teacher), all invariant to affine maps of a
teacher's output. The selection policy (`paper`, `best`, `weighted`, `filter`, `mix`) then gives each
sample its teachers' probabilities; changing only the policy recomputes only the selection, in seconds.
Formulas: docs/method.md §4.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.cache import as_disparity, open_cache, read_rows, require_intact_metadata
from pipeline.config import DadConfig, ScoreCfg
from pipeline.corpus import manifest, require_intact_corpus, shard_ids
from pipeline.layout import SCORES, SELECTION, SELECTION_SUMMARY, score_part, shard_name
from pipeline.ledger import Ledger, read_leases, stage_lock
from pipeline.lineage import TEACH, Lineage, check_recorded
from pipeline.runtime import executor_for
from pipeline.storage import Root
from pipeline.targets import aligned_absrel, aligned_fit, cut_box
from stages.teachers import lineage_for

log = logging.getLogger("dad.score")
STAGE = "score"


# -- metrics ----------------------------------------------------------------------------------

def pair_metrics(g: np.ndarray, gv: np.ndarray, loc: np.ndarray, lv: np.ndarray, boxes, s: ScoreCfg) -> dict:
    """Metrics of one teacher on one sample (g: G×G disparity, loc: K×L×L disparity)."""
    valid = gv & np.isfinite(g)
    vf = float((valid.sum() + (lv & np.isfinite(loc)).sum()) / (valid.size + lv.size))
    vals = g[valid].astype(np.float64)
    spread = (np.percentile(vals, 98) - np.percentile(vals, 2)) if vals.size > 1 else 0.0
    scale = max(abs(float(np.median(vals))) if vals.size else 0.0, 1e-12)
    collapsed = vals.size < 2 or not np.isfinite(spread) or spread / scale < s.collapse_rel_std
    lg = []
    for k, box in enumerate(boxes):
        cut = cut_box(np.where(valid, g, np.nan), box, loc.shape[-1])
        m = lv[k] & np.isfinite(loc[k]) & np.isfinite(cut)
        lg.append(aligned_absrel(loc[k], cut, m) if m.sum() > 1 else np.nan)
    lg_val = float(np.nanmean(lg)) if np.isfinite(lg).any() else float("nan")
    p2, p50, p98 = (np.percentile(vals, [2, 50, 98]) if vals.size else (np.nan,) * 3)
    return {"lg_consistency": lg_val, "valid_fraction": vf, "collapsed": bool(collapsed),
            "disp_p2": float(p2), "disp_median": float(p50), "disp_p98": float(p98)}


def score_shard(shard: int, root: Root, cfg: DadConfig, fp: str) -> dict:
    """All metrics of one corpus shard, for every teacher; writes a part and its marker."""
    table = manifest(root, ["sample_id", "row", "shard", "boxes"]).to_pylist()
    samples = [r for r in table if r["shard"] == shard]
    rows = [r["row"] for r in samples]
    names = list(cfg.teachers)
    maps = {}  # teacher → the shard's targets as disparity: global, global_valid, local, local_valid
    for n in names:
        group = open_cache(root, n)
        arr = read_rows(group, rows)
        space = group.attrs["output_space"]
        maps[n] = {**arr, "global": as_disparity(arr["global"], space), "local": as_disparity(arr["local"], space)}
    out = []
    for i, smp in enumerate(samples):
        one = {n: {k: v[i] for k, v in maps[n].items()} for n in names}  # this sample's maps, per teacher
        per = {n: pair_metrics(m["global"], m["global_valid"], m["local"], m["local_valid"], smp["boxes"], cfg.score)
               for n, m in one.items()}
        for n in names:
            fits = [aligned_fit(one[n]["global"], one[o]["global"], one[n]["global_valid"] & one[o]["global_valid"])
                    for o in names if o != n and not per[o]["collapsed"]]
            fits = [(v, anti) for v, anti in fits if np.isfinite(v)]
            out.append({"sample_id": smp["sample_id"], "row": smp["row"], "shard": shard, "teacher": n,
                        "agreement": float(np.median([v for v, _ in fits])) if fits else None, **per[n],
                        "anticorrelated": float(np.mean([a for _, a in fits])) if fits else None})
    root.write_table(pa.Table.from_pylist(out, schema=SCORE_SCHEMA), *score_part(shard))
    Ledger(root).mark(STAGE, "metrics", shard_name(shard), fp, {"rows": len(out)})
    return {"rows": len(out)}


SCORE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("row", pa.int64()), ("shard", pa.int32()), ("teacher", pa.string()),
    ("agreement", pa.float64()), ("lg_consistency", pa.float64()), ("valid_fraction", pa.float64()),
    ("collapsed", pa.bool_()), ("disp_p2", pa.float64()), ("disp_median", pa.float64()), ("disp_p98", pa.float64()),
    ("anticorrelated", pa.float64()),
])


# -- selection ----------------------------------------------------------------------------------

def quality(row: dict, metric: str) -> float:
    """The score a policy ranks by (lower is better)."""
    lg, ag = row["lg_consistency"], row["agreement"]
    if metric == "lg_consistency" or (metric == "combined" and (ag is None or not np.isfinite(ag))):
        return lg
    if metric == "agreement":
        return ag if ag is not None else lg
    return 0.5 * (lg + ag)


def usable(row: dict, s: ScoreCfg) -> bool:
    q = row["lg_consistency"]
    return not row["collapsed"] and row["valid_fraction"] >= s.min_valid_fraction and q is not None and np.isfinite(q)


def probabilities(rows: list[dict], priors: dict[str, float], excluded: set[str], s: ScoreCfg) -> dict[str, float] | None:
    """One sample's rows (one per teacher) → {teacher: probability}, or None if the sample is dropped."""
    ok = {r["teacher"]: quality(r, s.metric) for r in rows
          if usable(r, s) and r["teacher"] not in excluded and priors[r["teacher"]] > 0}
    if not ok:
        return None
    policy = s.filter_base if s.policy == "filter" else s.policy
    if s.policy == "filter" and min(ok.values()) > s.filter_threshold:
        return None
    names = [r["teacher"] for r in rows]
    if policy == "best":
        best = min(ok, key=lambda n: (ok[n], n))
        return {n: float(n == best) for n in names}
    w = {n: priors[n] for n in ok}
    if policy in ("weighted", "mix"):
        qmin = min(ok.values())
        w = {n: priors[n] * np.exp(-(ok[n] - qmin) / s.temperature) for n in ok}
    total = sum(w.values())
    return {n: float(w.get(n, 0.0) / total) for n in names}


def anticorrelated_teachers(scores: pa.Table) -> dict[str, float]:
    """Teachers whose map runs against most of the other teachers' on most samples → share of samples.

    Disparities of one scene never relate by a negative scale, so this is almost always a depth model
    left at the default `output_space = "disparity"` (or a negated output). Scores written before the
    `anticorrelated` column existed have no such column and flag nothing.
    """
    if "anticorrelated" not in scores.column_names:
        return {}
    counts: dict[str, list[int]] = {}
    for t, a in zip(scores.column("teacher").to_pylist(), scores.column("anticorrelated").to_pylist()):
        if a is not None and np.isfinite(a):
            c = counts.setdefault(t, [0, 0])
            c[0] += a > 0.5
            c[1] += 1
    return {t: round(k / n, 3) for t, (k, n) in sorted(counts.items()) if k / n > 0.5}


def select(cfg: DadConfig, scores: pa.Table) -> tuple[pa.Table, dict]:
    s = cfg.score
    priors = {n: t.prior for n, t in cfg.teachers.items()}
    excluded = {n for n, t in cfg.teachers.items() if t.license in set(s.exclude_licenses)}
    by_sample: dict[str, list[dict]] = {}
    for r in scores.to_pylist():
        by_sample.setdefault(r["sample_id"], []).append(r)
    out, dropped = [], 0
    for sid in sorted(by_sample, key=lambda k: by_sample[k][0]["row"]):
        rows = by_sample[sid]
        probs = probabilities(rows, priors, excluded, s)
        if probs is None:
            dropped += 1
            continue
        out.append({"sample_id": sid, "row": rows[0]["row"], "shard": rows[0]["shard"],
                    **{f"p_{n}": probs.get(n, 0.0) for n in cfg.teachers}})
    fields = [("sample_id", pa.string()), ("row", pa.int64()), ("shard", pa.int32())]
    fields += [(f"p_{n}", pa.float64()) for n in cfg.teachers]
    table = pa.Table.from_pylist(out, schema=pa.schema(fields))
    share = {n: float(np.mean(table.column(f"p_{n}").to_numpy())) if table.num_rows else 0.0 for n in cfg.teachers}
    summary = {"policy": s.policy, "kept": table.num_rows, "dropped": dropped, "share": share,
               "excluded_by_license": sorted(excluded), "anticorrelated": anticorrelated_teachers(scores)}
    return table.replace_schema_metadata({"policy": s.policy, "mix": str(s.policy == "mix")}), summary


# -- the stage ------------------------------------------------------------------------------------

def run(cfg: DadConfig, address: str | None = None, break_lock: bool = False, lineage: Lineage | None = None) -> dict:
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger = Ledger(root)
    if not cfg.teachers:
        raise ValueError("no teachers configured: add a [teachers.<name>] section")
    check_recorded(root, cfg, STAGE)
    lineage = lineage or lineage_for(cfg)
    require_intact_corpus(root, lineage.shard, shards=[])  # the manifest as `dad shard` wrote it (score reads no tar)
    shards = shard_ids(root)
    lineage.require(root, TEACH)
    mfp = lineage.metrics
    with stage_lock(root, STAGE, break_lock=break_lock, command="dad score"), \
            read_leases(root, "teach", list(cfg.teachers), "dad score", break_lock):  # no teach rewrites them meanwhile
        require_intact_metadata(root, cfg, lineage.output_spaces(), shards)
        done = ledger.done(STAGE, "metrics", mfp)
        todo = [s for s in shards if shard_name(s) not in done]
        if todo:
            ex = executor_for(cfg.run, root.process_local, address)
            for _ in ex.map(partial(score_shard, root=root, cfg=cfg, fp=mfp), todo, description="score"):
                pass
        if todo or not ledger.is_done(STAGE, "_", "scores", mfp):
            parts = [root.read_table(*score_part(s)) for s in shards]
            # Parts scored before a column was added lack it: promote fills it with nulls.
            root.write_table(pa.concat_tables(parts, promote_options="default"), *SCORES)
            ledger.mark(STAGE, "_", "scores", mfp)
        scores = root.read_table(*SCORES)
        sfp = lineage.selection
        table, sel = select(cfg, scores)
        root.write_table(table, *SELECTION)
        root.write_json(sel, *SELECTION_SUMMARY)
        ledger.mark(STAGE, "_", "selection", sfp, sel)
        try:
            from pipeline.plots import score_plots

            score_plots(root, scores, sel)
        except Exception as err:  # noqa: BLE001 - plots are for people; never fail the stage for them
            log.warning("score plots skipped: %s", err)
    for line in anticorrelation_warnings(sel, list(cfg.teachers)):
        log.warning("%s", line)
    if sel["excluded_by_license"]:
        log.info("licence filter: %s get probability 0 (score.exclude_licenses)", ", ".join(sel["excluded_by_license"]))
    return {"stage": STAGE, "shards": len(shards), "scored": len(todo), "policy": sel["policy"], "kept": sel["kept"],
            "dropped": sel["dropped"], **{f"share_{k}": round(v, 3) for k, v in sel["share"].items()},
            **({"anticorrelated": ",".join(sel["anticorrelated"])} if sel["anticorrelated"] else {}),
            "seconds": round(time.time() - t0, 2)}


def anticorrelation_warnings(sel: dict, teachers: list[str]) -> list[str]:
    """Console lines for the teachers `anticorrelated_teachers` flagged. When every teacher is flagged
    (two teachers: each runs against the other) the data cannot tell which one is upside down."""
    flagged = sel.get("anticorrelated", {})
    advice = ("check teachers.{n}.output_space (\"depth\" for a model that outputs depth), then rerun "
              "`dad teach --teacher {n}` and `dad score`")
    if len(flagged) > 1 and len(flagged) == len(teachers):
        names = ", ".join(repr(n) for n in flagged)
        return [f"teachers {names} run against each other on {100 * min(flagged.values()):.0f}% of samples or more "
                f"(negative fitted scale): one of them is read upside down; for each, "
                + advice.format(n="<name>")]
    return [f"teacher {n!r} runs against the other teachers on {100 * frac:.0f}% of samples (negative fitted "
            f"scale) yet gets {100 * sel['share'][n]:.0f}% of the selection: " + advice.format(n=n)
            for n, frac in flagged.items()]


def status(cfg: DadConfig, root: Root, lineage: Lineage | None = None) -> list[dict]:
    ledger, lineage = Ledger(root), lineage or lineage_for(cfg)
    try:
        total = len(shard_ids(root))
        mfp = lineage.metrics
    except (FileNotFoundError, ValueError):
        return []
    markers = ledger.markers(STAGE, "metrics")
    done = sum(mfp in fps for fps in markers.values())
    stale = sum(mfp not in fps for fps in markers.values())
    if done < total:
        note = f"stale: {lineage.why_stale(root, STAGE, 'metrics')}" if stale else ""
    elif ledger.is_done(STAGE, "_", "selection", lineage.selection):
        note = "selection current"
    else:
        why = lineage.why_stale(root, STAGE, 'selection')
        note = f"selection stale: {why}" if why else "selection missing"
    return [{"stage": STAGE, "scope": "metrics", "done": done, "total": total, "stale": stale, "note": note}]
