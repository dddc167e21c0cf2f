"""Fault-injection machinery (issue #9), shared by tests/test_faults.py and bench/faults.py.

* `Zygote` — a multiprocessing *forkserver* that has imported the stages once; each stage run is a
  forked child that starts in milliseconds (a fresh `dad` process costs ~30 s of imports on a busy
  2-core machine). The child is the driver: SIGKILL it and the stage dies exactly where it was, in
  the middle of a tar, a Zarr shard, a parquet part or a checkpoint. Runs use the inline executor so
  that the whole stage is that one process (killing Ray-based drivers is covered by test_ledger.py
  for shard and test_teach.py for teach).
* `stage_child` — the child's entry point: runs `stages.<stage>.run`, records the summary or the error,
  and can slow down the stage's marker writes (`delay_marks`) so that a kill lands mid-stage.
* `Outputs` of a stage — every output it promises to reproduce as name → digest, plus the sample
  units it accounts for (`units`): compared with an uninterrupted run they give samples lost,
  samples duplicated and outputs differing.
* `kill_trial` — copy a prepared root, run the stage, SIGKILL it at a moment, rerun it to completion,
  and compare with the clean outputs.
* `RegisteringTeacher`, `make_registry` — a teach actor that hands its handle over, to be `ray.kill`ed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("shard", "teach", "score", "train")
STAGE_CELLS = {  # where a stage's per-cell progress shows (a file appearing there = one cell done)
    "shard": ("ledger", "shard", "_"),
    "teach": ("ledger", "teach"),
    "score": ("ledger", "score", "metrics"),
    "train": ("train", "student"),
}
TMP_MARKERS = (".tmp-", ".partial")  # temporary names of atomic writes (a SIGKILL can leave them behind)


# -- the run used by the fault tests (configs' "fault" preset) -----------------------------------------

def with_root(raw: dict, root) -> dict:
    """A deep copy of `raw` with another run root: the same run on a copied root."""
    out = json.loads(json.dumps(raw))
    out["run"]["root"] = str(root)
    return out


# -- forked stage runs ------------------------------------------------------------------------------

# Imported once in the forkserver (nothing is *run* there: no zarr event loop, no torch threads), so a
# forked child starts with every stage loaded.
PRELOAD = ["bench.kit.faults", "bench.kit.train", "stages.shard", "stages.teach", "stages.score", "stages.train",
           "student.checkpoint", "student.model", "student.trainer", "pipeline.plots", "pipeline.cli", "timm"]


def stage_child(stage: str, raw: dict, result: str, kwargs: dict | None = None, delay_marks: float = 0.0,
                cli: list[str] | None = None) -> None:
    """Child entry: run one stage (or the CLI with `cli` args) and write {ok, summary|error} to `result`."""
    import logging

    log_path = result + ".log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr, force=True)
    out: dict = {"pid": os.getpid()}
    try:
        if delay_marks:
            from pipeline.ledger import Ledger

            real = Ledger.mark

            def slow_mark(self, *args, **kw):
                time.sleep(delay_marks)
                return real(self, *args, **kw)

            Ledger.mark = slow_mark
        if cli is not None:
            from pipeline.cli import app

            try:
                code = app(cli, standalone_mode=False)  # click returns typer.Exit's code here
                out.update(ok=code in (0, None), code=code or 0)
            except SystemExit as e:
                out.update(ok=e.code in (0, None), code=e.code)
            except Exception as e:  # noqa: BLE001
                code = getattr(e, "exit_code", None)
                out.update(ok=code == 0, code=code, error=f"{type(e).__name__}: {e}")
        else:
            import importlib

            from pipeline.config import load_config

            mod = importlib.import_module(f"stages.{stage}")
            out.update(ok=True, summary=mod.run(load_config(raw=raw), **(kwargs or {})))
    except BaseException as e:  # noqa: BLE001 - recorded for the parent
        out.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    Path(result + ".part").write_text(json.dumps(out, default=str))
    os.replace(result + ".part", result)


class Zygote:
    """A forkserver with the stages imported; `start(...)` forks a stage run from it."""

    def __init__(self):
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self._n = 0

    def start(self, workdir: Path, stage: str, raw: dict, **kw) -> tuple[mp.Process, Path]:
        self._n += 1
        result = Path(workdir) / f"child-{os.getpid()}-{self._n}.json"
        with contextlib.suppress(FileNotFoundError):
            result.unlink()
        p = self.ctx.Process(target=stage_child, args=(stage, raw, str(result)), kwargs=kw, daemon=True)
        p.start()
        return p, result

    def run(self, workdir: Path, stage: str, raw: dict, timeout: float = 600, **kw) -> dict:
        """Run to completion; returns the child's record (+ 'log', 'seconds')."""
        t0 = time.time()
        p, result = self.start(workdir, stage, raw, **kw)
        p.join(timeout)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            raise TimeoutError(f"{stage} did not finish in {timeout} s: {read_log(result)[-3000:]}")
        return {**read_result(result), "seconds": time.time() - t0, "log": read_log(result)}


