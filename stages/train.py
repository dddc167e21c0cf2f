"""Train stage: distil the student from cached cross-context targets on Ray Train (DDP).

`dad train` checks everything that can be checked before any worker starts (targets cached for
every teacher, a selection that keeps samples, a compatible checkpoint), then runs `worker_loop`
on N Ray Train workers (`TorchTrainer`; gloo on CPU, nccl on GPU) — or in this process for
memory:// roots / `run.executor = "inline"`.

Each rank streams its own shards (student/data.py); rank 0 writes, every `checkpoint_every` steps,
an atomic checkpoint `train/<name>/ckpt-<step>.pt` holding the model, optimizer, scheduler, RNG
states and the step (which is the data position: every draw is seeded by (seed, epoch, row)).
A rerun resumes from the latest checkpoint; `--init-from` starts from a student checkpoint or a
Depth Anything model directory. `metrics.jsonl` and TensorBoard events record the loss terms,
learning rates and the predictions' median and spread (students drift in scale, PAPER §2.5).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time

import numpy as np
import torch

from pipeline.config import DadConfig, fingerprint
from pipeline.ledger import Ledger, check_recorded, stage_lock
from pipeline.runtime import init_ray, use_inline
from pipeline.storage import Root
from stages.score import metrics_fingerprint, selection_fingerprint, teacher_fps
from student.data import StreamSpec, TargetStream, prefetch, steps_per_epoch
from student.trainer import StepConfig, frozen_encoder, make_optimizer, make_scheduler, train_step

log = logging.getLogger("dad.train")
STAGE = "train"
CKPT = re.compile(r"^ckpt-(\d{7})\.pt$")
RESUME_FREE = {"steps", "checkpoint_every", "log_every", "workers", "cpus_per_worker", "gpus_per_worker",
               "resources_per_worker", "prefetch", "name"}


def train_fingerprint(cfg: DadConfig) -> str:
    """What the weights depend on (not the step budget or the number of workers' resources)."""
    tfps = teacher_fps(cfg)
    sel = selection_fingerprint(cfg, metrics_fingerprint(cfg, tfps))
    return fingerprint({"train": cfg.train.model_dump(exclude=RESUME_FREE), "student": cfg.student.model_dump(),
                        "selection": sel, "seed": cfg.run.seed, "workers": cfg.train.workers})


# -- checks before any worker starts ------------------------------------------------------------

def load_selection(root: Root, cfg: DadConfig) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    ledger = Ledger(root)
    tfps = teacher_fps(cfg)
    for n, tfp in tfps.items():
        if not ledger.done("teach", n, tfp):
            raise FileNotFoundError(f"no cached targets for teacher {n!r}: run `dad teach --teacher {n}`")
    sfp = selection_fingerprint(cfg, metrics_fingerprint(cfg, tfps))
    if not ledger.is_done("score", "_", "selection", sfp):
        raise FileNotFoundError("no current teacher selection (teachers or score settings changed): run `dad score`")
    table = root.read_table("scores", "selection.parquet").to_pylist()
    if not table:
        raise ValueError("the selection keeps no samples (every sample was dropped): check `dad score`'s summary")
    selection = {r["row"]: np.array([r[f"p_{n}"] for n in cfg.teachers]) for r in table}
    shard_rows: dict[int, list[int]] = {}
    for r in sorted(table, key=lambda r: r["row"]):
        shard_rows.setdefault(r["shard"], []).append(r["row"])
    return selection, shard_rows


def build_model(cfg: DadConfig):
    from student.checkpoint import load_checkpoint
    from student.model import build_student

    src = cfg.train.init_from
    if not src:
        return build_student(cfg.student.size, encoder_weights=cfg.student.encoder_weights)
    if src.endswith((".pt", ".pth", ".ckpt")):
        model, _ = load_checkpoint(src)
    else:
        from student.convert import student_from_depth_anything

        model = student_from_depth_anything(src)
    log.info("student initialised from %s (its architecture: %s)", src, model.config.encoder)
    return model


def latest_checkpoint(root: Root, name: str) -> tuple[int, str] | None:
    steps = [int(m.group(1)) for f in root.listdir("train", name) if (m := CKPT.match(f))]
    return (max(steps), root.uri("train", name, f"ckpt-{max(steps):07d}.pt")) if steps else None


# -- the per-worker loop ------------------------------------------------------------------------

def worker_loop(config: dict) -> None:
    cfg = DadConfig.model_validate(config["cfg"])
    t = cfg.train
    rank, world = 0, 1
    if config.get("ray"):
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads", 1))
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cuda" if t.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
    root = Root(cfg.run.root)
    from student.checkpoint import load_checkpoint, save_checkpoint

    model = build_model(cfg)
    opt = make_optimizer(model, t.lr_encoder, t.lr_decoder, t.weight_decay)
    sched = make_scheduler(opt, t.warmup_steps, t.steps)
    start, history = 0, []
    resume = latest_checkpoint(root, t.name)
    if resume:
        model_r, extra = load_checkpoint(resume[1])
        if model_r.config.to_dict() != model.config.to_dict():
            raise ValueError(f"checkpoint {resume[1]} is a different model than this config builds")
        model.load_state_dict(model_r.state_dict())
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        start = int(extra["step"])
        if root.exists("train", t.name, "metrics.jsonl"):
            history = [json.loads(x) for x in root.read_bytes("train", t.name, "metrics.jsonl").decode().splitlines()]
            history = [h for h in history if h["step"] <= start]
    frozen = frozen_encoder(model).to(device) if t.feature_loss else None
    model.to(device)
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)
    spec = StreamSpec(root, tuple(cfg.teachers), cfg.crops.global_size, t.batch_size, cfg.run.seed, t.flip,
                      t.jitter, cfg.score.policy == "mix")
    selection, shard_rows = load_selection(root, cfg)
    stream = TargetStream(spec, selection, shard_rows)
    counts = {s: len(r) for s, r in shard_rows.items()}
    spe = steps_per_epoch(counts, cfg.run.seed, world, t.batch_size)
    step_cfg = StepConfig(t.norm, t.use_sc, t.use_lg, t.lambda_lg, t.lambda_feat, t.lambda_grad, t.feature_loss)
    writer = _tensorboard(root, t.name) if rank == 0 else None
    step, t0, seen = start, time.time(), 0
    while step < t.steps:
        epoch, skip = divmod(step, spe)
        n = min(spe, skip + t.steps - step)
        for batch in prefetch(stream.batches(epoch, rank, world, n, skip), t.prefetch):
            stats = train_step(model, batch, opt, sched, step_cfg, t.grad_clip, frozen, device, t.amp)
            step += 1
            seen += batch["image"].shape[0]
            if rank != 0:
                continue
            if step % t.log_every == 0 or step == t.steps:
                record = {"step": step, "epoch": epoch, "samples_per_s": seen * world / (time.time() - t0), **stats,
                          "teachers": np.bincount(batch["teacher"].numpy(), minlength=len(cfg.teachers)).tolist()}
                history.append(record)
                _log(root, t.name, history, writer, record)
            if step % t.checkpoint_every == 0 or step == t.steps:
                core = model.module if hasattr(model, "module") else model
                extra = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                         "torch_rng": torch.get_rng_state(), "fingerprint": config["fingerprint"]}
                save_checkpoint(core, root.uri("train", t.name, f"ckpt-{step:07d}.pt"), extra=extra)
                if step == t.steps:
                    save_checkpoint(core, root.uri("train", t.name, "model.pt"))
    if writer:
        writer.close()
    if rank == 0:
        root.write_json({"steps": step, "steps_per_epoch": spe, "world": world, "resumed_from": start,
                         "seconds": round(time.time() - t0, 2)}, "train", t.name, "summary.json")


