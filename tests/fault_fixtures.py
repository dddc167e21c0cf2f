"""Fault-injection helpers (issue #9), shared by tests/test_faults.py, test_security.py, test_s3.py and
bench/faults.py.

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
* `bad_corpus` — a folder (+ tars) with ≥ 12 kinds of bad corpus files and what must happen to each.
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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

STAGES = ("shard", "teach", "score", "train")
STAGE_CELLS = {  # where a stage's per-cell progress shows (a file appearing there = one cell done)
    "shard": ("ledger", "shard", "_"),
    "teach": ("ledger", "teach"),
    "score": ("ledger", "score", "metrics"),
    "train": ("train", "student"),
}
TMP_MARKERS = (".tmp-", ".partial")  # temporary names of atomic writes (a SIGKILL can leave them behind)


# -- the run used by the fault tests --------------------------------------------------------------

def fault_raw(root, sources, shard_size: int = 2, steps: int = 4, executor: str = "inline", **extra) -> dict:
    """A tiny run: 64² ramps, crops 56/42/56/28, two pixel teachers, a tiny student, few steps."""
    from train_fixtures import raw_config

    raw = raw_config(root, sources, shard_size=shard_size, executor=executor,
                     train={"steps": steps, "checkpoint_every": 1, "log_every": 1, "prefetch": 0})
    for sec, vals in extra.items():
        raw.setdefault(sec, {}).update(vals)
    return raw


def with_root(raw: dict, root) -> dict:
    out = json.loads(json.dumps(raw))
    out["run"]["root"] = str(root)
    return out


def write_sources(folder: Path, n: int = 6, size=(64, 64)) -> Path:
    from teach_fixtures import write_ramps

    return write_ramps(Path(folder), n, sizes=(size,))


# -- forked stage runs ------------------------------------------------------------------------------

# Imported once in the forkserver (nothing is *run* there: no zarr event loop, no torch threads), so a
# forked child starts with every stage loaded.
PRELOAD = ["fault_fixtures", "train_fixtures", "stages.shard", "stages.teach", "stages.score", "stages.train",
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
    try:
        return json.loads(Path(result).read_text())
    except FileNotFoundError:
        return {"ok": False, "error": "no result (the child died)"}


def read_log(result: Path) -> str:
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
    return hashlib.sha256(data).hexdigest()


def _table_digest(root, *parts: str) -> str:
    return _digest(json.dumps(root.read_table(*parts).to_pylist(), sort_keys=True, default=str).encode())


@dataclass
class Outputs:
    digests: dict[str, str] = field(default_factory=dict)   # output name → digest of its content
    units: list[str] = field(default_factory=list)          # sample units produced (with repeats)
    stray: list[str] = field(default_factory=list)          # temporary files a kill left behind


def stray_files(path: Path) -> list[str]:
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
        from stages.teach import cell_fingerprint
        from stages.teachers import spec_for

        for name, tcfg in cfg.teachers.items():
            fp = cell_fingerprint(cfg, spec_for(name, tcfg).fingerprint)
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
            from train_fixtures import weights

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
    lost: int
    duplicated: int
    differing: list[str]
    stray: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.differing


def compare(clean: Outputs, got: Outputs) -> Comparison:
    from collections import Counter

    want, have = Counter(clean.units), Counter(got.units)
    lost = sum((want - have).values())
    duplicated = sum((have - want).values())
    keys = set(clean.digests) | set(got.digests)
    differing = sorted(k for k in keys if clean.digests.get(k) != got.digests.get(k))
    return Comparison(lost, duplicated, differing, got.stray)


# -- one kill trial ---------------------------------------------------------------------------------

def cells_done(root: Path, stage: str) -> int:
    base = Path(root).joinpath(*STAGE_CELLS[stage])
    if not base.exists():
        return 0
    return sum(1 for p in base.rglob("*") if p.is_file() and not any(m in p.name for m in TMP_MARKERS))


@dataclass
class Trial:
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


# -- bad corpus files ---------------------------------------------------------------------------------

def _png(arr_or_img) -> bytes:
    from PIL import Image

    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, *rest in members:
            info = tarfile.TarInfo(name)
            info.type = rest[0] if rest else tarfile.REGTYPE
            info.linkname = rest[1] if len(rest) > 1 else ""
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


@dataclass
class BadFile:
    kind: str          # what is wrong with it
    uri: str           # how it appears in manifest/rejects (folder path, or tar#member)
    expect: str        # "reject" | "sample"
    reason: str = ""   # for rejects: the reason must start with this


def bad_corpus(folder: Path) -> tuple[Path, list[BadFile]]:
    """A corpus folder with every kind of bad input we know of, and what must become of each."""
    from conftest import exif_jpeg, image_array, image_bytes, png_bomb
    from PIL import Image

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    files: list[BadFile] = []

    def put(name: str, data: bytes, kind: str, expect: str, reason: str = "") -> None:
        (d / name).write_bytes(data)
        files.append(BadFile(kind, str(d / name), expect, reason))

    good = image_bytes(96, 72, "jpeg", seed=901)
    put("good.jpg", good, "a good image", "sample")
    put("truncated.jpg", image_bytes(300, 200, "jpeg", seed=902)[:2500], "truncated JPEG", "reject",
        "truncated or corrupt image data")
    put("truncated.png", image_bytes(120, 90, "png", seed=903)[:400], "truncated PNG", "reject",
        "truncated or corrupt image data")
    put("zero.png", b"", "zero bytes", "reject", "zero bytes")
    put("text.jpg", b"<html>not an image</html>\n" * 20, "not an image", "reject", "not an image")
    put("bomb.png", png_bomb(), "decompression bomb (20000² 1-bit PNG)", "reject", "too many pixels")
    buf = io.BytesIO()
    Image.fromarray(image_array(80, 64, seed=904)).convert("CMYK").save(buf, format="JPEG", quality=95)
    put("cmyk.jpg", buf.getvalue(), "CMYK JPEG", "sample")
    put("gray16.png", _png(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))),
        "16-bit grayscale PNG", "sample")
    put("gray.png", _png(image_array(70, 50, seed=905)[..., 1]), "8-bit grayscale", "sample")
    halves = np.zeros((64, 96, 3), np.uint8)
    halves[:, 48:] = 255
    put("exif6.jpg", exif_jpeg(halves, 6), "EXIF-rotated (orientation 6)", "sample")
    bad_exif = bytearray(exif_jpeg(halves + 1, 3))
    i = bad_exif.find(b"Exif\x00\x00")
    bad_exif[i + 10:i + 14] = b"\xff\xff\xff\x7f"  # the EXIF IFD offset points past the end
    put("badexif.jpg", bytes(bad_exif), "garbled EXIF block", "sample")
    put("one.png", _png(np.full((1, 1, 3), 7, np.uint8)), "1×1 image", "reject", "too small")
    put("aspect.png", _png(np.full((40, 400, 3), 90, np.uint8)), "extreme aspect ratio (10:1)", "reject",
        "extreme aspect ratio")
    pal = Image.fromarray(image_array(64, 64, seed=906)).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    put("palette.png", _png(pal), "palette PNG with transparency", "sample")
    float_tif = io.BytesIO()
    Image.fromarray(np.linspace(-5, 9, 64 * 64, dtype=np.float32).reshape(64, 64)).save(float_tif, format="TIFF")
    put("float.tif", float_tif.getvalue(), "32-bit float TIFF", "sample")
    put("png_named.jpg", image_bytes(64, 64, "png", seed=907), "PNG bytes with a .jpg name", "sample")
    put("z_dup.jpg", good, "duplicate of good.jpg", "reject", "duplicate of")
    put("odd name #1 é.jpg", image_bytes(64, 64, "jpeg", seed=908), "file name with '#', spaces, non-ASCII",
        "sample")
    put("notes.txt", b"a text file", "not an image extension", "reject", "not an image extension")
    header_bomb = bytearray(_png(np.zeros((64, 64, 3), np.uint8)))
    header_bomb[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR says 200000²
    header_bomb[29:33] = zlib.crc32(bytes(header_bomb[12:29])).to_bytes(4, "big")
    put("header_bomb.png", bytes(header_bomb), "PNG header claiming 200000² px (small file)", "reject",
        "too many pixels")

    # tars: hostile members, a corrupt tar, a truncated tar
    t_ok = image_bytes(64, 64, "jpeg", seed=910)
    tar = d / "members.tar"
    tar.write_bytes(_tar([("ok.jpg", t_ok), ("../escape.jpg", image_bytes(64, 64, "jpeg", seed=911)),
                          ("/abs/path.jpg", image_bytes(64, 64, "jpeg", seed=912)),
                          ("sym.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
                          ("hard.jpg", b"", tarfile.LNKTYPE, "ok.jpg"),
                          ("dev.jpg", b"", tarfile.CHRTYPE),
                          ("z_dupe.jpg", t_ok)]))
    files += [BadFile("tar member (good)", f"{tar}#ok.jpg", "sample"),
              BadFile("tar member with ../", f"{tar}#../escape.jpg", "reject", "tar member escapes its folder"),
              BadFile("tar member with an absolute path", f"{tar}#/abs/path.jpg", "reject",
                      "tar member has an absolute path"),
              BadFile("tar symlink member", f"{tar}#sym.jpg", "reject", "tar member is a link"),
              BadFile("tar hard-link member", f"{tar}#hard.jpg", "reject", "tar member is a link"),
              BadFile("tar device member", f"{tar}#dev.jpg", "reject", "tar member is not a regular file"),
              BadFile("tar member duplicating another", f"{tar}#z_dupe.jpg", "reject", "duplicate of")]
    (d / "corrupt.tar").write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files.append(BadFile("corrupt tar", str(d / "corrupt.tar"), "reject", "corrupt tar"))
    t1 = image_bytes(64, 64, "jpeg", seed=913)
    whole = _tar([("t1.jpg", t1), ("t2.png", image_bytes(200, 200, "png", seed=914))])
    t2_data = 512 + -(-len(t1) // 512) * 512 + 512  # t1's header and padded data, t2's header
    (d / "truncated.tar").write_bytes(whole[:t2_data + 700])  # t2's data cut short
    files += [BadFile("member before a tar's truncation", f"{d / 'truncated.tar'}#t1.jpg", "sample"),
              BadFile("truncated tar", str(d / "truncated.tar"), "reject", "corrupt tar")]
    return d, files


def corrupt_bytes(path: Path, offset_fraction: float = 0.5, count: int = 8) -> None:
    """Flip `count` bytes in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(Path(path).read_bytes())
    i = int(len(data) * offset_fraction)
    for j in range(i, min(i + count, len(data))):
        data[j] ^= 0x5A
    Path(path).write_bytes(bytes(data))


