"""Train-stage benchmarks (issue #6): `python -m bench.train_perf [--quick]`.

`P2_ingest_efficiency`: steps/s streaming from the run root (as `stages/train.py` runs it) ÷ steps/s over
the same batches in memory, the median of paired repetitions (goal ≥ 0.97). `P3_cached_vs_online`: cost of
`dad teach` + 3 epochs from the cache ÷ 3 epochs of the paper's online recipe, which runs both teachers on
every step's global input and local patches (goal ≤ 0.45), in process CPU time. One torch thread,
generated photo-like images, inline (no Ray), in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.kit.configs import dad_config, demo_teachers, missing_models
from bench.kit.images import write_photos
from bench.kit.train import build_cached_run, live_student, stream_for
from pipeline.corpus import iter_shard
from pipeline.crops import local_inputs
from stages.teach import predict_batched, resample
from student.checkpoint import load_checkpoint
from student.data import EpochPlan, collate, draw_teacher, prefetch
from student.losses import LossConfig
from student.trainer import freeze_unused, make_optimizer, make_scheduler, train_step

SIZES = {  # quick → corpus, crops, batch; P2 times p2_steps steps, `repeats` paired repetitions
    False: {"n": 32, "size": (192, 144), "batch": 4, "shard": 8, "p2_steps": 8, "repeats": 7,
            "crops": {"min_region": 112, "patch": 84, "global_size": 112, "local_store": 56}},
    True: {"n": 12, "size": (96, 72), "batch": 2, "shard": 4, "p2_steps": 4, "repeats": 3,
           "crops": {"min_region": 56, "patch": 42, "global_size": 56, "local_store": 28}},
}


def _sizes(size: tuple[int, int]) -> tuple:
    return size, (size[1] + 8, size[1] + 8), (size[1], size[0])


def _corpus(folder: Path, n: int, size: tuple[int, int]) -> Path:
    return write_photos(folder, n, sizes=_sizes(size))


def _model(ckpt: str):
    model, _ = load_checkpoint(ckpt)
    freeze_unused(model)
    return model


def _trainer(cfg, ckpt: str):
    t = cfg.train
    model = _model(ckpt)
    opt = make_optimizer(model, t.lr_encoder, t.lr_decoder, t.weight_decay)
    sched = make_scheduler(opt, t.warmup_steps, 10_000)
    step_cfg = LossConfig.of(t, feature_loss=False)
    return lambda batch: train_step(model, batch, opt, sched, step_cfg, t.grad_clip)


def _time_loop(step, batches) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for batch in batches:
        step(batch)
        n += 1
    return time.perf_counter() - t0, n


# -- P2 ------------------------------------------------------------------------------------------

def bench_p2(folder: Path, quick: bool) -> dict:
    p = SIZES[quick]
    cfg = build_cached_run(folder / "p2", n_images=p["n"], shard_size=p["shard"], sizes=_sizes(p["size"]),
                           images="photos", crops=p["crops"], train={"batch_size": p["batch"], "jitter": 0.1, "flip": True})
    ckpt = str(folder / "p2" / "live.pt")
    live_student(ckpt)
    stream = stream_for(cfg)
    plan = EpochPlan({s: len(r) for s, r in stream.shard_rows.items()}, cfg.run.seed, 1, p["batch"])
    n = min(p["p2_steps"], plan.steps(1))
    warm = _trainer(cfg, ckpt)
    for b in list(stream.batches(0, 0, 1, 1)):  # warm-up: first-call costs (allocator, kernels)
        warm(b)
    streamed, memory = [], []
    for _ in range(p["repeats"]):
        held = list(stream.batches(1, 0, 1, n))  # epoch 1's batches, decoded and joined beforehand
        memory.append(_time_loop(_trainer(cfg, ckpt), held)[0])
        del held
        streamed.append(_time_loop(_trainer(cfg, ckpt), stream.batches(1, 0, 1, n, workers=cfg.train.prefetch))[0])
    paired = [m / st for m, st in zip(memory, streamed)]  # each repetition: in-memory, then streaming
    # CPU cost of ingest alone vs the step alone: on a machine with no idle core, streaming can be no
    # faster than train / (train + ingest) of the in-memory speed, whatever the overlap.
    t0 = time.process_time()
    for _ in stream.batches(1, 0, 1, n, workers=cfg.train.prefetch):
        pass
    ingest_cpu = (time.process_time() - t0) / n
    held, step = list(stream.batches(1, 0, 1, n)), _trainer(cfg, ckpt)
    t0 = time.process_time()
    _time_loop(step, held)
    train_cpu = (time.process_time() - t0) / n
    return {"value": round(statistics.median(paired), 3), "unit": "ratio (median of paired runs)", "goal": ">= 0.97",
            "detail": {"steps": n, "batch": p["batch"], "global_size": cfg.crops.global_size,
                       "loader_threads": cfg.train.prefetch, "ingest_cpu_s_per_step": round(ingest_cpu, 4),
                       "train_cpu_s_per_step": round(train_cpu, 4),
                       "no_idle_core_bound": round(train_cpu / (train_cpu + ingest_cpu), 3),
                       "streaming_steps_per_s": round(n / min(streamed), 3),
                       "in_memory_steps_per_s": round(n / min(memory), 3),
                       "streaming_s": [round(x, 2) for x in streamed], "in_memory_s": [round(x, 2) for x in memory],
                       "paired_ratios": [round(x, 3) for x in paired],
                       "best_of_ratio": round(min(memory) / min(streamed), 3)}}


# -- P3 ------------------------------------------------------------------------------------------

class OnlineStream:
    """The paper's online recipe: every step runs both teachers on its samples' global and local inputs.

    Samples, order and teacher draws are those of the cached stream (same data and steps); decoding
    runs ahead in the prefetch thread like the cached stream's, teacher inference runs in the step.
    """

    def __init__(self, cfg, cached_stream, teachers: list):
        self.cfg, self.stream, self.teachers = cfg, cached_stream, teachers

    def raw(self, epoch: int, n_steps: int):
        s, c = self.stream, self.cfg.crops
        bs = self.cfg.train.batch_size
        items = []
        for shard in s.shards(epoch, 0, 1):
            samples = {smp.record["row"]: smp for smp in iter_shard(s.spec.root, shard)}
            for row in s.order(shard, epoch):
                smp = samples[row]
                glob, locs = smp.view(c.global_size), local_inputs(smp.region(), smp.record["boxes"], c.patch)
                items.append((row, smp.record["boxes"], glob, locs))
                if len(items) == bs:
                    yield items
                    items = []
                    n_steps -= 1
                    if n_steps == 0:
                        return

    def batch(self, items, epoch: int) -> dict:
        c, bs = self.cfg.crops, len(items)
        globs = [g for _, _, g, _ in items]
        locs = [x for _, _, _, ls in items for x in ls]
        preds = []
        for teacher in self.teachers:  # both teachers, every step
            g = predict_batched(teacher, globs, len(globs))
            loc = predict_batched(teacher, locs, len(locs))
            preds.append((resample(g.astype(np.float32), c.global_size),
                          resample(loc.astype(np.float32), c.local_store).reshape(bs, c.local_count, c.local_store,
                                                                                   c.local_store)))
        out = []
        for i, (row, boxes, glob, _) in enumerate(items):
            t = draw_teacher(self.stream.selection[row], self.cfg.run.seed, epoch, row)
            g, loc = preds[t][0][i], preds[t][1][i]
            out.append({"image": torch.from_numpy(glob.astype(np.float32).transpose(2, 0, 1) / 255.0),
                        "target": torch.from_numpy(g), "valid": torch.from_numpy(np.isfinite(g)),
                        "locals": torch.from_numpy(loc), "local_valid": torch.from_numpy(np.isfinite(loc)),
                        "boxes": torch.tensor(boxes, dtype=torch.float32), "teacher": torch.tensor(t),
                        "row": torch.tensor(row)})
        return collate(out)


def bench_p3(folder: Path, quick: bool, epochs: int = 3, real: bool = False) -> dict:
    """P3 with two tiny-student checkpoints as teachers, or (`real`) the demo's TFLite teachers, PyDNet v2
    (flip-averaged) and FastDepth, on half the samples (they cost far more than the student)."""
    import stages.score
    import stages.teach
    from stages.teachers import build_teacher

    p = SIZES[quick]
    folder = folder / ("p3-real" if real else "p3")
    folder.mkdir(parents=True)
    g = p["crops"]["global_size"]
    run, n = {}, p["n"]
    if real:
        demo, mirror = demo_teachers()
        teachers, run, n = {k: {**v, "torch_threads": 1} for k, v in demo.items()}, {"model_mirror": mirror}, n // 2
    else:
        for i, name in enumerate(("teacher_a", "teacher_b")):
            live_student(folder / f"{name}.pt", seed=100 + i)
        teachers = {"a": {"adapter": "checkpoint", "model": str(folder / "teacher_a.pt"), "input_size": g,
                          "batch_size": 8, "prior": 0.7},
                    "b": {"adapter": "checkpoint", "model": str(folder / "teacher_b.pt"), "input_size": g,
                          "batch_size": 8, "prior": 0.3}}
    # the cached recipe: shard (shared by both recipes, not timed), teach once, score, 3 epochs from the cache
    import stages.shard

    src = _corpus(folder / "src", n, p["size"])
    cfg = dad_config(folder / "root", src, teachers, shard_size=p["shard"], crops=p["crops"], run=run,
                     train={"batch_size": p["batch"], "jitter": 0.0, "flip": False})
    stages.shard.run(cfg)
    ckpt = str(folder / "student.pt")
    live_student(ckpt, seed=7)
    clock = Clock()
    with clock("teach"):
        stages.teach.run(cfg)
    with clock("score"):
        stages.score.run(cfg)
    stream = stream_for(cfg)
    plan = EpochPlan({s: len(r) for s, r in stream.shard_rows.items()}, cfg.run.seed, 1, p["batch"])
    step, steps = _trainer(cfg, ckpt), 0
    with clock("cached"):
        for epoch in range(epochs):
            steps += _time_loop(step, stream.batches(epoch, 0, 1, plan.steps(epoch), workers=cfg.train.prefetch))[1]
    # the online recipe: same student, samples, draws and steps; both teachers inside every step
    online_steps = 0
    with clock("online"):
        models = [build_teacher(t, cfg.teachers[t]) for t in cfg.teachers]  # loading them is part of the recipe
        online = OnlineStream(cfg, stream, models)
        step = _trainer(cfg, ckpt)
        for epoch in range(epochs):
            for items in prefetch(online.raw(epoch, plan.steps(epoch)), cfg.train.prefetch):
                step(online.batch(items, epoch))
                online_steps += 1
    assert online_steps == steps
    wall, cpu = clock.wall, clock.cpu
    # per epoch: S = training from the cache, T = the teachers' share of an online epoch; the cached recipe
    # pays T once, so over n epochs the ratio is (teach + n·S) / (n·(T + S)) → teach / (n·T) for costly teachers
    S, T = cpu["cached"] / epochs, (cpu["online"] - cpu["cached"]) / epochs
    return {"value": round((cpu["teach"] + cpu["cached"]) / cpu["online"], 3), "unit": "ratio of CPU time",
            "goal": "<= 0.45",
            "detail": {"teachers": {t: f"{v.adapter}: {Path(v.model).name}" for t, v in cfg.teachers.items()},
                       "epochs": epochs, "steps": steps, "samples": sum(len(r) for r in stream.shard_rows.values()),
                       "batch": p["batch"], "global_size": g, "local_count": cfg.crops.local_count,
                       "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
                       "wall_s": {k: round(v, 2) for k, v in wall.items()},
                       "wall_ratio": round((wall["teach"] + wall["cached"]) / wall["online"], 3),
                       "ratio_including_score": round((cpu["teach"] + cpu["score"] + cpu["cached"]) / cpu["online"], 3),
                       "teacher_to_student_cost": round(T / S, 2),
                       "projected_ratio_10_epochs": round((cpu["teach"] + 10 * S) / (10 * (T + S)), 3),
                       **({} if real else {"larger_teachers": _larger_teachers(g, cpu["teach"], T, S, epochs)})}}


def _larger_teachers(g: int, teach: float, T: float, S: float, epochs: int) -> dict:
    """The same measurement projected to teachers that cost k× a tiny student per forward (k measured
    for the `small` preset, a ViT-S/14 like Depth Anything v2 Small): teach and T scale by k, S does not."""
    from student.model import build_student

    x = torch.rand(5, 3, g, g, generator=torch.Generator().manual_seed(0))  # 1 global + K = 4 locals
    cost = {}
    for size in ("tiny", "small"):
        model = build_student(size).eval()
        with torch.no_grad():
            model(x)
            t0 = time.process_time()
            for _ in range(5):
                model(x)
        cost[size] = time.process_time() - t0
    k = cost["small"] / cost["tiny"]
    return {"small_vs_tiny_forward_cost": round(k, 2),
            "projected_ratio_small_teachers": round((k * teach + epochs * S) / (epochs * (k * T + S)), 3)}


class Clock:
    """Wall and process CPU time per named block. CPU time (all threads of this process) does not grow
    when other processes load the machine, so it is the stable measure on a shared box; each recipe
    runs one torch thread, so on an idle machine wall ≈ CPU (the cached recipe's loader threads run in
    parallel: its wall time is lower still)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    import ray  # noqa: F401 - every stage imports Ray in a real run; keep its one-time import out of the timings
    with tempfile.TemporaryDirectory(prefix="dad-train-bench-") as tmp:
        out = {"P2_ingest_efficiency": bench_p2(Path(tmp), quick),
               "P3_cached_vs_online": bench_p3(Path(tmp), quick)}
        why = missing_models(*demo_teachers())
        if not quick and why is None:  # the demo's real teachers, when their files are here
            out["P3_cached_vs_online_real_teachers"] = bench_p3(Path(tmp), quick, real=True)
        elif not quick:
            out["P3_cached_vs_online"]["detail"]["real_teachers"] = f"not measured: {why}"
        return out


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
