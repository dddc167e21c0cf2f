"""Train stage: distil the student from cached cross-context targets on Ray Train (DDP).

`dad train` checks all it can before any worker starts (targets, selection, a compatible checkpoint),
then runs `worker_loop` on N `TorchTrainer` workers (gloo on CPU, nccl on GPU), or in this process for
memory:// roots and `run.executor = "inline"`. Rank 0 writes atomic checkpoints whose step is the data
position, so a rerun resumes exactly; a non-finite loss, gradient or weight stops training
(`TrainingDiverged`) without writing model.pt. Validation (`train.val_dataset`) leaves the weights as they
would be without it. The step: docs/method.md; the outputs: docs/run-root.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
import time

import numpy as np
import torch

from pipeline.cache import CacheCorruptError, require_intact_metadata, verify_cells
from pipeline.config import DadConfig, fingerprint, with_absolute_paths
from pipeline.corpus import require_intact_corpus, shard_ids
from pipeline.errors import cause_line
from pipeline.layout import INIT, METRICS_LOG, MODEL, SELECTION, SUMMARY, TENSORBOARD, shard_name, train_run
from pipeline.ledger import Ledger, read_leases, stage_lock
from pipeline.lineage import SCORE, TEACH, Lineage, check_recorded
from pipeline.models import graph_source
from pipeline.runtime import init_ray, require_resources, use_inline, worker_request
from pipeline.storage import Root
from stages.teachers import lineage_for
from student.checkpoint import checkpoint_name, checkpoint_steps, load_checkpoint, save_checkpoint
from student.data import EpochPlan, StreamSpec, TargetStream
from student.loop import Cadence, Hooks, fit, restore
from student.losses import LossConfig
from student.trainer import (
    freeze_unused,
    frozen_encoder,
    make_optimizer,
    make_scheduler,
    train_step,
)

log = logging.getLogger("dad.train")
STAGE = "train"
LOGS = ("metrics.jsonl", "val.jsonl")
KEEP_CHECKPOINTS = 2  # ckpt-*.pt files kept (the newest); model.pt (the final weights) is always kept
# -- checks before any worker starts ------------------------------------------------------------

def load_selection(root: Root, cfg: DadConfig, lineage: Lineage) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    """`read_selection`, after checking that the corpus, every teacher's targets and the selection are current
    (clear errors, with the command to run, before any worker starts)."""
    if not cfg.teachers:
        raise ValueError("no teachers configured: add a [teachers.<name>] section, then `dad teach` and `dad score`")
    require_intact_corpus(root, lineage.shard, shards=[])  # the manifest as `dad shard` wrote it
    lineage.require(root, TEACH)
    lineage.require(root, SCORE)
    return read_selection(root, cfg)


def read_selection(root: Root, cfg: DadConfig) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    """The selection as row → probabilities and shard → rows."""
    table = root.read_table(*SELECTION).to_pylist()
    if not table:
        raise ValueError("the selection keeps no samples (score.policy / filter_threshold / exclude_licenses "
                         "dropped every one): loosen them and rerun `dad score` (see scores/selection_summary.json)")
    selection = {r["row"]: np.array([r[f"p_{n}"] for n in cfg.teachers]) for r in table}
    shard_rows: dict[int, list[int]] = {}
    for r in sorted(table, key=lambda r: r["row"]):
        shard_rows.setdefault(r["shard"], []).append(r["row"])
    return selection, shard_rows


def verify_targets(root: Root, cfg: DadConfig, shards: list[int], lineage: Lineage) -> None:
    """sha256 every cached shard training will read against its teach marker, and every corpus shard
    against its shard marker (streamed, once per run); check the caches' metadata: corrupt targets or
    pixels are never trained on (the error names the cells and the command that repairs them)."""
    t0 = time.time()
    require_intact_corpus(root, lineage.shard, shards, deep=True)
    require_intact_metadata(root, cfg, lineage.output_spaces(), shard_ids(root))
    for n, tfp in lineage.teachers.items():
        bad = verify_cells(root, n, tfp, shards, deep=True)
        if bad:
            listed = "; ".join(f"shard {shard_name(s)}: {why}" for s, why in sorted(bad.items())[:3])
            raise CacheCorruptError(f"cached targets of teacher {n!r} are corrupt ({len(bad)} shard(s): {listed}): "
                                    f"recompute them with `dad teach --verify --teacher {n}`, then rerun")
    log.info("corpus and cached targets verified (%d shard(s) × %d teacher(s)) in %.1f s", len(shards),
             len(cfg.teachers), time.time() - t0)


def teacher_records(lineage: Lineage) -> dict[str, dict]:
    """What the summary and model card say of each teacher (its identity from the lineage, hashed once)."""
    return {n: {"license": tcfg.license, "model": lineage.spec(n).model, "weights": lineage.spec(n).weights_id,
                "fingerprint": lineage.spec(n).fingerprint} for n, tcfg in lineage.cfg.teachers.items()}


def build_model(cfg: DadConfig):
    from student.checkpoint import load_checkpoint
    from student.model import build_student

    src = cfg.train.init_from
    if cfg.student.arch == "tflite" and not src:
        from student.graph import graph_student_from_tflite

        _, path, options = graph_source(cfg)
        model = graph_student_from_tflite(path, input_size=cfg.student.input_size, **options)
        log.info("student: %s, weights imported from %s", model.config.encoder, path)
        return model
    if not src:
        return build_student(cfg.student.size, encoder_weights=cfg.student.encoder_weights)
    if is_checkpoint_file(src):
        model, _ = load_checkpoint(src)
    else:
        from student.convert import student_from_depth_anything

        model = student_from_depth_anything(src)
    log.info("student initialised from %s (its architecture: %s)", src, model.config.encoder)
    return model


def is_checkpoint_file(src: str) -> bool:
    """A student checkpoint file (else `src` is a Depth Anything model directory)."""
    return src.endswith((".pt", ".pth", ".ckpt"))


def architecture(config) -> tuple:
    """What decides whether weights fit: every parameter/buffer name and shape, and the tapped layers.

    Built on the meta device: no memory, no weights; cached per config (a ViT-L takes about a second).
    """
    return _architecture(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _architecture(config_json: str) -> tuple:
    from student.checkpoint import config_from_dict
    from student.model import StudentModel

    config = config_from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = StudentModel(config)
    return tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())), tuple(config.layers)


def _source_config(src: str):
    """The StudentConfig a checkpoint file or a Depth Anything directory holds (weights are not loaded)."""
    import fsspec

    from student.checkpoint import CheckpointError, config_from_dict

    if is_checkpoint_file(src):
        try:
            with fsspec.open(src, "rb") as f:
                payload = torch.load(f, map_location="meta", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint {src} not found") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
            raise CheckpointError(f"{src} is not a readable student checkpoint: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != "dad.student":
            raise CheckpointError(f"{src} is not a student checkpoint (dad.student format)")
        return config_from_dict(payload["model_config"])  # a StudentConfig, or a GraphConfig for graph students
    from student.convert import student_config_from_hf

    with fsspec.open(f"{src.rstrip('/')}/config.json", "r") as f:
        return student_config_from_hf(json.load(f))


def check_compatible(cfg: DadConfig, src: str, what: str, advice: str = "") -> None:
    """Refuse, before any worker starts, a checkpoint whose weights do not fit the configured student."""
    from student.model import PRESETS, StudentConfig

    if cfg.student.arch == "tflite":
        found = _source_config(src)
        if getattr(found, "arch", None) != "tflite" or found.source != graph_source(cfg)[0]:
            raise ValueError(f"{what} {src} is not a graph student imported from {cfg.student.init_from} "
                             f"(student.arch = 'tflite'){advice}")
        return
    found = architecture(_source_config(src))
    if found != architecture(StudentConfig(**PRESETS[cfg.student.size])):
        same = [k for k, p in PRESETS.items() if architecture(StudentConfig(**p)) == found]
        hint = f"; it is a {same[0]!r} student: set student.size = {same[0]!r}" if same else ""
        raise ValueError(f"{what} {src} is from an incompatible model: its weights do not fit the configured "
                         f"student (student.size = {cfg.student.size!r}){hint}{advice}")


def latest_checkpoint(root: Root, name: str) -> tuple[int, str] | None:
    steps = checkpoint_steps(root.listdir(*train_run(name)))
    return (steps[-1], root.uri(*train_run(name, checkpoint_name(steps[-1])))) if steps else None


def resume_checkpoint(root: Root, name: str) -> tuple[int, str] | None:
    """The newest checkpoint that can be read. One that cannot (truncated by a copy, a full disk, a store
    without atomic uploads) is skipped with a one-line warning: resuming from the one before it costs
    `checkpoint_every` steps, a traceback costs the whole run."""
    from student.checkpoint import CheckpointError

    steps = checkpoint_steps(root.listdir(*train_run(name)))[::-1]
    for step in steps:
        uri = root.uri(*train_run(name, checkpoint_name(step)))
        try:
            _source_config(uri)
        except CheckpointError as err:
            log.warning("train/%s/ckpt-%07d.pt is unreadable, skipped: resuming from an earlier checkpoint (%s)",
                        name, step, str(err).splitlines()[0][:200])
            continue
        return step, uri
    return None


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight: training stops there, keeps its last (finite) checkpoint
    and writes neither model.pt nor the final marker, so no stage ever uses NaN weights as a result."""


