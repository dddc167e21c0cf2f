"""Teach stage: run every teacher on every corpus shard; cache global + local predictions in Zarr.

For each (teacher, shard) cell without a current marker: read the shard's tar, build the global
input (the stored region resized to G×G) and the K local inputs (each patch box cut from the
native-resolution region, at `crops.patch` px), run the teacher in batches, resample the local
predictions to L×L, and write the shard's slice of `cache/<teacher>/` in one call; then the marker.

Each teacher runs as a Ray Data actor pool (`map_batches` with a class UDF; the model is loaded once
per actor; `actors`, `num_gpus`, `num_cpus`, `memory`, `resources` per actor from the teacher's
config). One corpus shard goes to one actor call, so one task writes one Zarr shard.

Cells are keyed by a fingerprint of the teacher spec (weights identity, input rule, output space),
the corpus/crop plan and the cache layout: adding a teacher computes only its own cells; changing
one redoes only its cells; the other teachers' groups are not opened for writing.

Integrity (issue #19): a corpus shard is hashed against its shard marker before a worker uses any of its
samples; the cache's metadata documents are compared with what `ensure_cache` writes and rewritten if
they differ. A teacher's cache is never rewritten while a `dad train` or `dad score` holds a read lease
on it (`pipeline.ledger.read_leases`): the refusal names the reader and its lease file.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import (
    LAYOUT,
    CacheCorruptError,
    check_shard,
    ensure_cache,
    metadata_problems,
    object_sizes,
    open_arrays,
    open_cache,
    reference_metadata,
    repair_metadata,
    shard_digests,
    write_shard,
)
from pipeline.config import DadConfig, TeacherCfg, fingerprint, with_absolute_paths
from pipeline.corpus import iter_shard, shard_ids
from pipeline.crops import box_pixels
from pipeline.errors import cause_line
from pipeline.images import resize
from pipeline.layout import shard_name
from pipeline.ledger import Ledger, check_recorded, refuse_if_leased, stage_lock
from pipeline.runtime import init_ray, progress, require_resources, teacher_request, use_inline
from pipeline.storage import Root
from stages.shard import require_intact_corpus, shard_fingerprint, tar_record
from stages.teachers import Teacher, build_teacher, spec_for

log = logging.getLogger("dad.teach")
STAGE = "teach"


def cell_fingerprint(cfg: DadConfig, teacher_fp: str) -> str:
    return fingerprint({"teacher": teacher_fp, "corpus": shard_fingerprint(cfg), "layout": LAYOUT})


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def sample_inputs(region: np.ndarray, boxes: list, g: int, p: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The G×G global input and the K local patches (P×P) of one stored region."""
    side = region.shape[0]
    glob = resize(region, (g, g))
    locs = []
    for box in boxes:
        x0, y0, x1, y1 = box_pixels(tuple(box), side)
        locs.append(resize(region[y0:y1, x0:x1], (p, p)))
    return glob, locs


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

    def __init__(self, root: Root, cfg: DadConfig, name: str, fp: str):
        tcfg: TeacherCfg = cfg.teachers[name]
        if tcfg.torch_threads:
            torch.set_num_threads(tcfg.torch_threads)
        device = "cuda" if tcfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.root, self.cfg, self.name, self.fp, self.tcfg = root, cfg, name, fp, tcfg
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
        for record, region in iter_shard(self.root, shard, expect=tar_record(self.root, self.cfg, shard)):
            glob, locs = sample_inputs(region, record["boxes"], crops.global_size, crops.patch)
            globals_.append(glob)
            locals_.extend(locs)
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


