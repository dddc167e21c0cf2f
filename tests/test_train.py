"""The train stage (stages/train.py): DDP on Ray Train, resume after a crash, teacher usage,
--init-from, and the errors a user meets before any worker starts.

One tiny cached run (15 colour-ramp images, 3 shards of 5, two `pixel` teachers) is built per module;
each test trains on a copy. Training starts from `live.pt` (bench/kit/train.py: a tiny student
whose output starts positive). Most tests use the inline executor; one default test runs real Ray
Train with 2 workers; the subprocess kill -9 tests are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from teach_fixtures import subprocess_env
from train_fixtures import (
    batches_of,
    cached_run_with_student,
    copy_run,
    mean_loss,
    restrict_selection,
    same_weights,
    train_config,
)

import stages.score
import stages.train
from bench.kit.train import live_student, stream_for, weights
from pipeline.config import load_config
from pipeline.storage import Root
from student.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from student.data import EpochPlan, draw_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DAD = str(Path(sys.executable).parent / "dad")



@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return cached_run_with_student(tmp_path_factory.mktemp("train"))


@pytest.fixture
def run_copy(cached, tmp_path):
    return copy_run(cached, tmp_path / "root")


def metrics(cfg, name: str = "student") -> list[dict]:
    text = Root(cfg.run.root).read_bytes("train", name, "metrics.jsonl").decode()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def ckpt_steps(cfg, name: str = "student") -> list[int]:
    return sorted(int(f[5:12]) for f in Root(cfg.run.root).listdir("train", name) if f.startswith("ckpt-"))


# -- DDP on Ray Train ---------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_two_worker_ddp_uneven_shards_same_steps_and_loss_decreases(cached, tmp_path, ray_session):
    cfg = copy_run(cached, tmp_path / "root")
    assert restrict_selection(cfg.run.root, {0: 5, 1: 2, 2: 3}) == {0: 5, 1: 2, 2: 3}
    cfg = train_config(cfg, steps=6, batch_size=1, workers=2, cpus_per_worker=0.5, checkpoint_every=3,
                       run={"executor": "ray"})
    plan = EpochPlan({0: 5, 1: 2, 2: 3}, cfg.run.seed, 2, 1)
    # The run crosses epochs whose smallest rank holds a different number of samples (3, then 2…):
    # a fixed steps-per-epoch would run one rank dry and hang DDP.
    assert plan.steps(0) != plan.steps(1) and sum(plan.steps(e) for e in range(2)) < 6

    summary = stages.train.run(cfg)

    assert summary["world"] == 2 and summary["steps"] == 6 and summary["resumed_from"] == 0
    assert summary["rank_steps"] == [6, 6]
    ranks = sorted(summary["ranks"], key=lambda r: r["rank"])
    assert [r["samples"] for r in ranks] == [6, 6]
    for epoch in ranks[0]["shards"]:  # each epoch: disjoint shards, together all of them
        a, b = ranks[0]["shards"][epoch], ranks[1]["shards"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == [0, 1, 2]
    root = Root(cfg.run.root)
    assert root.exists("train", "student", "model.pt")
    fixed = batches_of(train_config(cfg, batch_size=5))  # all 10 selected samples, no flips
    before = mean_loss(load_checkpoint(cfg.train.init_from)[0], fixed, cfg)
    after = mean_loss(load_checkpoint(root.uri("train", "student", "model.pt"))[0], fixed, cfg)
    assert after < 0.9 * before, (before, after)
    assert [m["step"] for m in metrics(cfg)] == list(range(1, 7))


# -- crash and resume -----------------------------------------------------------------------------

class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, k: int) -> None:
    """Make the k+1-th training step raise (the process 'dies' after k steps)."""
    real, calls = stages.train.train_step, []

    def step(*args, **kwargs):
        if len(calls) == k:
            raise Crash(f"simulated crash after {k} steps")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages.train, "train_step", step)


@pytest.mark.timeout(300)
def test_crash_then_rerun_resumes_and_matches_uninterrupted_run(cached, tmp_path, monkeypatch):
    opts = {"steps": 6, "checkpoint_every": 2, "deterministic": True, "flip": True, "jitter": 0.1}
    clean = train_config(copy_run(cached, tmp_path / "clean"), **opts)
    crashed = train_config(copy_run(cached, tmp_path / "crashed"), **opts)
    stages.train.run(clean)

    crash_after(monkeypatch, 5)  # dies in step 6, after the checkpoint of step 4
    with pytest.raises(Crash):
        stages.train.run(crashed)
    monkeypatch.undo()
    assert ckpt_steps(crashed) == [2, 4]  # older checkpoints are pruned (KEEP_CHECKPOINTS = 2)
    assert not Root(crashed.run.root).exists("train", "student", "model.pt")

    summary = stages.train.run(crashed)
    assert summary["resumed_from"] == 4 and summary["rank_steps"] == [2] and summary["steps"] == 6
    final = Root(crashed.run.root).uri("train", "student", "model.pt")
    assert same_weights(weights(final), weights(Root(clean.run.root).uri("train", "student", "model.pt")))
    # the log has every step once, with the uninterrupted run's losses
    got, want = metrics(crashed), metrics(clean)
    assert [m["step"] for m in got] == list(range(1, 7))
    assert [m["loss_total"] for m in got] == [m["loss_total"] for m in want]
    # a finished run is not redone
    assert stages.train.run(crashed)["skipped"] is True
    # training moved the weights (equal weights are not equal because nothing happened)
    assert not same_weights(weights(final), weights(cached.train.init_from))


def _write_cfg(cfg, path: Path) -> Path:
    path.write_text(cfg.to_toml())
    return path


def _run_dad(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run([DAD, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow  # three `dad train` processes: 45 s on a quiet machine, minutes on a busy one
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("executor", ["inline", "ray"])
def test_kill9_during_training_then_rerun_resumes_with_same_weights(cached, tmp_path, executor):
    opts = {"steps": 24, "checkpoint_every": 4, "log_every": 2, "deterministic": True}
    runs = {}
    for name in ("clean", "killed"):
        cfg = train_config(copy_run(cached, tmp_path / name), run={"executor": executor, "num_cpus": 2}, **opts)
        runs[name] = (cfg, _write_cfg(cfg, tmp_path / f"{name}.toml"))
    done = _run_dad(["train", "-c", str(runs["clean"][1])])
    assert done.returncode == 0, done.stderr[-3000:]

    cfg, path = runs["killed"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([DAD, "train", "-c", str(path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 900
        while not ckpt_steps(cfg):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        time.sleep(1.0)
        try:  # the driver's Ray processes share its session: reap what outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    at_kill = max(ckpt_steps(cfg))
    assert 4 <= at_kill < 24 and not Root(cfg.run.root).exists("train", "student", "model.pt")

    again = _run_dad(["train", "-c", str(path)])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = Root(cfg.run.root).read_json("train", "student", "summary.json")
    assert summary["resumed_from"] >= at_kill > 0 and summary["steps"] == 24
    a = weights(Root(cfg.run.root).uri("train", "student", "model.pt"))
    b = weights(Root(runs["clean"][0].run.root).uri("train", "student", "model.pt"))
    assert same_weights(a, b)


# -- teacher usage ----------------------------------------------------------------------------------

CHI2_P001 = {1: 10.83, 2: 13.82}


@pytest.mark.timeout(300)
def test_teacher_usage_matches_selection_probabilities(run_copy):
    cfg = train_config(run_copy, flip=False, jitter=0.0)
    stream = stream_for(cfg)
    names = list(cfg.teachers)
    # (1) over many epochs of batches, the `teacher` field follows the selection probabilities
    counts, expected = np.zeros(len(names)), np.zeros(len(names))
    for epoch in range(40):
        for batch in stream.batches(epoch, 0, 1, 7):
            for row, t in zip(batch["row"].tolist(), batch["teacher"].tolist()):
                counts[t] += 1
                expected += stream.selection[row] / stream.selection[row].sum()
    assert counts.sum() == 40 * 14
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < CHI2_P001[len(names) - 1], (counts, expected)
    assert np.allclose(expected / expected.sum(), [0.7, 0.3])  # the paper's 7:3 priors
    # (2) a training run logs exactly the draws of the rows it consumed
    run = train_config(cfg, steps=10, log_every=3)
    stages.train.run(run)
    logged = np.sum([m["teachers"] for m in metrics(run)], axis=0)
    plan = EpochPlan({s: len(r) for s, r in stream.shard_rows.items()}, cfg.run.seed, 1, cfg.train.batch_size)
    draws = np.zeros(len(names), dtype=int)
    for step in range(10):
        epoch, k = plan.locate(step)
        rows = [r for s in stream.shards(epoch, 0, 1) for r in stream.order(s, epoch)][k * 2:(k + 1) * 2]
        for r in rows:
            draws[draw_teacher(stream.selection[r], cfg.run.seed, epoch, r)] += 1
    assert logged.tolist() == draws.tolist() and draws.sum() == 20


# -- init-from ------------------------------------------------------------------------------------

def capture_first_step(monkeypatch) -> dict:
    real, seen = stages.train.train_step, {}

    def step(model, *args, **kwargs):
        if not seen:
            core = model.module if hasattr(model, "module") else model
            seen.update({k: v.detach().clone() for k, v in core.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(stages.train, "train_step", step)
    return seen


@pytest.mark.timeout(300)
def test_init_from_starts_from_the_checkpoint_weights(run_copy, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    # a trained student to continue from (as after adding a teacher): a short first run
    first = train_config(run_copy, steps=2)
    stages.train.run(first)
    trained = Root(first.run.root).uri("train", "student", "model.pt")
    assert not same_weights(weights(trained), weights(first.train.init_from))

    cfg_file = _write_cfg(train_config(run_copy, init_from=None, steps=2), tmp_path / "dad.toml")
    seen = capture_first_step(monkeypatch)
    result = CliRunner().invoke(app, ["train", "-c", str(cfg_file), "--name", "warm", "--init-from", trained])
    assert result.exit_code == 0, result.output
    assert seen and same_weights(seen, weights(trained))
    summary = Root(first.run.root).read_json("train", "warm", "summary.json")
    assert summary["steps"] == 2 and summary["resumed_from"] == 0

    # without --init-from the first step sees a fresh student: the comparison above can fail
    seen.clear()
    result = CliRunner().invoke(app, ["train", "-c", str(cfg_file), "--name", "cold"])
    assert result.exit_code == 0, result.output
    assert seen and not same_weights(seen, weights(trained))


# -- clear errors before any worker starts -----------------------------------------------------------

def test_missing_cached_targets_name_the_teach_command(run_copy, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    raw = run_copy.model_dump(mode="json")
    raw["teachers"]["flat"] = {"adapter": "pixel", "model": "constant", "prior": 0.1}
    cfg = load_config(raw=raw)
    with pytest.raises(FileNotFoundError, match=r"no cached targets for teacher 'flat': run `dad teach --teacher flat`"):
        stages.train.run(cfg)
    result = CliRunner().invoke(app, ["train", "-c", str(_write_cfg(cfg, tmp_path / "dad.toml"))])
    assert result.exit_code == 2 and "dad teach --teacher flat" in " ".join(result.output.split())
    assert not Root(cfg.run.root).exists("train")


def test_selection_that_keeps_no_samples_is_refused(run_copy):
    cfg = train_config(run_copy, score={"exclude_licenses": ["unknown"]})  # every teacher excluded
    assert stages.score.run(cfg)["kept"] == 0
    with pytest.raises(ValueError, match="the selection keeps no samples"):
        stages.train.run(cfg)


def test_too_few_samples_for_the_workers_is_refused(run_copy):
    restrict_selection(run_copy.run.root, {0: 1, 1: 1, 2: 1})
    with pytest.raises(ValueError, match="too few samples per worker"):
        stages.train.run(train_config(run_copy, batch_size=4))
    with pytest.raises(ValueError, match="at most 3 workers"):
        stages.train.run(train_config(run_copy, workers=4, batch_size=1))


def test_incompatible_checkpoints_are_refused(run_copy, tmp_path):
    other = tmp_path / "wide.pt"
    live_student(other, features=16)  # same encoder, a narrower head
    with pytest.raises(ValueError, match="incompatible model.*student.size = 'tiny'"):
        stages.train.run(train_config(run_copy, init_from=str(other)))
    with pytest.raises(ValueError, match="it is a 'tiny' student: set student.size = 'tiny'"):
        stages.train.run(train_config(run_copy, student={"size": "small"}))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        stages.train.run(train_config(run_copy, init_from=str(junk)))
    # a Depth Anything model whose architecture is no student preset
    from teach_fixtures import tiny_hf_models

    da = tiny_hf_models(tmp_path / "hf")["da"]
    with pytest.raises(ValueError, match="incompatible model"):
        stages.train.run(train_config(run_copy, init_from=str(da)))
    # a checkpoint of another model inside train/<name>/ is not resumed from
    model, _ = load_checkpoint(str(other))
    save_checkpoint(model, Root(run_copy.run.root).uri("train", "student", "ckpt-0000002.pt"),
                    extra={"step": 2})
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt-0000002.pt is from an incompatible model.*--name NEW"):
        stages.train.run(run_copy)


def test_a_failed_ray_worker_is_reported_with_its_own_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.errors import cause_line

    err = WorkerGroupError("Training failed", {1: FileNotFoundError("[Errno 2] corpus/shards/000001.tar"),
                                               0: RuntimeError("Traceback …\n  File …\nValueError: bad batch")})
    assert cause_line(err) == "rank 0: ValueError: bad batch"
    err = WorkerGroupError("Training failed", {1: FileNotFoundError("[Errno 2] corpus/shards/000001.tar")})
    assert cause_line(err) == "rank 1: FileNotFoundError: [Errno 2] corpus/shards/000001.tar"


# -- periodic validation ------------------------------------------------------------------------

def with_validation(cfg, **val):
    raw = cfg.model_dump(mode="json")
    raw["train"].update(val)
    raw["eval"].update({"align": "inverse_depth", "resolution": 56})
    return load_config(raw=raw)


VAL = "scenes:n=3,seed=900000,size=64"


@pytest.mark.timeout(300)
def test_validation_is_logged_and_changes_nothing_about_training(cached, tmp_path):
    from student.evaluation import evaluate

    opts = {"steps": 5, "checkpoint_every": 2, "deterministic": True}
    plain = train_config(copy_run(cached, tmp_path / "plain"), **opts)
    validated = with_validation(train_config(copy_run(cached, tmp_path / "val"), **opts),
                                val_dataset=VAL, val_every=2, val_samples=2)
    stages.train.run(plain)
    stages.train.run(validated)
    root = Root(validated.run.root)
    val = [json.loads(x) for x in root.read_bytes("train", "student", "val.jsonl").decode().splitlines()]
    assert [v["step"] for v in val] == [2, 4, 5] and all(v["val_n"] == 2 for v in val)
    # same weights and losses as without validation (RNG streams and train mode restored)
    final = root.uri("train", "student", "model.pt")
    assert same_weights(weights(final), weights(Root(plain.run.root).uri("train", "student", "model.pt")))
    assert [m["loss_total"] for m in metrics(validated)] == [m["loss_total"] for m in metrics(plain)]
    # the last validation is the eval protocol applied to the final weights
    model, _ = load_checkpoint(final)
    model.eval()
    _, summary = evaluate(lambda x: model(x), VAL, align="inverse_depth", resolution=56, max_samples=2)
    assert val[-1]["val_abs_rel"] == pytest.approx(summary["abs_rel"], rel=1e-5)
    assert val[-1]["val_delta1"] == pytest.approx(summary["delta1"], rel=1e-5)
    assert any(f.startswith("events") for f in os.listdir(root.path("train", "student", "tb")))


@pytest.mark.timeout(300)
def test_validation_log_survives_a_crash_and_resume(cached, tmp_path, monkeypatch):
    cfg = with_validation(train_config(copy_run(cached, tmp_path / "r"), steps=6, checkpoint_every=2),
                          val_dataset=VAL, val_every=1, val_samples=1)
    crash_after(monkeypatch, 5)  # dies in step 6; the last checkpoint is step 4, validations 1–5 logged
    with pytest.raises(Crash):
        stages.train.run(cfg)
    monkeypatch.undo()
    stages.train.run(cfg)
    text = Root(cfg.run.root).read_bytes("train", "student", "val.jsonl").decode()
    assert [json.loads(x)["step"] for x in text.splitlines()] == [1, 2, 3, 4, 5, 6]  # 5 once, not twice


def test_validation_settings_are_checked_before_any_work(cached):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.val_every"):
        with_validation(cached, val_every=10)
    with pytest.raises(ConfigError, match="train.val_dataset"):
        with_validation(cached, val_dataset="nosuchkind:/x")