def _diverged(root: Root, name: str, step: int, what: str) -> TrainingDiverged:
    kept = latest_checkpoint(root, name)
    last = (f"train/{name}/{checkpoint_name(kept[0])} is the last finite checkpoint" if kept
            else "no checkpoint was written before it")
    return TrainingDiverged(f"training diverged at step {step} ({what}); {last}, no final model was written: "
                            f"lower train.lr_encoder / train.lr_decoder and train under a new name (--name NEW)")


# -- the per-worker loop ------------------------------------------------------------------------

def worker_loop(config: dict) -> None:
    cfg = DadConfig.model_validate(config["cfg"])
    t = cfg.train
    rank, world = 0, 1
    if config.get("ray"):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads", 1))
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.train_seed)
    device = torch.device("cpu")
    if t.gpus_per_worker > 0 and torch.cuda.is_available():
        # Ray Train shows every worker all the GPUs its node gives the group; each takes its own
        # (cuda:local_rank), not cuda:0 — else all workers of a node would share one GPU.
        device = ray.train.torch.get_device() if config.get("ray") else torch.device("cuda")
        torch.cuda.set_device(device)
    root = Root(cfg.run.root)

    model = build_model(cfg)
    unused = freeze_unused(model)  # DDP needs every trainable parameter to get a gradient
    if unused and rank == 0:
        log.info("frozen (used by no forward pass): %s", ", ".join(unused))
    opt = make_optimizer(model, t.lr_encoder, t.lr_decoder, t.weight_decay)
    sched = make_scheduler(opt, t.warmup_steps, t.steps)
    start = 0
    resume = config["resume"]  # chosen by `run`: the newest readable checkpoint
    if resume:
        weights, state = load_checkpoint(resume[1])
        if weights.config.to_dict() != model.config.to_dict():
            raise ValueError(f"checkpoint {resume[1]} is from an incompatible model: it is not the model this "
                             f"config builds; use --name NEW to start a new run")
        start = restore(model, opt, sched, weights, state)
    if rank == 0 and start == 0 and cfg.student.arch == "tflite":
        # the imported teacher as a student checkpoint: `dad run` evaluates it as the student's step 0
        save_checkpoint(model, root.uri(*train_run(t.name, INIT)))
    frozen = frozen_encoder(model).to(device) if t.feature_loss else None
    model.to(device)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False)
    spec = StreamSpec(root, tuple(cfg.teachers), cfg.crops.global_size, t.batch_size, cfg.train_seed, t.flip,
                      t.jitter, cfg.score.policy == "mix")
    selection, shard_rows = read_selection(root, cfg)  # checked by `run` before any worker started
    stream = TargetStream(spec, selection, shard_rows)
    plan = EpochPlan({s: len(r) for s, r in shard_rows.items()}, cfg.train_seed, world, t.batch_size)
    loss_cfg = LossConfig.of(t)
    hooks, close = (Hooks(), None) if rank else _lead_hooks(cfg, root, start, device, config["fingerprint"])

    def one_step(batch: dict) -> dict:
        return train_step(model, batch, opt, sched, loss_cfg, t.grad_clip, frozen, device, t.amp)

    def batches(epoch: int, end: int, skip: int):
        return stream.batches(epoch, rank, world, end, skip, workers=t.prefetch)

    t0 = time.time()
    try:
        progress = fit(model, one_step, plan, batches, Cadence(t.steps, t.log_every, t.checkpoint_every, t.val_every),
                       hooks, opt=opt, sched=sched, start=start, n_teachers=len(cfg.teachers), lead=rank == 0,
                       world=world)
    finally:
        if close:
            close()
    step, seen = progress.steps, progress.samples
    shards_read = {e: stream.shards(e, rank, world) for e in progress.epochs}
    mine = {"rank": rank, "steps": step - start, "samples": seen, "shards": {str(e): s for e, s in shards_read.items()}}
    ranks = [mine]
    if world > 1:
        import torch.distributed as dist

        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if rank == 0:
        root.write_json({"steps": step, "steps_per_epoch": plan.steps(0), "world": world, "resumed_from": start,
                         "rank_steps": [r["steps"] for r in ranks], "ranks": ranks,
                         "seconds": round(time.time() - t0, 2), **label_provenance(cfg, selection, config["teachers"])},
                        *train_run(t.name, SUMMARY))


