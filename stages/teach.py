"""Teach stage: run every teacher on every corpus shard; cache global + local predictions in Zarr.

For each (teacher, shard) cell without a current marker: read the G×G global view that `dad shard`
stored, cut the K local inputs from the stored region, predict, resample the locals to L×L, write the
shard's slice of `cache/<teacher>/` in one call, then the marker. Teachers whose actors ask for the same resources run
as one Ray Data actor pool (each actor loads a teacher once, one model at a time), one cell per call, so
one task writes one Zarr shard. Adding or changing a teacher redoes only its cells, and a cache under a read lease (`dad score`,
`dad train`) is never rewritten. Inputs: docs/method.md §1; cells and checks: docs/run-root.md.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack

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
from pipeline.crops import local_inputs
from pipeline.errors import cause_line, causes
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


class CellFailed(RuntimeError):
    """A (teacher, shard) cell that raised: names the teacher, since one actor pool serves several. Its
    args are plain values, so it crosses Ray's pickling intact (an exception's `__cause__` does not)."""

    def __init__(self, teacher: str, shard: int, line: str):
        super().__init__(teacher, shard, line)
        self.teacher, self.shard, self.line = teacher, shard, line

    def __str__(self) -> str:
        return self.line


class TeachWorker:
    """Ray Data actor (class UDF) for one pool of teachers that ask Ray for the same resources: cells come
    teacher by teacher, and a teacher is loaded when its first cell arrives (the one before is dropped, so
    an actor holds one model at a time). The process start and imports are paid once per pool."""

    def __init__(self, root: Root, cfg: DadConfig, fps: dict[str, tuple[str, str]]):
        self.root, self.cfg, self.fps = root, cfg, fps  # teacher → (its cell fingerprint, the corpus's)
        self.ledger = Ledger(root)
        self.threads = torch.get_num_threads()  # Ray's default for this actor's CPUs
        self.name: str | None = None

    def load(self, name: str) -> None:
        """Make `name` the loaded teacher (nothing to do when it already is)."""
        if name == self.name:
            return
        self.name, self.teacher, self.arrays = None, None, None  # the previous model is freed first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        tcfg: TeacherCfg = self.cfg.teachers[name]
        torch.set_num_threads(tcfg.torch_threads or self.threads)
        device = "cuda" if tcfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.teacher = build_teacher(name, tcfg).to(device)
        self.arrays = open_arrays(open_cache(self.root, name, mode="r+"))  # metadata read once per teacher
        self.name, self.tcfg = name, tcfg

    def __call__(self, batch: dict) -> dict:
        results = [self.cell(str(t), int(s)) for t, s in zip(batch["teacher"], batch["shard"])]
        return {k: np.array([r[k] for r in results]) for k in results[0]}

    def cell(self, name: str, shard: int) -> dict:
        try:
            self.load(name)
            return self.process(shard)
        except Exception as err:
            raise CellFailed(name, shard, cause_line(err)) from err

    def process(self, shard: int) -> dict:
        """Teach one corpus shard with the loaded teacher: predict, resample, write, then the marker."""
        t0, c0 = time.time(), time.process_time()
        crops, bs = self.cfg.crops, self.tcfg.batch_size
        fp, corpus_fp = self.fps[self.name]
        globals_, locals_ = [], []
        # the tar is checked against its shard marker (sha256, once) before any sample is used
        for sample in iter_shard(self.root, shard, expect=tar_record(self.root, corpus_fp, shard)):
            globals_.append(sample.view(crops.global_size))
            locals_.extend(local_inputs(sample.region(), sample.record["boxes"], crops.patch))
        n, k = len(globals_), crops.local_count
        g_pred = predict_batched(self.teacher, globals_, bs) if n else np.zeros((0, crops.global_size, crops.global_size))
        l_pred = predict_batched(self.teacher, locals_, bs) if n else np.zeros((0, crops.patch, crops.patch))
        g_pred = resample(g_pred.astype(np.float32), crops.global_size)
        l_pred = resample(l_pred.astype(np.float32), crops.local_store).reshape(n, k, crops.local_store, crops.local_store)
        stats = write_shard(self.arrays, shard, self.cfg.corpus.shard_size, g_pred, l_pred)
        objects = shard_digests(self.root, self.name, shard)  # what `check_shard` verifies later
        info = {"shard": shard, "samples": n, "started": round(t0, 3), "seconds": round(time.time() - t0, 3),
                "cpu_seconds": round(time.process_time() - c0, 3), "node": _node_id(), "pid": os.getpid(), **stats,
                "objects": objects}
        self.ledger.mark(STAGE, self.name, shard_name(shard), fp, info)
        return {"teacher": self.name, **{k: v for k, v in info.items() if k != "objects"}}  # flat: a Ray Data row


def _node_id() -> str:
    """The Ray node that did the work (recorded in the marker: where did each cell run?)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001
        return "local"