def read_result(result: Path) -> dict:
    """The child's record; a child killed before writing it reads as failed."""
    try:
        return json.loads(Path(result).read_text())
    except FileNotFoundError:
        return {"ok": False, "error": "no result (the child died)"}


def read_log(result: Path) -> str:
    """What the child printed and logged (its stdout and stderr go to one file)."""
    try:
        return Path(str(result) + ".log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


_ZYGOTE: Zygote | None = None


def zygote() -> Zygote:
    """One forkserver per process (its start costs the imports once)."""
    global _ZYGOTE
    if _ZYGOTE is None:
        _ZYGOTE = Zygote()
    return _ZYGOTE


# -- what a stage outputs, and how two runs compare ------------------------------------------------

def _digest(data: bytes) -> str:
    """sha256 hex: outputs compare by content."""
    return hashlib.sha256(data).hexdigest()


def _table_digest(root, *parts: str) -> str:
    """Digest of a parquet table's rows, not its bytes (parquet metadata may differ between writers)."""
    return _digest(json.dumps(root.read_table(*parts).to_pylist(), sort_keys=True, default=str).encode())


@dataclass
class Outputs:
    """What one run of a stage left: compared with an uninterrupted run's by `compare`."""

    digests: dict[str, str] = field(default_factory=dict)   # output name → digest of its content
    units: list[str] = field(default_factory=list)          # sample units produced (with repeats)
    stray: list[str] = field(default_factory=list)          # temporary files a kill left behind


def stray_files(path: Path) -> list[str]:
    """Temporary files of atomic writes under path: a kill may leave them, a rerun must not mind."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and any(m in p.name for m in TMP_MARKERS))


def outputs(raw: dict, stage: str) -> Outputs:
    """Every output `stage` promises to reproduce under raw's root, as digests, plus its sample units."""
    from pipeline.config import load_config
    from pipeline.storage import Root

    cfg = load_config(raw=raw)
    root = Root(cfg.run.root)
    out = Outputs(stray=stray_files(Path(cfg.run.root)) if root.is_local else [])
    if stage == "shard":
        for name in root.listdir("corpus", "shards"):
            if name.endswith(".tar"):
                data = root.read_bytes("corpus", "shards", name)
                out.digests[f"corpus/shards/{name}"] = _digest(data)
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    out.units += [m.name[:-5] for m in tar.getmembers() if m.name.endswith(".json")]
        for parts in (("corpus", "manifest.parquet"), ("corpus", "rejects.parquet"), ("crops", "plan.parquet"),
                      ("corpus", "listing.parquet")):
            out.digests["/".join(parts)] = _digest(root.read_bytes(*parts)) if root.exists(*parts) else "missing"
        if root.exists("corpus", "manifest.parquet"):
            out.digests["manifest.sample_ids"] = _digest(
                "\n".join(root.read_table("corpus", "manifest.parquet").column("sample_id").to_pylist()).encode())
    elif stage == "teach":
        from pipeline.cache import ARRAYS, open_cache
        from stages.teachers import lineage_for

        lineage = lineage_for(cfg)
        for name in cfg.teachers:
            fp = lineage.teach(name)
            group = open_cache(root, name)
            arrays = {a: group[a][...] for a in ARRAYS}
            for a, arr in arrays.items():
                out.digests[f"cache/{name}/{a}"] = _digest(np.ascontiguousarray(arr).tobytes())
            filled = np.flatnonzero(arrays["global_valid"].reshape(len(arrays["global_valid"]), -1).any(axis=1))
            out.units += [f"{name}:{r}" for r in filled]
            cells = sorted(n for n in root.listdir("ledger", "teach", name)  # temp files: counted as `stray`
                           if not any(m in n for m in TMP_MARKERS))
            out.digests[f"ledger/teach/{name}"] = _digest("\n".join(cells).encode())
            for cell in cells:
                if cell.endswith(f".{fp}.json"):
                    objects = root.read_json("ledger", "teach", name, cell).get("objects")
                    out.digests[f"ledger/teach/{name}/{cell}:objects"] = _digest(json.dumps(objects, sort_keys=True).encode())
    elif stage == "score":
        for parts in (("scores", "scores.parquet"), ("scores", "selection.parquet")):
            out.digests["/".join(parts)] = _table_digest(root, *parts) if root.exists(*parts) else "missing"
        out.digests["scores/selection_summary.json"] = (
            _digest(root.read_bytes("scores", "selection_summary.json")) if root.exists("scores", "selection_summary.json")
            else "missing")
        if root.exists("scores", "scores.parquet"):
            rows = root.read_table("scores", "scores.parquet", columns=["sample_id", "teacher"]).to_pylist()
            out.units += [f"{r['teacher']}:{r['sample_id']}" for r in rows]
    elif stage == "train":
        name = cfg.train.name
        if root.exists("train", name, "model.pt"):
            from bench.kit.train import weights

            for k, v in weights(root.uri("train", name, "model.pt")).items():
                out.digests[f"model.pt:{k}"] = _digest(v.numpy().tobytes())
        else:
            out.digests["model.pt"] = "missing"
        ckpts = sorted(n for n in root.listdir("train", name) if n.startswith("ckpt-") and n.endswith(".pt"))
        out.digests["train/checkpoints"] = _digest("\n".join(ckpts).encode())
        history = []
        if root.exists("train", name, "metrics.jsonl"):
            history = [json.loads(x) for x in root.read_bytes("train", name, "metrics.jsonl").decode().splitlines() if x]
        out.units += [f"step:{h['step']}" for h in history]
        losses = [{k: v for k, v in h.items() if k not in ("samples_per_s",)} for h in history]
        out.digests["train/metrics.jsonl (losses)"] = _digest(json.dumps(losses, sort_keys=True).encode())
        summary = root.read_json("train", name, "summary.json") if root.exists("train", name, "summary.json") else {}
        out.digests["train/summary.json:steps"] = str(summary.get("steps"))
    else:
        raise ValueError(stage)
    return out


@dataclass
class Comparison:
    """Samples lost or duplicated and outputs differing between two runs (and the kill's stray files)."""

    lost: int
    duplicated: int
    differing: list[str]
    stray: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.differing


def compare(clean: Outputs, got: Outputs) -> Comparison:
    """How `got` differs from the uninterrupted run `clean`: units counted with repeats, digests by name."""
    from collections import Counter

    want, have = Counter(clean.units), Counter(got.units)
    lost = sum((want - have).values())
    duplicated = sum((have - want).values())
    keys = set(clean.digests) | set(got.digests)
    differing = sorted(k for k in keys if clean.digests.get(k) != got.digests.get(k))
    return Comparison(lost, duplicated, differing, got.stray)


# -- one kill trial ---------------------------------------------------------------------------------

def cells_done(root: Path, stage: str) -> int:
    """How many cells of `stage` are done under root (finished files where its progress shows)."""
    base = Path(root).joinpath(*STAGE_CELLS[stage])
    if not base.exists():
        return 0
    return sum(1 for p in base.rglob("*") if p.is_file() and not any(m in p.name for m in TMP_MARKERS))


@dataclass
class Trial:
    """One kill trial: where the kill landed, whether the rerun finished, and how it compares."""

    stage: str
    kill_after: float | None          # seconds after start, or None: "when the first cell is done"
    killed_running: bool              # the stage was still running when SIGKILL arrived
    cells_at_kill: int
    rerun_ok: bool
    rerun_error: str | None
    comparison: Comparison | None


def kill_trial(z: Zygote, stage: str, base: Path, trial: Path, raw: dict, clean: Outputs,
               kill_after: float | None = None, delay_marks: float = 0.0, timeout: float = 600) -> Trial:
    """Copy `base` (a root with the stages before `stage` done) to `trial`, start `stage`, SIGKILL it
    `kill_after` s later (None: right after its first cell is done), rerun it, compare with `clean`."""
    if trial.exists():
        shutil.rmtree(trial)
    shutil.copytree(base, trial)
    raw = with_root(raw, trial)
    work = trial.parent
    p, result = z.start(work, stage, raw, delay_marks=delay_marks)
    t0 = time.time()
    if kill_after is None:
        while cells_done(trial, stage) == 0 and p.is_alive() and time.time() - t0 < timeout:
            time.sleep(0.002)
    else:
        p.join(kill_after)
    running = p.is_alive()
    if running:
        os.kill(p.pid, signal.SIGKILL)
    p.join(timeout)
    at_kill = cells_done(trial, stage)
    if not running and not read_result(result).get("ok", False):
        raise RuntimeError(f"{stage} failed before the kill: {read_result(result)} {read_log(result)[-3000:]}")
    rerun = z.run(work, stage, raw, timeout=timeout)
    comparison = compare(clean, outputs(raw, stage)) if rerun.get("ok") else None
    return Trial(stage, kill_after, running, at_kill, bool(rerun.get("ok")),
                 None if rerun.get("ok") else f"{rerun.get('error')}\n{rerun.get('log', '')[-3000:]}", comparison)


@dataclass
class Bases:
    """Roots prepared once for the kill trials: one per stage, with the stages before it done."""

    before: dict[str, Path]      # stage → a root with every stage before it done
    done: Path                   # the uninterrupted run every trial is compared with
    seconds: dict[str, float]    # stage → wall-clock of its clean run (a forked child)


def prepare_bases(z: Zygote, work: Path, raw: dict, stages: tuple[str, ...] = STAGES) -> Bases:
    """Run `stages` once, cleanly, each in a forked child, keeping a copy of the root before each."""
    work.mkdir(parents=True, exist_ok=True)
    before, seconds = {}, {}
    current = work / f"base-{stages[0]}"
    if current.exists():
        shutil.rmtree(current)
    current.mkdir()
    for i, stage in enumerate(stages):
        before[stage] = current
        nxt = work / (f"base-{stages[i + 1]}" if i + 1 < len(stages) else "done")
        if nxt.exists():
            shutil.rmtree(nxt)
        shutil.copytree(current, nxt)
        res = z.run(work, stage, with_root(raw, nxt))
        if not res.get("ok"):
            raise RuntimeError(f"clean {stage} failed: {res.get('error')}\n{res.get('log', '')[-3000:]}")
        seconds[stage] = res["seconds"]
        current = nxt
    return Bases(before, current, seconds)


# -- dead workers ---------------------------------------------------------------------------------------

REGISTRY = "dad-fault-registry"


class RegisteringTeacher:
    """`adapter = "bench.kit.faults:RegisteringTeacher"`, `model = "r+2g@0.4"`: the slow pixel teacher that,
    when built inside a Ray actor, hands its actor handle to the named actor `dad-fault-registry` (so a
    test can `ray.kill` it). Its spec (fingerprint) is the plain r+2g function's: results compare 1:1."""

    def __new__(cls, name, tcfg):
        from bench.kit.teach import SlowPixelTeacher

        teacher = SlowPixelTeacher(name, tcfg)
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                if ctx.get_actor_id():
                    registry = ray.get_actor(REGISTRY)
                    ray.get(registry.add.remote(ctx.current_actor, os.getpid()))
        except ValueError:  # no registry: a plain run
            pass
        return teacher

    @classmethod
    def describe(cls, name, tcfg):
        from bench.kit.teach import SlowPixelTeacher

        return SlowPixelTeacher.describe(name, tcfg)


def make_registry():
    """The named actor that collects teach actors' handles (0 CPUs: it never competes with them)."""
    import ray

    @ray.remote(num_cpus=0)
    class Registry:
        def __init__(self):
            self.handles = []

        def add(self, handle, pid):
            self.handles.append((handle, pid))

        def get(self):
            return self.handles

    return Registry.options(name=REGISTRY).remote()