def _run_teacher(root: Root, cfg: DadConfig, name: str, fp: str, todo: list[int], inline: bool) -> list[dict]:
    tcfg = cfg.teachers[name]
    if inline:
        out = []
        with progress(len(todo), f"teach {name}") as bar:
            try:
                worker = TeachWorker(root, cfg, name, fp)
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
    ds = ds.map_batches(TeachWorker, fn_constructor_args=(Root(acfg.run.root, root.storage_options), acfg, name, fp),
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


def verify_cells(root: Root, name: str, fp: str, shards: list[int], deep: bool) -> dict[int, str]:
    """Done cells of `name` whose stored shard objects no longer match their marker: shard → why.

    Cheap (deep=False): one listing of the cache's object sizes, one read per marker. Deep: sha256 of every
    stored shard object (reads the whole cache of that teacher)."""
    ledger = Ledger(root)
    sizes = None if deep else object_sizes(root, name)
    bad = {}
    for s in shards:
        try:
            recorded = ledger.info(STAGE, name, shard_name(s), fp).get("objects")
        except (FileNotFoundError, ValueError) as err:
            bad[s] = f"unreadable teach marker: {type(err).__name__}: {err}"
            continue
        why = check_shard(root, name, s, recorded, deep=deep, sizes=sizes)
        if why:
            bad[s] = why
    return bad


def run(cfg: DadConfig, teachers: list[str] | None = None, address: str | None = None,
        break_lock: bool = False, verify: bool = False) -> dict:
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
    if not ledger.is_done("shard", "_", "final", shard_fingerprint(cfg)):
        raise FileNotFoundError(f"the corpus in {root.url} is not complete: run `dad shard` first")
    require_intact_corpus(root, cfg, deep=verify)  # manifest and tars as `dad shard` wrote them
    shards = shard_ids(root)
    inline = use_inline(cfg.run, root.process_local)
    if not inline:
        init_ray(cfg.run, address)
        # an actor no node can host would wait forever, silently: refuse it now, naming the key
        require_resources([teacher_request(n, cfg.teachers[n]) for n in _with_work(ledger, cfg, names, shards)])
    totals = {"samples": 0, "cells": 0, "skipped": 0, "invalid_px": 0, "recomputed": 0}
    for name in names:
        spec = spec_for(name, cfg.teachers[name])
        fp = cell_fingerprint(cfg, spec.fingerprint)
        with stage_lock(root, STAGE, name, break_lock=break_lock, command=f"dad teach --teacher {name}"):
            c = cfg.crops
            attrs = {"teacher": spec.as_attrs(), "output_space": spec.output_space, "license": spec.license,
                     "fingerprint": fp, "crops": cfg.crops.model_dump(), "shard_size": cfg.corpus.shard_size}
            reference = reference_metadata(max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count,
                                           c.local_store, attrs)
            damaged = metadata_problems(root, name, reference, reader_attrs(cfg, spec))
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
            for info in _run_teacher(root, cfg, name, fp, todo, inline):
                totals["samples"] += int(info["samples"])
                totals["cells"] += 1
                totals["invalid_px"] += int(info["invalid_global_px"]) + int(info["invalid_local_px"])
    return {"stage": STAGE, "teachers": len(names), **totals, "seconds": round(time.time() - t0, 2)}


def _with_work(ledger: Ledger, cfg: DadConfig, names: list[str], shards: list[int]) -> list[str]:
    """The teachers with a shard not done under their current fingerprint: those that will start actors
    (a finished teacher's resources need not exist here: `dad run` on a laptop after teaching on a cluster)."""
    want = {shard_name(s) for s in shards}
    return [n for n in names
            if want - ledger.done(STAGE, n, cell_fingerprint(cfg, spec_for(n, cfg.teachers[n]).fingerprint))]


def reader_attrs(cfg: DadConfig, spec) -> dict:
    """The cache attributes readers act on: how values convert to disparity, and slot → shard."""
    return {"output_space": spec.output_space, "shard_size": cfg.corpus.shard_size}


def require_intact_metadata(root: Root, cfg: DadConfig, names: list[str], shards: list[int]) -> None:
    """Raise CacheCorruptError if a teacher's cache metadata would be misread (naming the document and the
    command that rewrites it); cheap: five small documents per teacher."""
    c = cfg.crops
    reference = reference_metadata(max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count, c.local_store)
    for name in names:
        damaged = metadata_problems(root, name, reference, reader_attrs(cfg, spec_for(name, cfg.teachers[name])))
        if damaged:
            key, why = min(damaged.items())
            raise CacheCorruptError(f"cached targets of teacher {name!r} cannot be read as written: cache/{name}/{key} "
                                    f"{why}; rewrite it with `dad teach --verify --teacher {name}`, then rerun")


def status(cfg: DadConfig, root: Root) -> list[dict]:
    ledger = Ledger(root)
    try:
        total = len(shard_ids(root))
    except FileNotFoundError:
        total = 0
    rows = []
    for name, tcfg in cfg.teachers.items():
        fp = cell_fingerprint(cfg, spec_for(name, tcfg).fingerprint)
        markers = ledger.markers(STAGE, name)
        done = sum(fp in fps for fps in markers.values())
        stale = sum(fp not in fps for fps in markers.values())
        note = "complete" if total and done == total else ("stale: settings changed" if stale else "")
        rows.append({"stage": STAGE, "scope": name, "done": done, "total": total, "stale": stale, "note": note})
    return rows