def _lead_hooks(cfg: DadConfig, root: Root, start: int, device: torch.device, fp: str):
    """Rank 0's hooks: metrics.jsonl / val.jsonl (cut back to `start`), TensorBoard, checkpoints (the newest
    two kept, model.pt at the end), and the one-line divergence error; and the function that closes them."""
    t = cfg.train
    history, val_history = (_truncated_log(root, t.name, f, start) for f in LOGS)
    validator = _validator(cfg, device) if t.val_dataset else None
    writer = _tensorboard(root, t.name)

    def log(record: dict) -> None:
        history.append(record)
        _log(root, t.name, "metrics.jsonl", history, writer, record)

    def validate(step: int, model) -> None:
        record = {"step": step, **validator(model)}
        val_history.append(record)
        _log(root, t.name, "val.jsonl", val_history, writer, record)

    def checkpoint(step: int, model, state: dict) -> None:
        save_checkpoint(model, root.uri(*train_run(t.name, checkpoint_name(step))),
                        extra={**state, "fingerprint": fp})
        _prune_checkpoints(root, t.name)
        if step == t.steps:
            save_checkpoint(model, root.uri(*train_run(t.name, MODEL)))

    hooks = Hooks(log=log, validate=validate if validator else None, checkpoint=checkpoint,
                  diverged=lambda step, why: _diverged(root, t.name, step, why))
    return hooks, (writer.close if writer else None)