def _tensorboard(root: Root, name: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency, but never fail training on it
        return None
    logdir = root.path("train", name, "tb") if root.is_local else tempfile.mkdtemp(prefix="dad-tb-")
    return SummaryWriter(logdir)


def _log(root: Root, name: str, history: list[dict], writer, record: dict) -> None:
    root.write_bytes("\n".join(json.dumps(h) for h in history).encode() + b"\n", "train", name, "metrics.jsonl")
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                writer.add_scalar(k.replace("_", "/", 1), v, record["step"])
        writer.flush()
        if not root.is_local:
            root.fs.put(writer.log_dir, root.path("train", name, "tb"), recursive=True)


# -- the stage ----------------------------------------------------------------------------------

def run(cfg: DadConfig, address: str | None = None, break_lock: bool = False) -> dict:
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger, t = Ledger(root), cfg.train
    check_recorded(root, cfg, STAGE)
    load_selection(root, cfg)  # fail early, with the command to run
    fp = train_fingerprint(cfg)
    if ledger.is_done(STAGE, t.name, "final", fp) and (latest_checkpoint(root, t.name) or (0,))[0] >= t.steps:
        return {"stage": STAGE, "name": t.name, "steps": t.steps, "skipped": True, "seconds": 0.0}
    prior = ledger.markers(STAGE, t.name).get("run")
    if prior and fp not in prior and latest_checkpoint(root, t.name):
        raise ValueError(f"train/{t.name} holds checkpoints made with other settings; use --name NEW "
                         f"(or delete train/{t.name}) to train with these")
    with stage_lock(root, STAGE, t.name, break_lock=break_lock, command=f"dad train --name {t.name}"):
        ledger.mark(STAGE, t.name, "run", fp, {"started": time.time()})
        payload = {"cfg": cfg.model_dump(mode="json"), "fingerprint": fp}
        if use_inline(cfg.run, root.process_local):
            if t.workers > 1:
                raise ValueError("train.workers > 1 needs Ray (not a memory:// root or the inline executor)")
            worker_loop({**payload, "threads": torch.get_num_threads()})
        else:
            _fit_on_ray(cfg, payload, address)
        summary = root.read_json("train", t.name, "summary.json")
        ledger.mark(STAGE, t.name, "final", fp, summary)
    return {"stage": STAGE, "name": t.name, "workers": t.workers, **summary, "seconds": round(time.time() - t0, 2)}


def _fit_on_ray(cfg: DadConfig, payload: dict, address: str | None) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.run, address)
    t = cfg.train
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **t.resources_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    threads = max(1, int(t.cpus_per_worker)) if not use_gpu else max(1, (os.cpu_count() or 2) // t.workers)
    trainer = TorchTrainer(
        worker_loop, train_loop_config={**payload, "ray": True, "threads": threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"dad-{t.name}-{payload['fingerprint']}",
                             storage_path=os.path.join(tempfile.gettempdir(), "dad-ray-train")))
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - show the worker's own error, not Ray's wrapper
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise RuntimeError(f"training failed: {type(cause).__name__}: {cause}".splitlines()[0]) from err


def status(cfg: DadConfig, root: Root) -> list[dict]:
    t = cfg.train
    latest = latest_checkpoint(root, t.name)
    done = latest[0] if latest else 0
    try:
        fp = train_fingerprint(cfg)
    except (FileNotFoundError, ValueError):
        return []
    final = Ledger(root).is_done(STAGE, t.name, "final", fp)
    note = "complete" if final and done >= t.steps else (f"resumable from step {done}" if done else "not started")
    return [{"stage": STAGE, "scope": t.name, "done": done, "total": t.steps, "stale": 0, "note": note}]