# -- dead workers ---------------------------------------------------------------------------------------

REGISTRY = "dad-fault-registry"


class RegisteringTeacher:
    """`adapter = "fault_fixtures:RegisteringTeacher"`, `model = "r+2g@0.4"`: the slow pixel teacher that,
    when built inside a Ray actor, hands its actor handle to the named actor `dad-fault-registry` (so a
    test can `ray.kill` it). Its spec (fingerprint) is the plain r+2g function's: results compare 1:1."""

    def __new__(cls, name, tcfg):
        from teach_fixtures import SlowPixelTeacher

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
        from teach_fixtures import SlowPixelTeacher

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


# -- object storage ---------------------------------------------------------------------------------------

S3_CREDS = {"AWS_ACCESS_KEY_ID": "AKIAS3FAULTSUITE01", "AWS_SECRET_ACCESS_KEY": "S3/FaultSuite+SecretKey/0042",
            "AWS_SESSION_TOKEN": "FwoS3FaultSuiteSessionToken"}


@contextlib.contextmanager
def moto_s3(bucket: str = "dad-faults"):
    """moto's S3 server on a free 127.0.0.1 port, the AWS environment pointing at it (restored after),
    and `bucket` created. Yields an s3fs filesystem. s3fs takes the endpoint from AWS_ENDPOINT_URL."""
    import logging
    import socket

    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_CREDS, "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir(bucket)
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def write_evalset(folder: Path, n: int = 2) -> str:
    """A tiny `folder:` evaluation set (28×42 RGB + depth .npy); returns its spec."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = np.random.default_rng(i).integers(0, 255, (28, 42, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.png")
        np.save(folder / f"{i}.npy", np.linspace(1, 3, 28 * 42, dtype=np.float32).reshape(28, 42))
    return f"folder:{folder}"


def run_pipeline(raw: dict, dataset: str) -> dict:
    """shard → teach → score → train → eval (checkpoint model.pt, eval name 'student'), in this process."""
    import stages.evaluate
    import stages.score
    import stages.shard
    import stages.teach
    import stages.train
    from pipeline.config import load_config

    cfg = load_config(raw=raw)
    out = {name: getattr(stages, name).run(cfg) for name in STAGES}
    ckpt = f"{cfg.run.root}/train/{cfg.train.name}/model.pt"
    out["eval"] = stages.evaluate.run(cfg, checkpoint=ckpt, datasets=[dataset], name="student")
    return out


def eval_metrics(root) -> dict:
    """eval/student/metrics.json without what may differ between roots (timings, the checkpoint URL)."""
    m = json.loads(root.read_bytes("eval", "student", "metrics.json"))
    m.pop("seconds", None)
    m["model"] = None
    for d in m["datasets"].values():
        d.pop("seconds", None)
    return m


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_port_args(index: int) -> list[str]:
    """`ray start` options giving a node its own ports. Two nodes on one host started together otherwise
    race for the same default ports (a worker raylet died with 'bind: Address already in use') — and
    other clusters on this shared machine hold the defaults too."""
    agent, grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(6)
    lo = 20000 + 1000 * index
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 999}"]


def start_cluster(cluster, workers: int = 2) -> None:
    """tests/test_cluster.py's `Cluster.up`, with distinct ports per node and workers started one by one."""
    import json as _json

    cluster.start("--head", f"--port={cluster.port}", "--num-cpus=1", f"--temp-dir={cluster.temp}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dash}",
                  "--disable-usage-stats", *node_port_args(0))
    cluster.wait_nodes(1)
    for i in range(workers):
        cluster.start(f"--address=127.0.0.1:{cluster.port}", "--num-cpus=1",
                      f"--resources={_json.dumps({'teacher_slot': 1, f'worker_{i}': 1})}", *node_port_args(i + 1))
        cluster.wait_nodes(2 + i)