def label_provenance(cfg: DadConfig, selection: dict[int, np.ndarray], records: dict[str, dict]) -> dict:
    """Whose labels the student learned from, with their licences: a student inherits the terms of the
    labels it was trained on, so the model card, summary.json and the report carry them."""
    share = np.mean(np.stack(list(selection.values())), axis=0) if selection else np.zeros(len(cfg.teachers))
    teachers = {n: {**records[n], "label_share": round(float(p), 4)} for n, p in zip(cfg.teachers, share)}
    labels = sorted({t["license"] for t in teachers.values() if t["label_share"] > 0})
    start = cfg.student.init_teacher
    weights_from = {"teacher": start, "license": cfg.teachers[start].license} if start else None
    # the student's weights carry its labels' terms and, when it starts from a teacher, that teacher's
    return {"teachers": teachers, "corpus": list(cfg.corpus.sources), "label_licenses": labels,
            "weights_from": weights_from,
            "licenses": sorted(set(labels) | ({weights_from["license"]} if weights_from else set()))}


def _prune_checkpoints(root: Root, name: str) -> None:
    steps = checkpoint_steps(root.listdir(*train_run(name)))
    for old in steps[:-KEEP_CHECKPOINTS]:
        root.remove(*train_run(name, checkpoint_name(old)))


