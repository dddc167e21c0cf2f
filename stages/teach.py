"""Teach stage: run every teacher on every corpus shard; cache global + local predictions in Zarr.

For each (teacher, shard) cell without a current marker: build the G×G global input and the K local
inputs from the stored region, predict, resample the locals to L×L, write the shard's slice of
`cache/<teacher>/` in one call, then the marker. Each teacher runs as a Ray Data actor pool (the model
loaded once per actor, resources from its config), one corpus shard per call, so one task writes one Zarr
shard. Adding or changing a teacher redoes only its cells, and a cache under a read lease (`dad score`,
`dad train`) is never rewritten. Inputs: docs/method.md §1; cells and checks: docs/run-root.md.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import (
    ensure_cache,
    metadata_problems,
    open_arrays,
    open_cache,
    reader_attrs,
    reference_metadata,
    repair_metadata,
    shard_digests,
    verify_cells,
    write_shard,
)
from pipeline.config import DadConfig, TeacherCfg, with_absolute_paths
from pipeline.corpus import iter_shard, require_intact_corpus, shard_ids, tar_record
from pipeline.crops import global_input, local_inputs
from pipeline.errors import cause_line
from pipeline.layout import shard_name
from pipeline.ledger import Ledger, refuse_if_leased, stage_lock
from pipeline.lineage import SHARD, Lineage, check_recorded
from pipeline.runtime import init_ray, progress, require_resources, teacher_request, use_inline
from pipeline.storage import Root
from stages.teachers import Teacher, build_teacher, lineage_for

log = logging.getLogger("dad.teach")
STAGE = "teach"


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def predict_batched(teacher: Teacher, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    outs = []
    for i in range(0, len(images), batch_size):
        pred = teacher.predict(to_tensor(images[i:i + batch_size]).to(teacher.device))
        outs.append(pred.float().cpu())
    return torch.cat(outs).numpy()


def resample(maps: np.ndarray, size: int) -> np.ndarray:
    """(N,h,w) → (N,size,size), bilinear with antialiasing; NaNs stay NaN where they touch."""
    t = torch.from_numpy(maps)[:, None]
    if t.shape[-1] == size and t.shape[-2] == size:
        return maps
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0].numpy()


class TeachWorker:
    """Ray Data actor (class UDF): loads one teacher once, then processes whole corpus shards."""

    def __init__(self, root: Root, cfg: DadConfig, name: str, fp: str, corpus_fp: str):
        tcfg: TeacherCfg = cfg.teachers[name]
        if tcfg.torch_threads:
            torch.set_num_threads(tcfg.torch_threads)
        device = "cuda" if tcfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.root, self.cfg, self.name, self.fp, self.corpus_fp, self.tcfg = root, cfg, name, fp, corpus_fp, tcfg
        self.teacher = build_teacher(name, tcfg).to(device)
        self.arrays = open_arrays(open_cache(root, name, mode="r+"))  # metadata read once per actor
        self.ledger = Ledger(root)

    def __call__(self, batch: dict) -> dict:
        results = [self.process(int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in results]) for k in results[0]}

    def process(self, shard: int) -> dict:
        t0, c0 = time.time(), time.process_time()
        crops, bs = self.cfg.crops, self.tcfg.batch_size
        globals_, locals_ = [], []
        # the tar is checked against its shard marker (sha256, once) before any sample is used
        for record, region in iter_shard(self.root, shard, expect=tar_record(self.root, self.corpus_fp, shard)):
            globals_.append(global_input(region, crops.global_size))
            locals_.extend(local_inputs(region, record["boxes"], crops.patch))
        n, k = len(globals_), crops.local_count
        g_pred = predict_batched(self.teacher, globals_, bs) if n else np.zeros((0, crops.global_size, crops.global_size))
        l_pred = predict_batched(self.teacher, locals_, bs) if n else np.zeros((0, crops.patch, crops.patch))
        g_pred = resample(g_pred.astype(np.float32), crops.global_size)
        l_pred = resample(l_pred.astype(np.float32), crops.local_store).reshape(n, k, crops.local_store, crops.local_store)
        stats = write_shard(self.arrays, shard, self.cfg.corpus.shard_size, g_pred, l_pred)
        objects = shard_digests(self.root, self.name, shard)  # what `check_shard` verifies later
        info = {"shard": shard, "samples": n, "seconds": round(time.time() - t0, 3),
                "cpu_seconds": round(time.process_time() - c0, 3), "node": _node_id(), **stats,
                "objects": objects}
        self.ledger.mark(STAGE, self.name, shard_name(shard), self.fp, info)
        return {k: v for k, v in info.items() if k != "objects"}  # flat values only (a Ray Data row)


def _node_id() -> str:
    """The Ray node that did the work (recorded in the marker: where did each cell run?)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001
        return "local"


