"""Reliability suite (issue #9): crashes (R1), dead workers (R2), bad inputs (R3), concurrent writers (R4).

R1 — SIGKILL the driver of each stage mid-stage, rerun it, and compare every output with an
uninterrupted run (bench/kit/faults.py `outputs`: shard bytes and manifest, Zarr contents and the stored
shards' checksums, scores and selection, final weights, checkpoints and loss log). Stages run in
processes forked from a preloaded forkserver (`Zygote`) with the inline executor, so the
killed process *is* the whole stage. One trial per stage here; `python -m bench.faults` runs 20 per stage
at random moments. Killing Ray drivers is covered elsewhere: tests/test_ledger.py
(test_kill9_mid_run_then_rerun_is_byte_identical: shard on Ray, default suite) and tests/test_teach.py
(test_kill_9_mid_stage_then_rerun_gives_identical_cache: teach actor pool, slow).

R2 — `ray.kill` a teach actor mid-stage (default suite), and SIGKILL a whole worker node of a real
three-node cluster mid-teach (slow; the cluster helper is tests/test_cluster.py's).

R3 — a corpus of every kind of bad file (bench/kit/bad_inputs.py), bad configs, and a corrupted cache
shard: no crash, every file accounted for with a reason, corruption detected, recomputed, never trained on.

R4 — two processes run the same stage on the same root: one proceeds, the other is refused with a
message naming the holder; the outputs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from teach_fixtures import alive
from typer.testing import CliRunner

from bench.kit import faults as ff
from bench.kit.bad_inputs import BAD_CONFIGS, bad_corpus, corrupt_bytes
from bench.kit.configs import dad_config, raw_config
from bench.kit.images import write_ramps, write_sources
from bench.kit.teach import cache_arrays
from pipeline.cache import ARRAYS, CacheCorruptError, open_cache, read_rows, shard_key, verify_cells
from pipeline.config import ConfigError, load_config
from pipeline.ledger import Ledger
from pipeline.storage import Root
from stages import score, shard, teach, train
from stages.teachers import lineage_for

# -- shared: one tiny run, each stage done once cleanly (in forked children) -----------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """6 ramps → 3 shards of 2; two pixel teachers; 4 training steps (a checkpoint each step)."""
    work = tmp_path_factory.mktemp("faults")
    src = write_sources(work / "src", 6)
    raw = raw_config(work / "unused", src, preset="fault")
    z = ff.zygote()
    bases = ff.prepare_bases(z, work, raw)
    clean = {stage: ff.outputs(ff.with_root(raw, bases.done), stage) for stage in ff.STAGES}
    return work, raw, z, bases, clean


# -- R1: crash anywhere ------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["shard", "teach", "score", "train"])
def test_r1_kill_driver_mid_stage_then_rerun_matches_uninterrupted(prepared, stage):
    work, raw, z, bases, clean = prepared
    assert clean[stage].units and clean[stage].digests  # there is something to lose
    # Marker writes are slowed (0.3 s each, in the child only) so that the kill right after the first
    # finished cell always lands mid-stage, with cells left to do.
    delay = 0.0 if stage == "train" else 0.3
    trial = ff.kill_trial(z, stage, bases.before[stage], work / f"r1-{stage}", raw, clean[stage],
                          kill_after=None, delay_marks=delay)
    assert trial.killed_running, "the stage finished before the kill: the trial tested nothing"
    assert trial.cells_at_kill >= 1
    assert trial.rerun_ok, trial.rerun_error
    c = trial.comparison
    assert (c.lost, c.duplicated, c.differing) == (0, 0, []), c


def test_r1_comparison_sees_a_difference(prepared, tmp_path):
    """The comparison is not vacuous: a lost sample, a changed value and a changed weight all show."""
    _, raw, _, bases, clean = prepared
    copy = tmp_path / "copy"
    shutil.copytree(bases.done, copy)
    mine = ff.with_root(raw, copy)
    assert ff.compare(clean["score"], ff.outputs(mine, "score")).ok
    t = Root(str(copy)).read_table("scores", "scores.parquet")
    Root(str(copy)).write_table(t.slice(1), "scores", "scores.parquet")
    c = ff.compare(clean["score"], ff.outputs(mine, "score"))
    assert c.lost == 1 and c.differing == ["scores/scores.parquet"]
    group = open_cache(Root(str(copy)), "r2g", mode="r+")
    group["global"][0, 0, 0] = 123.0
    assert ff.compare(clean["teach"], ff.outputs(mine, "teach")).differing == ["cache/r2g/global"]
    import torch

    from student.checkpoint import load_checkpoint, save_checkpoint

    model, _ = load_checkpoint(str(copy / "train" / "student" / "model.pt"))
    with torch.no_grad():
        next(model.parameters()).add_(1e-6)
    save_checkpoint(model, str(copy / "train" / "student" / "model.pt"))
    assert len(ff.compare(clean["train"], ff.outputs(mine, "train")).differing) == 1


# -- R2: dead workers --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(420)
def test_r2_ray_kill_a_teach_actor_mid_stage(tmp_path, ray_session):
    import ray

    src = write_ramps(tmp_path / "src", 8, sizes=((64, 64),))  # 4 shards of 2
    slow = {"adapter": "bench.kit.faults:RegisteringTeacher", "model": "r+2g@1.0", "batch_size": 8, "actors": 2,
            "num_cpus": 0.5}
    cfg = dad_config(tmp_path / "ray", src, {"px": slow}, preset="teach", executor="ray")
    shard.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": "inline"})}))
    registry = ff.make_registry()
    markers = tmp_path / "ray" / "ledger" / "teach" / "px"
    result: dict = {}

    def go():
        try:
            result["summary"] = teach.run(cfg)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    try:
        thread.start()
        deadline = time.time() + 300
        while not (ray.get(registry.get.remote()) and markers.is_dir() and any(markers.iterdir())):
            assert thread.is_alive(), result
            assert time.time() < deadline, "no actor registered / no shard finished in 300 s"
            time.sleep(0.1)
        handle, pid = ray.get(registry.get.remote())[0]
        done_at_kill = len(list(markers.iterdir()))
        assert done_at_kill < 4, "the stage finished before the kill"
        ray.kill(handle, no_restart=False)  # the actor dies; Ray restarts it and retries its task
        thread.join(300)
        assert not thread.is_alive(), "teach hung after an actor was killed"
        assert "error" not in result, result.get("error")
        assert result["summary"]["cells"] == 4 and result["summary"]["samples"] == 8
        assert not alive(pid), "the killed actor's process is still there"
    finally:
        ray.kill(registry)
    assert len(list(markers.iterdir())) == 4
    clean = dad_config(tmp_path / "clean", src, {"px": {**slow, "model": "r+2g@0"}}, preset="teach")
    shard.run(clean)
    teach.run(clean)
    got, want = cache_arrays(tmp_path / "ray", "px"), cache_arrays(tmp_path / "clean", "px")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("slot", [0.5, 1.0], ids=["survivor-fits-both-actors", "survivor-fits-one-actor"])
def test_r2_kill_a_worker_node_mid_teach(tmp_path, slot):
    """Head (no teacher resource) + 2 worker nodes (1 teacher slot each); SIGKILL every process of the
    worker node that cached the first shard: the job completes on the survivor with the cache of an
    uninterrupted run. With slot = 1.0 the survivor can host only one of the two actors."""
    from test_cluster import BIN, Cluster

    src = write_ramps(tmp_path / "src", 12, sizes=((64, 64),))  # 6 shards of 2
    slow = {"adapter": "bench.kit.teach:SlowPixelTeacher", "model": "r+2g@2", "batch_size": 8, "actors": 2,
            "num_cpus": 0.25, "resources": {"teacher_slot": slot}}
    cfg = dad_config(tmp_path / "run", src, {"px": slow}, preset="teach", executor="ray")
    shard.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": "inline"})}))
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    markers = tmp_path / "run" / "ledger" / "teach" / "px"
    cluster = Cluster(tmp_path)
    cluster.env.update(RAY_raylet_start_wait_time_s="120")  # PYTHONPATH (bench.kit importable): from conftest
    log = tmp_path / "driver.log"
    try:
        cluster.up(workers=2)
        index = {n["id"]: int(k.split("_")[1]) for n in cluster.nodes() for k in n["res"] if k.startswith("worker_")}
        with open(log, "w") as sink:
            driver = subprocess.Popen([str(BIN / "dad"), "teach", "-c", str(path), "--address",
                                       f"127.0.0.1:{cluster.port}"], env=cluster.env, stdout=sink,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 400
            while not (markers.is_dir() and any(markers.iterdir())):
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "no shard cached in 400 s"
                time.sleep(0.2)
            first = json.loads(next(markers.iterdir()).read_text())["node"]
            os.killpg(cluster.procs[1 + index[first]].pid, signal.SIGKILL)  # every process of that node
            assert len(list(markers.iterdir())) < 6
            rc = driver.wait(600)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        assert rc == 0, log.read_text()[-3000:]
    finally:
        cluster.down()
    done = [json.loads(p.read_text()) for p in markers.iterdir()]
    assert len(done) == 6 and {m["node"] for m in done} - {first}  # the survivor finished the job
    clean = dad_config(tmp_path / "clean", src, {"px": {**slow, "model": "r+2g@0"}}, preset="teach")
    shard.run(clean)
    teach.run(clean)
    got, want = cache_arrays(tmp_path / "run", "px"), cache_arrays(tmp_path / "clean", "px")
    for name in ARRAYS:
        np.testing.assert_array_equal(got[name], want[name])


# -- R3: bad inputs -----------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_r3_every_bad_corpus_file_is_rejected_or_handled_with_a_reason(tmp_path):
    folder, files = bad_corpus(tmp_path / "bad")
    kinds = {f.kind for f in files}
    assert len(kinds) >= 25 and sum(f.expect == "reject" for f in files) >= 12
    raw = raw_config(tmp_path / "run", folder, preset="fault", shard_size=3)
    cfg = load_config(raw=raw)
    summary = shard.run(cfg)
    root = Root(cfg.run.root)
    manifest = {r["source_uri"] for r in root.read_table("corpus", "manifest.parquet").to_pylist()}
    rejects = {r["source_uri"]: r["reason"] for r in root.read_table("corpus", "rejects.parquet").to_pylist()}
    assert not manifest & set(rejects)
    for f in files:
        if f.expect == "sample":
            assert f.uri in manifest, (f.kind, rejects.get(f.uri))
        else:
            assert f.uri in rejects, f.kind
            assert rejects[f.uri].startswith(f.reason) and rejects[f.uri].strip(), (f.kind, rejects[f.uri])
    assert manifest | set(rejects) == {f.uri for f in files}  # nothing unaccounted for
    assert summary["samples"] == len(manifest) and summary["rejects"] == len(rejects)
    # what the shard stage accepted, the rest of the pipeline takes: every handled sample gets targets
    teach.run(cfg)
    score.run(cfg)
    scores = root.read_table("scores", "scores.parquet").to_pylist()
    assert len(scores) == 2 * len(manifest)
    assert all(r["valid_fraction"] == 1.0 for r in scores)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_r3_bad_configs_fail_with_a_message_naming_the_key(tmp_path, case):
    sections, fragment = BAD_CONFIGS[case]
    raw = raw_config(tmp_path / "run", tmp_path, preset="bare", **sections)
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw)
    assert fragment in str(info.value)
    # and through the CLI: exit code 2, one message, no traceback, nothing written
    from pipeline.cli import app
    from pipeline.config import dumps_toml

    path = tmp_path / "bad.toml"
    path.write_text(dumps_toml(raw))
    res = CliRunner().invoke(app, ["shard", "-c", str(path)])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and fragment.split(":")[0] in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_r3_unreadable_config_files_and_runtime_config_errors(tmp_path):
    from pipeline.cli import app

    runner = CliRunner()
    cases = {"missing.toml": None, "syntax.toml": "[run\nroot = 1", "binary.toml": b"\x00\xff\xfe garbage",
             "empty.toml": ""}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_bytes(text.encode() if isinstance(text, str) else text)
        res = runner.invoke(app, ["shard", "-c", str(tmp_path / name)])
        assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, (name, res.output)
    # valid TOML that only fails when the stage starts: unknown adapter, missing corpus, unknown --teacher
    src = write_ramps(tmp_path / "src", 2)
    good = raw_config(tmp_path / "run", src, preset="fault")
    good["teachers"]["bad"] = {"adapter": "no_such_module:Nope", "model": "x"}
    path = tmp_path / "run.toml"
    path.write_text(load_config(raw=good).to_toml())
    res = runner.invoke(app, ["teach", "-c", str(path)])
    assert res.exit_code == 2 and "run `dad shard` first" in " ".join(res.output.split()), res.output
    assert runner.invoke(app, ["shard", "-c", str(path), "--set", 'run.executor="inline"']).exit_code == 0
    res = runner.invoke(app, ["teach", "-c", str(path), "--teacher", "bad"])
    assert res.exit_code == 2 and "no_such_module" in res.output and "Traceback" not in res.output, res.output


# -- R3: a corrupted cache shard ----------------------------------------------------------------------------

def _cached(prepared, tmp_path) -> tuple[dict, Root]:
    _, raw, _, bases, _ = prepared
    copy = tmp_path / "run"
    shutil.copytree(bases.before["train"], copy)  # sharded, taught, scored; no training yet
    return ff.with_root(raw, copy), Root(str(copy))


@pytest.mark.timeout(300)
def test_r3_corrupted_cache_shard_is_detected_recomputed_and_never_trained_on(prepared, tmp_path):
    from pipeline.cli import app

    raw, root = _cached(prepared, tmp_path)
    cfg = load_config(raw=raw)
    before = cache_arrays(root, "r2g")
    obj = Path(root.path("cache", "r2g", shard_key("global", 1)))
    size = obj.stat().st_size
    corrupt_bytes(obj)  # same size: only a checksum tells
    assert obj.stat().st_size == size

    # 1. reading it fails loudly (per-chunk CRC32C), naming teacher and shard
    with pytest.raises(CacheCorruptError, match=r"teacher 'r2g' \(global, corpus shard\(s\) \[1\]\).*dad teach --verify"):
        read_rows(open_cache(root, "r2g"), [2, 3])
    # 2. training refuses before any step: sha256 against the teach marker
    with pytest.raises(CacheCorruptError, match=r"teacher 'r2g' are corrupt \(1 shard\(s\): shard 000001: global/c/1/0/0"):
        train.run(cfg)
    assert not root.exists("train")
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    res = CliRunner().invoke(app, ["train", "-c", str(path)])
    assert res.exit_code == 2 and "dad teach --verify --teacher r2g" in " ".join(res.output.split()), res.output
    # 3. a plain `dad teach` compares sizes only: a same-size flip passes, a truncated object does not
    assert teach.run(cfg)["recomputed"] == 0
    other = Path(root.path("cache", "luma", shard_key("local", 2)))
    other.write_bytes(other.read_bytes()[:-10])
    summary = teach.run(cfg, teachers=["luma"])
    assert (summary["recomputed"], summary["cells"], summary["skipped"]) == (1, 1, 2)
    # 4. `dad teach --verify` finds the flip by sha256 and recomputes exactly that cell
    summary = teach.run(cfg, verify=True)
    assert (summary["recomputed"], summary["cells"], summary["skipped"]) == (1, 1, 5)
    after = cache_arrays(root, "r2g")
    for name in ARRAYS:
        np.testing.assert_array_equal(after[name], before[name])
    assert teach.run(cfg, verify=True)["recomputed"] == 0
    train.verify_targets(root, cfg, [0, 1, 2], lineage_for(cfg))  # passes now


@pytest.mark.timeout(120)
def test_r3_deleted_or_swapped_cache_objects_and_old_markers(prepared, tmp_path):
    raw, root = _cached(prepared, tmp_path)
    cfg = load_config(raw=raw)
    fp = lineage_for(cfg).teach("r2g")
    # a deleted object reads back as NaN (no checksum can see it); the marker's record can
    Path(root.path("cache", "r2g", shard_key("global", 0))).unlink()
    assert verify_cells(root, "r2g", fp, [0, 1, 2], deep=False) == {
        0: "global/c/0/0/0: missing; its teach marker recorded " + str(
            Ledger(root).info("teach", "r2g", "000000", fp)["objects"]["global"]["bytes"]) + " bytes"}
    # a whole, valid object from another shard copied over this one: every CRC passes, sha256 does not
    a, b = (Path(root.path("cache", "luma", shard_key("local", s))) for s in (0, 1))
    b.write_bytes(a.read_bytes())
    swapped = read_rows(open_cache(root, "luma"), [2, 3])["local"]  # decodes fine: wrong, but well-formed
    np.testing.assert_array_equal(swapped, read_rows(open_cache(root, "luma"), [0, 1])["local"])
    luma_fp = lineage_for(cfg).teach("luma")
    assert set(verify_cells(root, "luma", luma_fp, [0, 1, 2], deep=True)) == {1}
    # a marker without checksums (an older version) cannot be trusted
    info = Ledger(root).info("teach", "r2g", "000002", fp)
    info.pop("objects")
    root.write_json(info, "ledger", "teach", "r2g", f"000002.{fp}.json")
    assert "records no checksums" in verify_cells(root, "r2g", fp, [2], deep=False)[2]
    summary = teach.run(cfg)
    assert (summary["recomputed"], summary["cells"]) == (3, 3)  # r2g 0 and 2, luma 1 (its size differs)
    assert teach.run(cfg, verify=True)["recomputed"] == 0
    assert not np.array_equal(read_rows(open_cache(root, "luma"), [2, 3])["local"], swapped)


# -- R4: two writers -------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["shard", "teach", "score", "train"])
def test_r4_second_process_on_the_same_stage_is_refused(prepared, stage):
    work, raw, z, bases, clean = prepared
    trial = work / f"r4-{stage}"
    if trial.exists():
        shutil.rmtree(trial)
    shutil.copytree(bases.before[stage], trial)
    mine = ff.with_root(raw, trial)
    path = work / f"r4-{stage}.toml"
    path.write_text(load_config(raw=mine).to_toml())
    scope = {"shard": "_", "teach": "r2g", "score": "_", "train": "student"}[stage]
    lock = trial / "ledger" / "locks" / f"{stage}.{scope}.lock"
    first, first_result = z.start(work, stage, mine, delay_marks=1.0 if stage != "train" else 0.0)
    try:
        deadline = time.time() + 300
        while not lock.exists():
            assert first.is_alive(), ff.read_log(first_result)[-3000:]
            assert time.time() < deadline
            time.sleep(0.01)
        holder = json.loads(lock.read_text())
        second = z.run(work, stage, mine, cli=[stage, "-c", str(path)], timeout=300)
        first.join(300)
    finally:
        if first.is_alive():
            os.kill(first.pid, signal.SIGKILL)
    assert first.exitcode == 0 and ff.read_result(first_result)["ok"], ff.read_log(first_result)[-3000:]
    assert second["code"] == 2, second
    msg = " ".join(second["log"].split())
    assert f"another `dad {stage}` is writing to {trial}: held by pid {holder['pid']}" in msg, second["log"][-2000:]
    assert "Traceback" not in second["log"]
    assert not lock.exists()
    c = ff.compare(clean[stage], ff.outputs(mine, stage))
    assert (c.lost, c.duplicated, c.differing) == (0, 0, []), c