def _tensorboard(root: Root, name: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency, but never fail training on it
        return None
    logdir = root.path(*train_run(name, TENSORBOARD)) if root.is_local else tempfile.mkdtemp(prefix="dad-tb-")
    return SummaryWriter(logdir)


def _truncated_log(root: Root, name: str, file: str, start: int) -> list[dict]:
    """The records of a log up to the step training (re)starts from, rewritten so; [] for a fresh run
    (a crash before the first checkpoint starts the log over)."""
    if not root.exists(*train_run(name, file)):
        return []
    if start == 0:
        root.remove(*train_run(name, file))
        return []
    # a line cut short by a crash mid-append is dropped: it is past the checkpoint anyway
    history = [h for h in root.read_jsonl(*train_run(name, file)) if h["step"] <= start]
    root.write_bytes("".join(json.dumps(h) + "\n" for h in history).encode(), *train_run(name, file))
    return history


def _validator(cfg: DadConfig, device: torch.device):
    """A function model → {val_abs_rel, val_delta1, val_n, val_seconds} on the first `val_samples` images
    of `train.val_dataset`, with the eval stage's alignment and resolution. It saves and restores the
    RNG states and the train/eval mode, so validating changes nothing about the training itself."""
    from pipeline.datasets.eval_sets import open_dataset
    from student.evaluation import evaluate

    t = cfg.train
    dataset = open_dataset(t.val_dataset)  # opened once: a bad path fails at the start, not at step N

    def validate(model) -> dict:
        was_training, rng = model.training, torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        model.eval()
        try:
            def predict_fn(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return model(x.to(device)).float()

            _, summary = evaluate(predict_fn, dataset, align=cfg.eval.align, resolution=cfg.eval.resolution,
                                  max_samples=t.val_samples, device=device,
                                  min_valid_pixels=cfg.eval.min_valid_pixels)
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        return {"val_abs_rel": summary["abs_rel"], "val_delta1": summary["delta1"], "val_n": summary["n"],
                "val_seconds": summary["seconds"]}

    return validate


def _log(root: Root, name: str, file: str, history: list[dict], writer, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if root.is_local:  # append; the file was truncated to the resumed step when training (re)started
        path = root.path(*train_run(name, file))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
    else:  # object stores cannot append: rewrite the whole (small) log
        root.write_bytes("".join(json.dumps(h) + "\n" for h in history).encode(), *train_run(name, file))
    if writer is not None:
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                writer.add_scalar(k.replace("_", "/", 1), v, record["step"])
        writer.flush()
        if not root.is_local:
            root.fs.put(writer.log_dir, root.path(*train_run(name, TENSORBOARD)), recursive=True)


# -- the stage ----------------------------------------------------------------------------------

def run(cfg: DadConfig, address: str | None = None, break_lock: bool = False, lineage: Lineage | None = None) -> dict:
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger, t = Ledger(root), cfg.train
    check_recorded(root, cfg, STAGE)
    lineage = lineage or lineage_for(cfg)
    # Fail early, with the command to run, before any worker starts.
    _, shard_rows = load_selection(root, cfg, lineage)
    EpochPlan({s: len(r) for s, r in shard_rows.items()}, cfg.train_seed, t.workers, t.batch_size).locate(0)
    if t.init_from:
        check_compatible(cfg, t.init_from, "--init-from")
    if resume := resume_checkpoint(root, t.name):
        check_compatible(cfg, resume[1], "checkpoint", f"; train under a new name (--name NEW) or delete train/{t.name}")
    fp = lineage.train
    if ledger.is_done(STAGE, t.name, "final", fp) and (latest_checkpoint(root, t.name) or (0,))[0] >= t.steps:
        return {"stage": STAGE, "name": t.name, "steps": t.steps, "skipped": True, "seconds": 0.0}
    if not use_inline(cfg.run, root.process_local):  # workers no cluster can host would wait forever
        init_ray(cfg.run, address)
        require_resources([worker_request(t)])
    prior = ledger.markers(STAGE, t.name).get("run")
    if prior and fp not in prior and latest_checkpoint(root, t.name):
        raise ValueError(f"train/{t.name} holds checkpoints made with other settings; use --name NEW "
                         f"(or delete train/{t.name}) to train with these")
    with stage_lock(root, STAGE, t.name, break_lock=break_lock, command=f"dad train --name {t.name}"), \
            read_leases(root, "teach", list(cfg.teachers), f"dad train --name {t.name}", break_lock):
        # under read leases on the teachers' caches: `dad teach` cannot rewrite what is verified here
        verify_targets(root, cfg, sorted(shard_rows), lineage)
        ledger.mark(STAGE, t.name, "run", fp, {"started": time.time()})
        payload = {"cfg": with_absolute_paths(cfg).model_dump(mode="json"), "fingerprint": fp, "resume": resume,
                   "teachers": teacher_records(lineage)}
        with _progress_from_log(root, t):
            if use_inline(cfg.run, root.process_local):
                if t.workers > 1:
                    raise ValueError("train.workers > 1 needs Ray (not a memory:// root or the inline executor)")
                worker_loop({**payload, "threads": torch.get_num_threads()})
            else:
                _fit_on_ray(cfg, payload, address)
        summary = root.read_json(*train_run(t.name, SUMMARY))
        ledger.mark(STAGE, t.name, "final", fp, summary)
    return {"stage": STAGE, "name": t.name, "workers": t.workers, **summary, "seconds": round(time.time() - t0, 2)}


@contextlib.contextmanager
def _progress_from_log(root: Root, t):
    """A progress bar (step, loss, throughput) fed by tailing metrics.jsonl: the same for inline and Ray
    workers, whose output does not reach this terminal."""
    from pipeline.runtime import progress

    stop = threading.Event()
    bar = progress(t.steps, f"train {t.name}")
    last: list = [None]

    def poll() -> None:
        try:
            text = root.read_bytes(*train_run(t.name, METRICS_LOG)).decode()
            record = json.loads(text.rstrip().rsplit("\n", 1)[-1])
        except Exception:  # noqa: BLE001 - no log yet, or a line being written: try again later
            return
        if record != last[0]:
            last[0] = record
            bar.update(0, completed=record["step"], description=(
                f"train {t.name} loss {record['loss_total']:.4f} {record['samples_per_s']:.1f} samples/s"))

    def watch():
        while not stop.wait(1.0 if root.is_local else 5.0):
            poll()

    thread = threading.Thread(target=watch, daemon=True, name="dad-train-progress")
    with bar:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)
            poll()


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
        run_config=RunConfig(name=f"dad-{t.name}-{fingerprint([cfg.run.root, payload['fingerprint']])}",
                             storage_path=os.path.join(tempfile.gettempdir(), "dad-ray-train")))
    try:
        trainer.fit()
    except Exception as err:
        raise RuntimeError(f"training failed: {cause_line(err)}") from err


def status(cfg: DadConfig, root: Root, lineage: Lineage | None = None) -> list[dict]:
    t, lineage = cfg.train, lineage or lineage_for(cfg)
    latest = latest_checkpoint(root, t.name)
    done = latest[0] if latest else 0
    try:
        fp = lineage.train
    except (FileNotFoundError, ValueError):
        return []
    final = Ledger(root).is_done(STAGE, t.name, "final", fp)
    note = "complete" if final and done >= t.steps else (f"resumable from step {done}" if done else "not started")
    if not final and (why := lineage.why_stale(root, STAGE, t.name)):
        note += f"; stale: {why}"
    return [{"stage": STAGE, "scope": t.name, "done": done, "total": t.steps, "stale": 0, "note": note}]