def pools(cfg: DadConfig, names: list[str]) -> list[list[str]]:
    """The teachers grouped by what one of their actors asks Ray for (CPUs, GPUs, memory, custom resources)
    and by pool size, in config order: each group runs as one actor pool, teacher after teacher."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        t = cfg.teachers[n]
        groups.setdefault((t.num_cpus, t.num_gpus, t.memory, tuple(sorted(t.resources.items())), t.actors), []).append(n)
    return list(groups.values())


def _run_pool(root: Root, cfg: DadConfig, work: dict[str, list[int]], fps: dict[str, tuple[str, str]],
              inline: bool) -> tuple[list[dict], float]:
    """Teach `work` (teacher → shards to do, all of one pool) cell by cell, teacher by teacher; returns the
    cells' infos and the pool's start-up: seconds from submitting it to its first cell starting (Ray Data's
    start, the actors' processes and imports, the first model load)."""
    cells = [{"teacher": n, "shard": s} for n, todo in work.items() for s in todo]
    out: list[dict] = []
    t0 = time.time()
    with progress(len(cells), f"teach {', '.join(work)}") as bar:
        try:
            if inline:
                worker = TeachWorker(root, cfg, fps)
                for c in cells:
                    out.append(worker.cell(c["teacher"], c["shard"]))
                    bar.advance(0, 1)
            else:
                for row in _pool_dataset(root, cfg, cells, fps).iter_rows():
                    out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                    bar.advance(0, 1)
        except Exception as err:  # Ray wraps the actor's error; name the teacher, keep finished cells
            raise _pool_failed(work, out, err) from err
    return out, max(0.0, min(r["started"] for r in out) - t0) if out else 0.0  # clocks of other nodes may lag


def _pool_dataset(root: Root, cfg: DadConfig, cells: list[dict], fps: dict[str, tuple[str, str]]):
    import ray.data

    tcfg = cfg.teachers[cells[0]["teacher"]]  # every teacher of a pool asks for the same
    remote_args = {"num_cpus": tcfg.num_cpus, "num_gpus": tcfg.num_gpus}
    if tcfg.memory:
        remote_args["memory"] = tcfg.memory
    if tcfg.resources:
        remote_args["resources"] = tcfg.resources
    ds = ray.data.from_items(cells, override_num_blocks=len(cells))
    acfg = with_absolute_paths(cfg)  # actors may run in another working directory, or on another node
    return ds.map_batches(TeachWorker, fn_constructor_args=(Root(acfg.run.root, root.storage_options), acfg, fps),
                          batch_size=1,
                          # A task is one cell. Two in flight per actor: the next cell is already queued when
                          # one ends (on 2 busy cores Ray's dispatch took ~0.2 s per cell, 17 % of a small
                          # teacher's time); at the end at most one cell waits behind a busy actor.
                          compute=ray.data.ActorPoolStrategy(size=min(tcfg.actors, len(cells)),
                                                             max_tasks_in_flight_per_actor=2), **remote_args)


def _pool_failed(work: dict[str, list[int]], out: list[dict], err: BaseException) -> RuntimeError:
    """One line: which teacher failed, how many of its shards are kept, the cause, the command to rerun."""
    cell = next((e for e in causes(err) if isinstance(e, CellFailed)), None)  # which cell raised
    done = {n: sum(r["teacher"] == n for r in out) for n in work}
    name = cell.teacher if cell else next((n for n in work if done[n] < len(work[n])), next(iter(work)))
    return RuntimeError(f"teacher {name!r} failed ({done[name]}/{len(work[name])} shards finished and kept): "
                        f"{cell.line if cell else cause_line(err)}; rerun `dad teach --teacher {name}` once that "
                        f"is fixed (--debug shows the traceback)")


def run(cfg: DadConfig, teachers: list[str] | None = None, address: str | None = None,
        break_lock: bool = False, verify: bool = False, lineage: Lineage | None = None) -> dict:
    """Fill the target cache for the given teachers (default: all configured); only missing cells.

    Done cells are checked against their markers (object sizes; sha256 with `verify=True`): a cell whose
    stored bytes changed since it was written is recomputed, with a warning that says why. Teachers whose
    actors ask for the same resources share one actor pool (`pools`). The summary's `start_up_s` is the
    pools' start-up and `ray_start_s` the time taken to start or join Ray."""
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
    ray_start = 0.0
    if not inline:
        ray_start = init_ray(cfg.run, address)
        # an actor no node can host would wait forever, silently: refuse it now, naming the key
        require_resources([teacher_request(n, cfg.teachers[n]) for n in _with_work(ledger, lineage, names, shards)])
    totals = {"samples": 0, "cells": 0, "skipped": 0, "invalid_px": 0, "recomputed": 0, "start_up_s": 0.0}
    fps = {n: (lineage.teach(n), lineage.shard) for n in names}
    for group in pools(cfg, names):
        with ExitStack() as locks:
            work = {}
            for name in group:
                locks.enter_context(stage_lock(root, STAGE, name, break_lock=break_lock,
                                               command=f"dad teach --teacher {name}"))
                todo, recomputed = _prepare(root, cfg, ledger, lineage, name, shards, verify, break_lock)
                totals["recomputed"] += recomputed
                totals["skipped"] += len(shards) - len(todo)
                if todo:
                    work[name] = todo
            if not work:
                continue
            infos, start_up = _run_pool(root, cfg, work, fps, inline)
            totals["start_up_s"] += start_up
            for info in infos:
                totals["samples"] += int(info["samples"])
                totals["cells"] += 1
                totals["invalid_px"] += int(info["invalid_global_px"]) + int(info["invalid_local_px"])
    totals["start_up_s"] = round(totals["start_up_s"], 2)
    return {"stage": STAGE, "teachers": len(names), **totals, "ray_start_s": round(ray_start, 2),
            "seconds": round(time.time() - t0, 2)}


def _prepare(root: Root, cfg: DadConfig, ledger: Ledger, lineage: Lineage, name: str, shards: list[int],
             verify: bool, break_lock: bool) -> tuple[list[int], int]:
    """Under the teacher's lock: check and repair its cache's metadata, unmark cells whose bytes changed,
    create the cache if need be; the shards left to teach, and how many of them are recomputed."""
    spec, fp, c = lineage.spec(name), lineage.teach(name), cfg.crops
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
    todo = [s for s in shards if shard_name(s) not in done or s in corrupt]
    if todo:
        ensure_cache(root, name, max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count,
                     c.local_store, attrs=attrs)
    return todo, len(corrupt)


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