def _run_teacher(root: Root, cfg: DadConfig, name: str, fps: tuple[str, str], todo: list[int], inline: bool
                 ) -> list[dict]:
    """Teach `todo` shards; fps: (this teacher's cell fingerprint, the corpus's)."""
    tcfg = cfg.teachers[name]
    if inline:
        out = []
        with progress(len(todo), f"teach {name}") as bar:
            try:
                worker = TeachWorker(root, cfg, name, *fps)
                for s in todo:
                    out.append(worker.process(s))
                    bar.advance(0, 1)
            except Exception as err:  # the same one line as from a Ray actor
                raise _teacher_failed(name, len(out), len(todo), err) from err
            return out
    import ray.data

    remote_args = {"num_cpus": tcfg.num_cpus, "num_gpus": tcfg.num_gpus}
    if tcfg.memory:
        remote_args["memory"] = tcfg.memory
    if tcfg.resources:
        remote_args["resources"] = tcfg.resources
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    acfg = with_absolute_paths(cfg)  # actors may run in another working directory, or on another node
    ds = ds.map_batches(TeachWorker, fn_constructor_args=(Root(acfg.run.root, root.storage_options), acfg, name, *fps),
                        batch_size=1,
                        # A task is a whole shard and its input one integer: nothing to prefetch, so each
                        # actor holds one task at a time and no shard waits behind a busy actor at the end.
                        compute=ray.data.ActorPoolStrategy(size=min(tcfg.actors, len(todo)),
                                                           max_tasks_in_flight_per_actor=1), **remote_args)
    out = []
    with progress(len(todo), f"teach {name}") as bar:
        try:
            for row in ds.iter_rows():
                out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                bar.advance(0, 1)
        except Exception as err:  # Ray wraps the actor's error; show the cause, keep finished cells
            raise _teacher_failed(name, len(out), len(todo), err) from err
    return out


def _teacher_failed(name: str, done: int, total: int, err: BaseException) -> RuntimeError:
    return RuntimeError(f"teacher {name!r} failed ({done}/{total} shards finished and kept): {cause_line(err)}; "
                        f"rerun `dad teach --teacher {name}` once that is fixed (--debug shows the traceback)")


