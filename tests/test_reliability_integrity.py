"""Reliability, round two (issue #19): the integrity of what stages read.

* item 3 — corpus shards, parts, manifest and cache metadata are checked against what their markers
  recorded before a stage reads them, by `teach --verify` and `dad status`; every reported damage names
  a command that repairs it, and the repair restores exactly the recorded bytes.
* item 10 — sources changed since `dad shard` (added, removed, modified) are reported by `dad status`
  and refused by `dad shard`, which says what a rerun would add, drop or re-read.
* item 4 — `dad teach` refuses to rewrite a cache that a running `dad train` reads (read lease), and
  `dad train` refuses to start while `dad teach` writes it; a dead reader's lease does not block.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from teach_fixtures import tree_hashes
from typer.testing import CliRunner

from bench.kit.configs import dad_config
from bench.kit.images import write_ramps
from bench.kit.teach import cache_arrays
from pipeline.cache import CacheCorruptError, require_intact_metadata
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.corpus import ShardCorruptError, verify_corpus
from pipeline.images import decode_trusted
from pipeline.ledger import Ledger, LockError, stage_lock
from pipeline.lineage import Lineage
from pipeline.storage import Root
from stages import score, shard, teach, train
from stages.teachers import lineage_for

pytestmark = pytest.mark.timeout(300)


def _jpeg_run(folder: Path, n: int = 6, **raw):
    """6 ramps → 3 shards of 2 with JPEG regions (no checksum inside), taught and scored inline."""
    src = write_ramps(folder / "src", n, sizes=((96, 72),))
    cfg = dad_config(folder / "root", src, shard_size=2, corpus={"image_format": "jpeg"}, **raw)
    shard.run(cfg)
    teach.run(cfg)
    score.run(cfg)
    return cfg, Root(cfg.run.root), src


def _flip_inside_a_jpeg(tar_path: Path) -> None:
    """Flip one byte in the entropy-coded data of the first JPEG member: same size, still decodes."""
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
    start = member.offset_data
    original = bytes(data[start:start + member.size])
    i = start + member.size // 2
    while data[i] in (0xFF, 0xFE) or data[i - 1] == 0xFF:
        i += 1
    data[i] ^= 0x01
    altered = bytes(data[start:start + member.size])
    assert not np.array_equal(decode_trusted(altered), decode_trusted(original))  # plausible wrong pixels
    tar_path.write_bytes(bytes(data))


def _status_note(cfg_file: Path, stage: str, scope: str) -> str:
    res = CliRunner().invoke(app, ["status", "-c", str(cfg_file)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if f" {stage} " in ln and f" {scope} " in ln)
    return [c.strip() for c in line.strip("│┃ ").split("│")][5]


# -- item 3: integrity of the corpus and the cache metadata ------------------------------------------------

def test_flipped_jpeg_bytes_in_a_shard_are_never_read_and_dad_shard_verify_restores_them(tmp_path):
    cfg, root, _ = _jpeg_run(tmp_path)
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(cfg.to_toml())
    tar = Path(root.path("corpus", "shards", "000001.tar"))
    good = tar.read_bytes()
    _flip_inside_a_jpeg(tar)

    # what only a digest can see: same size, a valid tar of valid JPEGs
    assert verify_corpus(root, Lineage(cfg).shard) == [] and _status_note(cfg_file, "shard", "corpus") == "complete"
    assert [w.split(":")[0] for w in verify_corpus(root, Lineage(cfg).shard, deep=True)] == ["corpus/shards/000001.tar"]
    # teach --verify, a newly added teacher, training: all refuse before reading a pixel of it
    with pytest.raises(ShardCorruptError, match=r"corpus/shards/000001\.tar: \d+ bytes, sha256.*dad shard --verify"):
        teach.run(cfg, verify=True)
    more = load_config(raw={**cfg.model_dump(mode="json"), "teachers": {
        **cfg.model_dump(mode="json")["teachers"], "const": {"adapter": "pixel", "model": "constant"}}})
    # the worker hashes the tar before it uses a sample (its error reaches the driver wrapped, naming the teacher)
    with pytest.raises((ShardCorruptError, RuntimeError), match=r"corpus/shards/000001\.tar: \d+ bytes, sha256"):
        teach.run(more, teachers=["const"])
    assert "000001" not in {c for c in Ledger(root).markers("teach", "const")}
    with pytest.raises(ShardCorruptError, match=r"000001\.tar.*restore it with `dad shard --verify`"):
        train.run(cfg)
    assert not root.exists("train")
    res = CliRunner().invoke(app, ["train", "-c", str(cfg_file)])
    assert res.exit_code == 2 and "dad shard --verify" in " ".join(res.output.split()), res.output

    # plain `dad shard` compares sizes (fine here); --verify finds the flip and rebuilds the recorded bytes
    assert shard.run(cfg)["written"] == 0
    res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file), "--verify"])
    assert res.exit_code == 0, res.output
    assert tar.read_bytes() == good
    assert verify_corpus(root, Lineage(cfg).shard, deep=True) == []
    assert teach.run(cfg, verify=True)["recomputed"] == 0
    train.verify_targets(root, cfg, [0, 1, 2], lineage_for(cfg))

    # a truncated shard: `dad status` sees it by size, plain `dad shard` rebuilds it
    other = Path(root.path("corpus", "shards", "000002.tar"))
    other.write_bytes(other.read_bytes()[:-512])
    assert "differ from their markers" in _status_note(cfg_file, "shard", "corpus")
    assert "dad shard --verify" in _status_note(cfg_file, "shard", "corpus")
    assert shard.run(cfg)["written"] == 1 and verify_corpus(root, Lineage(cfg).shard, deep=True) == []


def test_a_rebuild_that_differs_from_the_recorded_bytes_is_refused(tmp_path):
    """A shard later stages were computed from is only ever restored, never replaced: the sources changed."""
    cfg, root, src = _jpeg_run(tmp_path)
    tar = Path(root.path("corpus", "shards", "000001.tar"))
    tar.write_bytes(tar.read_bytes()[:-1024])
    damaged = tar.read_bytes()
    for p in sorted(src.iterdir()):  # every source re-encoded: same pixels per file, other bytes
        p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(ShardCorruptError, match=r"000001\.tar.*rebuilt from its sources it differs"):
        shard.run(cfg, verify=True)
    assert tar.read_bytes() == damaged


def test_manifest_parts_and_cache_metadata_are_checked_and_repaired(tmp_path):
    cfg, root, _ = _jpeg_run(tmp_path)
    before = {t: cache_arrays(root, t) for t in cfg.teachers}
    # a flipped byte in the manifest: every stage that reads it refuses; `dad shard` writes it again
    manifest = Path(root.path("corpus", "manifest.parquet"))
    good = manifest.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x10
    manifest.write_bytes(bytes(data))
    for run in (lambda: teach.run(cfg), lambda: score.run(cfg), lambda: train.run(cfg)):
        with pytest.raises(ShardCorruptError, match=r"corpus/manifest\.parquet: .*dad shard --verify"):
            run()
    shard.run(cfg, verify=True)
    assert manifest.read_bytes() == good
    # a damaged part is never concatenated into a manifest
    part = Path(root.path("corpus", "parts", "000000.manifest.parquet"))
    part_good = part.read_bytes()
    part.write_bytes(part_good[:100] + bytes([part_good[100] ^ 1]) + part_good[101:])
    with pytest.raises(ShardCorruptError, match=r"corpus/parts/000000\.manifest\.parquet"):
        shard.run(cfg)
    assert manifest.read_bytes() == good
    shard.run(cfg, verify=True)
    assert part.read_bytes() == part_good and manifest.read_bytes() == good

    # array metadata: a changed fill value would read every unstored chunk as 0; the group's output space
    meta = Path(root.path("cache", "r2g", "global", "zarr.json"))
    meta_good = meta.read_bytes()
    meta.write_bytes(meta_good.replace(b'"NaN"', b'0.0'))
    group = Path(root.path("cache", "luma", "zarr.json"))
    group_good = json.loads(group.read_bytes())
    group.write_text(json.dumps({**group_good, "attributes": {**group_good["attributes"], "output_space": "depth"}}))
    for run in (lambda: train.run(cfg), lambda: score.run(cfg)):
        with pytest.raises(CacheCorruptError, match=r"cache/r2g/global/zarr\.json differs from what teach writes; "
                                                    r"rewrite it with `dad teach --verify --teacher r2g`"):
            run()
    with pytest.raises(CacheCorruptError, match=r"cache/luma/zarr\.json attribute\(s\) output_space differ"):
        require_intact_metadata(root, cfg, lineage_for(cfg).output_spaces(["luma"]), [0, 1, 2])
    summary = teach.run(cfg)  # rewrites the metadata, recomputes nothing
    assert (summary["cells"], summary["recomputed"]) == (0, 0)
    assert meta.read_bytes() == meta_good and json.loads(group.read_bytes()) == group_good
    for t in cfg.teachers:
        for name, arr in cache_arrays(root, t).items():
            np.testing.assert_array_equal(arr, before[t][name])
    train.verify_targets(root, cfg, [0, 1, 2], lineage_for(cfg))


def test_markers_without_digests_are_read_unchecked_and_recorded_by_shard_verify(tmp_path):
    """Natural behaviour for markers written before digests existed: nothing to compare, so the shard is
    read as before; `dad shard --verify` rebuilds it and records its digest when the rebuild is identical."""
    cfg, root, _ = _jpeg_run(tmp_path)
    ledger, fp = Ledger(root), Lineage(cfg).shard
    for cell in ("000000", "final"):
        info = ledger.info("shard", "_", cell, fp)
        info.pop("objects")
        root.write_json(info, "ledger", "shard", "_", f"{cell}.{fp}.json")
    tar = Path(root.path("corpus", "shards", "000000.tar"))
    good = tar.read_bytes()
    assert verify_corpus(root, Lineage(cfg).shard, deep=True) == []
    assert shard.status(cfg, root)[0]["note"] == "complete"
    assert teach.run(cfg, verify=True)["recomputed"] == 0
    summary = shard.run(cfg, verify=True)
    assert (summary["written"], summary["skipped"]) == (1, 2)
    assert tar.read_bytes() == good
    assert ledger.info("shard", "_", "000000", fp)["objects"]["corpus/shards/000000.tar"]["bytes"] == len(good)
    assert set(ledger.info("shard", "_", "final", fp)["objects"]) == set(shard.FINAL_FILES)


def _without_views(root: Root, fp: str) -> None:
    """Make the corpus what `dad shard` wrote before it stored the global views: each tar rewritten with the
    region and the row only (the same tar writer), its marker recording that tar and no `view`."""
    import webdataset as wds

    ledger = Ledger(root)
    for tar_path in sorted(Path(root.path("corpus", "shards")).glob("*.tar")):
        samples = {}
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
        buf = io.BytesIO()
        with wds.TarWriter(buf, user="dad", group="dad", mtime=0.0, encoder=False) as tar:
            for sample in samples.values():
                tar.write({k: v for k, v in sample.items() if k != "global.webp"})
        tar_path.write_bytes(buf.getvalue())
        cell = tar_path.stem
        info = ledger.info("shard", "_", cell, fp)
        info.pop("view")
        info["objects"][f"corpus/shards/{tar_path.name}"] = {"bytes": len(buf.getvalue()),
                                                              "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
        root.write_json(info, "ledger", "shard", "_", f"{cell}.{fp}.json")


def test_a_corpus_sharded_before_views_were_stored_trains_the_same_and_repairs_into_its_own_bytes(tmp_path):
    """Shards written before `dad shard` stored each sample's G×G view still work: the view is computed from
    the region (the same pixels, so the same batches, and no stage redoes anything), and `dad shard --verify`
    rebuilds a damaged one without views, into the bytes its marker recorded."""
    from bench.kit.train import stream_for

    cfg, root, _ = _jpeg_run(tmp_path)
    fp = Lineage(cfg).shard
    with_views = list(stream_for(cfg, flip=True, jitter=0.1).batches(0, 0, 1, 3))
    _without_views(root, fp)
    tar = Path(root.path("corpus", "shards", "000001.tar"))
    old = tar.read_bytes()
    assert b"global.webp" not in old
    assert verify_corpus(root, fp, deep=True) == [] and teach.run(cfg, verify=True)["recomputed"] == 0
    computed = list(stream_for(cfg, flip=True, jitter=0.1).batches(0, 0, 1, 3))
    for a, b in zip(with_views, computed, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _flip_inside_a_jpeg(tar)
    summary = shard.run(cfg, verify=True)
    assert summary["written"] == 1 and tar.read_bytes() == old
    assert verify_corpus(root, fp, deep=True) == []


# -- item 10: sources changed since `dad shard` ------------------------------------------------------------

def test_changed_sources_are_reported_by_status_and_refused_by_shard(tmp_path):
    src = write_ramps(tmp_path / "src", 6, sizes=((64, 64),))
    cfg = dad_config(tmp_path / "root", src, shard_size=2)
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(cfg.to_toml())
    shard.run(cfg)
    root = Root(cfg.run.root)
    corpus = tree_hashes(Path(root.path("corpus")))
    assert _status_note(cfg_file, "shard", "corpus") == "complete"

    write_ramps(tmp_path / "extra", 1, sizes=((64, 64),), seed=9)
    shutil.move(tmp_path / "extra" / "ramp000.png", src / "new.png")             # added
    shutil.move(src / "ramp001.png", tmp_path / "ramp001.png")                   # removed
    stat = (src / "ramp002.png").stat()
    os.utime(src / "ramp002.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # modified (touched)

    note = _status_note(cfg_file, "shard", "corpus")
    assert note.startswith("complete; listing stale") and "add 1 file(s), drop 1 and re-read 1 modified" in note
    with pytest.raises(shard.SourcesChangedError) as err:
        shard.run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "new --root" in msg
    assert (f"add 1 file(s) ({src / 'new.png'}), drop 1 ({src / 'ramp001.png'}) and re-read 1 modified "
            f"({src / 'ramp002.png'})") in msg
    res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file)])
    assert res.exit_code == 2 and "corpus.sources changed since `dad shard`" in res.output, res.output
    assert tree_hashes(Path(root.path("corpus"))) == corpus  # nothing was changed by the refused reruns

    # restored: current again, and a rerun does nothing
    (src / "new.png").unlink()
    shutil.move(tmp_path / "ramp001.png", src / "ramp001.png")
    os.utime(src / "ramp002.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _status_note(cfg_file, "shard", "corpus") == "complete"
    assert shard.run(cfg)["written"] == 0
    # a listing made before the signature existed is not compared (nothing recorded to compare with)
    (src / "ramp003.png").unlink()
    root.remove("corpus", "sources.parquet")
    assert _status_note(cfg_file, "shard", "corpus") == "complete"


# -- item 4: teach and train exclude each other on a teacher's cache ----------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_reteach_is_refused_while_training_reads_the_cache(tmp_path, monkeypatch):
    cfg, root, _ = _jpeg_run(tmp_path)
    changed = load_config(raw={**cfg.model_dump(mode="json"), "teachers": {
        **cfg.model_dump(mode="json")["teachers"], "r2g": {"adapter": "pixel", "model": "luma", "prior": 0.7}}})
    before = cache_arrays(root, "r2g")

    # 1. training does not start while `dad teach` writes one of its teachers
    with stage_lock(root, "teach", "r2g", command="dad teach --teacher r2g"), \
            pytest.raises(LockError, match=r"`dad teach` is writing the outputs of 'r2g'.*dad teach --teacher r2g"):
        train.run(cfg)
    assert not root.exists("train") and root.listdir("ledger", "leases", "teach.r2g") == []

    # 2. while training runs (held at its first step), re-teaching r2g with other settings is refused
    started, release = threading.Event(), threading.Event()
    real_step = train.train_step

    def held_step(*args, **kwargs):
        started.set()
        assert release.wait(120)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", held_step)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(summary=train.run(cfg)), daemon=True)
    worker.start()
    try:
        assert started.wait(120), "training never reached its first step"
        leases = root.listdir("ledger", "leases", "teach.r2g")
        assert len(leases) == 1 and len(root.listdir("ledger", "leases", "teach.luma")) == 1
        with pytest.raises(LockError) as err:
            teach.run(changed, teachers=["r2g"])
        msg = str(err.value)
        assert "cache/r2g is being read by `dad train --name student`" in msg
        assert f"ledger/leases/teach.r2g/{leases[0]}" in msg and "\n" not in msg
        assert teach.run(cfg)["cells"] == 0  # nothing to rewrite: no refusal
        for name, arr in cache_arrays(root, "r2g").items():
            np.testing.assert_array_equal(arr, before[name])
    finally:
        release.set()
        worker.join(240)
    assert result["summary"]["steps"] == cfg.train.steps
    assert root.listdir("ledger", "leases", "teach.r2g") == []  # released with the run

    # 3. a dead reader's lease is removed; a reader on another host needs --break-lock
    folder = ("ledger", "leases", "teach.r2g")
    root.write_json({"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time(), "token": "dead",
                     "command": "dad train --name gone"}, *folder, "dead.json")
    root.write_json({"host": "elsewhere", "pid": 1, "started": time.time(), "token": "far",
                     "command": "dad train --name far"}, *folder, "far.json")
    with pytest.raises(LockError, match=r"`dad train --name far` \(pid 1 on elsewhere"):
        teach.run(changed, teachers=["r2g"])
    assert root.listdir(*folder) == ["far.json"]
    assert teach.run(changed, teachers=["r2g"], break_lock=True)["cells"] == 3
    assert root.listdir(*folder) == []