def run(cfg: DadConfig, teachers: list[str] | None = None, address: str | None = None,
        break_lock: bool = False, verify: bool = False, lineage: Lineage | None = None) -> dict:
    """Fill the target cache for the given teachers (default: all configured); only missing cells.

    Done cells are checked against their markers (object sizes; sha256 with `verify=True`): a cell whose
    stored bytes changed since it was written is recomputed, with a warning that says why."""
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger = Ledger(root)
    names = teachers or list(cfg.teachers)
    if not names:
        raise ValueError("no teachers configured: add a [teachers.<name>] section")
    unknown = [n for n in names if n not in cfg.teachers]
    if unknown:
        raise ValueError(f"--teacher {', '.join(unknown)}: not configured (configured: {', '.join(cfg.teachers)})")
    check_recorded(root, cfg, STAGE)
    lineage = lineage or lineage_for(cfg)
    lineage.require(root, SHARD)
    require_intact_corpus(root, lineage.shard, deep=verify)  # manifest and tars as `dad shard` wrote them
    shards = shard_ids(root)
    inline = use_inline(cfg.run, root.process_local)
    if not inline:
        init_ray(cfg.run, address)
        # an actor no node can host would wait forever, silently: refuse it now, naming the key
        require_resources([teacher_request(n, cfg.teachers[n]) for n in _with_work(ledger, lineage, names, shards)])
    totals = {"samples": 0, "cells": 0, "skipped": 0, "invalid_px": 0, "recomputed": 0}
    for name in names:
        spec, fp = lineage.spec(name), lineage.teach(name)
        with stage_lock(root, STAGE, name, break_lock=break_lock, command=f"dad teach --teacher {name}"):
            c = cfg.crops
            attrs = {"teacher": spec.as_attrs(), "output_space": spec.output_space, "license": spec.license,
                     "fingerprint": fp, "crops": cfg.crops.model_dump(), "shard_size": cfg.corpus.shard_size}
            reference = reference_metadata(max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count,
                                           c.local_store, attrs)
            damaged = metadata_problems(root, name, reference, reader_attrs(cfg, spec.output_space))
            done = ledger.done(STAGE, name, fp)
            corrupt = verify_cells(root, name, fp, [s for s in shards if shard_name(s) in done], deep=verify)
            if damaged or corrupt or len(done & {shard_name(s) for s in shards}) < len(shards):
                # a training (or scoring) run that reads this cache would see it change under it
                refuse_if_leased(root, STAGE, name, f"cache/{name}", break_lock)
            for key, why in sorted(damaged.items()):
                log.warning("teach %s: cache/%s/%s %s: rewriting it", name, name, key, why)
            repair_metadata(root, name, damaged, reference)
            for s, why in sorted(corrupt.items()):
                log.warning("teach %s: shard %s does not match its marker (%s): recomputing", name, shard_name(s), why)
                ledger.unmark(STAGE, name, shard_name(s), fp)  # not "done" while it is being redone
            totals["recomputed"] += len(corrupt)
            todo = [s for s in shards if shard_name(s) not in done or s in corrupt]
            totals["skipped"] += len(shards) - len(todo)
            if not todo:
                continue
            ensure_cache(root, name, max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count,
                         c.local_store, attrs=attrs)
            for info in _run_teacher(root, cfg, name, (fp, lineage.shard), todo, inline):
                totals["samples"] += int(info["samples"])
                totals["cells"] += 1
                totals["invalid_px"] += int(info["invalid_global_px"]) + int(info["invalid_local_px"])
    return {"stage": STAGE, "teachers": len(names), **totals, "seconds": round(time.time() - t0, 2)}


def _with_work(ledger: Ledger, lineage: Lineage, names: list[str], shards: list[int]) -> list[str]:
    """The teachers with a shard not done under their current fingerprint: those that will start actors
    (a finished teacher's resources need not exist here: `dad run` on a laptop after teaching on a cluster)."""
    want = {shard_name(s) for s in shards}
    return [n for n in names
            if want - ledger.done(STAGE, n, lineage.teach(n))]


def status(cfg: DadConfig, root: Root, lineage: Lineage | None = None) -> list[dict]:
    ledger, lineage = Ledger(root), lineage or lineage_for(cfg)
    try:
        total = len(shard_ids(root))
    except FileNotFoundError:
        total = 0
    rows = []
    for name in cfg.teachers:
        fp = lineage.teach(name)
        markers = ledger.markers(STAGE, name)
        done = sum(fp in fps for fps in markers.values())
        stale = sum(fp not in fps for fps in markers.values())
        note = "complete" if total and done == total else (
            f"stale: {lineage.why_stale(root, STAGE, name) or 'settings changed'}" if stale else "")
        rows.append({"stage": STAGE, "scope": name, "done": done, "total": total, "stale": stale, "note": note})
    return rows
