"""Reliability, round two (issue #19), items 12 and 13: every failure is one line, and a resource request
the cluster can never meet fails at once.

12 — each situation runs through the real CLI (`typer.testing.CliRunner` on `pipeline.cli.app`, real
files on a real run root): a read-only root, a full disk (a small tmpfs), a root that is a file, a
garbage `dad.toml` / `ledger/_runs/*.json`, a truncated manifest / selection, a partial last line of
`metrics.jsonl`, an unimportable plugin, object-store (botocore) errors against moto's S3 server and
errors raised inside a teacher. Each gives a non-zero exit code and exactly one line on stderr, without
"Traceback", naming the file or key; `dad status` reports damage with its repair and never crashes;
`--debug` (anywhere on the line) or DAD_DEBUG=1 adds the traceback.

13 — against a real local Ray cluster (conftest's 2-CPU `ray_session`, no GPU): a teacher or a training
worker asking for a GPU, a custom resource no node has, more CPUs than a node or more workers than fit,
is refused within seconds, naming the key and what the cluster has.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.kit.configs import dad_config
from bench.kit.images import write_sources
from bench.kit.s3 import S3_CREDS, moto_s3
from pipeline.cli import app

pytestmark = pytest.mark.usefixtures("root_logger_restored")


# -- a prepared run root (shard, teach, score: inline), copied per test --------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    import stages.score
    import stages.shard
    import stages.teach

    base = tmp_path_factory.mktemp("cli-prepared")
    cfg = dad_config(base / "root", write_sources(base / "src", 4), preset="fault")
    stages.shard.run(cfg)
    stages.teach.run(cfg)
    stages.score.run(cfg)
    (base / "run.toml").write_text(cfg.to_toml())
    return base


@pytest.fixture
def config_for(prepared, tmp_path):
    """Factory: the prepared run's config file with run.root = root (and text replacements old → new)."""

    def make(root, **replace: str) -> Path:
        text = (prepared / "run.toml").read_text().replace(str(prepared / "root"), str(root))
        for old, new in replace.items():
            text = text.replace(old, new)
        path = tmp_path / "run.toml"
        path.write_text(text)
        return path

    return make


@pytest.fixture
def run(prepared, tmp_path, config_for):
    """A copy of the prepared root at tmp_path/root and its config file: (root, config path)."""
    root = tmp_path / "root"
    shutil.copytree(prepared / "root", root)
    return root, config_for(root)


def dad(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, *needles: str) -> str:
    """Assert the failure contract: exit code != 0, exactly one line on stderr, no traceback, naming
    every needle; returns the line."""
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code not in (0, None), res.output
    assert "Traceback" not in res.output, res.output
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- 12: the file system --------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at `path` (needs root), unmounted after; skips where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def test_a_read_only_root_is_one_line_naming_the_file(run, tmp_path, config_for):
    root, _ = run
    mount = tmp_path / "ro"
    # permissions bind an ordinary user; root (as in CI containers) needs a read-only mount
    with tmpfs(mount, "8m") if os.geteuid() == 0 else contextlib.nullcontext():
        shutil.copytree(root, mount, dirs_exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        else:
            for p in [mount, *mount.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
        cfg = config_for(mount)
        line = one_line_error(dad("score", "-c", cfg), f"{mount}/ledger/locks/score._.lock", "--root")
        assert ".tmp-" not in line and ("read-only" in line or "permission denied" in line)
        res = dad("status", "-c", cfg)  # status only reads: it works on a read-only root
        assert res.exit_code == 0 and "complete" in res.stdout, res.output


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun(tmp_path, config_for):
    with tmpfs(tmp_path / "small", "24k") as small:
        cfg = config_for(small / "root")
        line = one_line_error(dad("shard", "-c", cfg), "no space left", f"{small}/root/corpus/shards/", "rerun")
        assert ".tmp-" not in line
        assert dad("status", "-c", cfg).exit_code == 0  # and the diagnostic still works on a full disk


def test_a_root_that_is_a_file_names_run_root(tmp_path, config_for):
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    cfg = config_for(afile)
    for cmd in ("shard", "teach", "status"):
        one_line_error(dad(cmd, "-c", cfg), "run.root", str(afile), "is a file")
    cfg = config_for(afile / "root")  # a file further up the path
    one_line_error(dad("shard", "-c", cfg), str(afile), "is a file where a folder is expected")


# -- 12: damaged run-root files: the failing command, `dad status`, and the repair it names ------------------

def test_a_garbage_dad_toml_names_it_and_its_repair_works(run):
    root, cfg = run
    (root / "dad.toml").write_bytes(b"\x00garbage = {")
    one_line_error(dad("teach", "-c", cfg), f"{root}/dad.toml", "damaged", "dad shard")
    res = dad("status", "-c", cfg)
    one_line_error(res, "dad.toml", "damaged", "delete it and rerun `dad shard`")
    assert "complete" in res.stdout  # the stages are still assessed
    (root / "dad.toml").unlink()  # the repair the message names
    assert dad("shard", "-c", cfg).exit_code == 0
    assert dad("status", "-c", cfg).exit_code == 0
    assert dad("teach", "-c", cfg).exit_code == 0


def test_a_garbage_run_record_names_it(run):
    root, cfg = run
    record = root / "ledger" / "_runs" / "score.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_bytes(b'{"stage": "sco')
    one_line_error(dad("report", "-c", cfg), str(record), "damaged", "delete it")
    one_line_error(dad("status", "-c", cfg), "ledger/_runs/score.json", "delete it")
    record.unlink()
    assert dad("report", "-c", cfg).exit_code == 0


def test_a_truncated_manifest_names_it_and_dad_shard_repairs_it(run):
    root, cfg = run
    truncate(root / "corpus" / "manifest.parquet")
    for cmd in ("teach", "score"):
        one_line_error(dad(cmd, "-c", cfg), "corpus/manifest.parquet", "damaged", "dad shard")
    res = dad("status", "-c", cfg)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "corpus/manifest.parquet is damaged" in res.stderr and "rerun `dad shard`" in res.stderr
    assert dad("shard", "-c", cfg).exit_code == 0
    assert dad("teach", "-c", cfg).exit_code == 0 and dad("status", "-c", cfg).exit_code == 0


def test_a_truncated_selection_names_it_and_dad_score_repairs_it(run):
    root, cfg = run
    truncate(root / "scores" / "selection.parquet")
    one_line_error(dad("train", "-c", cfg), f"{root}/scores/selection.parquet", "damaged", "rerun `dad score`")
    one_line_error(dad("status", "-c", cfg), "scores/selection.parquet", "rerun `dad score`")
    assert dad("score", "-c", cfg).exit_code == 0
    assert dad("status", "-c", cfg).exit_code == 0


@pytest.mark.timeout(240)
def test_a_partial_last_log_line_is_dropped_and_a_garbage_one_named(run):
    root, cfg = run
    assert dad("train", "-c", cfg, "--set", "train.steps=2").exit_code == 0
    log = root / "train" / "student" / "metrics.jsonl"
    with open(log, "a") as f:  # a crash in the middle of appending step 3's line
        f.write('{"step": 3, "loss_to')
    assert dad("status", "-c", cfg).exit_code == 0
    assert dad("report", "-c", cfg).exit_code == 0
    res = dad("train", "-c", cfg, "--set", "train.steps=3")  # resumes from step 2
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in map(__import__("json").loads, log.read_text().splitlines())] == [1, 2, 3]
    log.write_text("garbage\n" + log.read_text())  # damage that is not a cut-short last line
    one_line_error(dad("report", "-c", cfg), str(log), "line 1", "delete it")
    one_line_error(dad("status", "-c", cfg), "train/student/metrics.jsonl", "damaged")


# -- 12: plugins and teachers --------------------------------------------------------------------------------

def test_an_unimportable_plugin_names_the_teacher_key(run, tmp_path, monkeypatch, config_for):
    root, _ = run
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for adapter, why in (("no_such_module:Teacher", "No module named 'no_such_module'"),
                         ("raising_plugin:Teacher", "broken at import")):
        cfg = config_for(root, **{'adapter = "pixel"\nmodel = "luma"': f'adapter = "{adapter}"\nmodel = "luma"'})
        for cmd in ("teach", "teachers"):
            one_line_error(dad(cmd, "-c", cfg), "teachers.luma.adapter", adapter, why, "install")
        res = dad("status", "-c", cfg)  # the other stages are still reported
        one_line_error(res, "cannot tell teach", "teachers.luma.adapter")
        assert "shard" in res.stdout and "complete" in res.stdout


def test_an_error_inside_a_teacher_names_the_teacher_and_the_rerun(run, config_for):
    root, _ = run
    shutil.rmtree(root / "ledger" / "teach" / "luma")  # luma's cells must run
    cfg = config_for(root, **{'adapter = "pixel"\nmodel = "luma"':
                                        'adapter = "bench.kit.teach:ExplodingTeacher"\nmodel = "luma"'})
    one_line_error(dad("teach", "-c", cfg), "teacher 'luma' failed", "ZeroDivisionError: the teacher's own bug",
                   "`dad teach --teacher luma`")


# -- 12: object storage (moto's S3 server) -------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_object_store_errors_are_one_line_naming_the_root(monkeypatch, config_for):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs

    with moto_s3("dad-cli"):
        cfg = config_for("s3://no-such-bucket/run")
        line = one_line_error(dad("shard", "-c", cfg), "s3://no-such-bucket/run", "NoSuchBucket", "run.root")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        s3fs.S3FileSystem.clear_instance_cache()
        cfg = config_for("s3://dad-cli/run")
        res = dad("status", "-c", cfg)
        line += one_line_error(res, "cannot reach the object store", "s3://dad-cli/run", "127.0.0.1:9",
                               "AWS_ENDPOINT_URL")
        s3fs.S3FileSystem.clear_instance_cache()
    for secret in S3_CREDS.values():
        assert secret not in line and secret not in res.output


# -- 12: the traceback on request, and Ray's wrapper unwrapped -------------------------------------------------

def test_debug_shows_the_traceback_wherever_it_is_asked_for(run, monkeypatch):
    root, cfg = run
    (root / "dad.toml").write_text("not toml [")
    for args in (["--debug", "teach", "-c", cfg], ["teach", "-c", cfg, "--debug"]):
        res = dad(*args)
        assert res.exit_code == 2 and "Traceback" in res.stderr, res.output
        assert res.stderr.strip().splitlines()[-1].startswith("error:") and "dad.toml" in res.stderr
    one_line_error(dad("teach", "-c", cfg), "dad.toml")  # off again for the next command
    monkeypatch.setenv("DAD_DEBUG", "1")
    assert "Traceback" in dad("teach", "-c", cfg).stderr


def test_a_ray_task_error_is_described_by_its_cause(ray_session):
    import ray

    from pipeline.errors import cause_line, describe

    @ray.remote
    def write_on_a_full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/corpus/shards/000003.tar")

    with pytest.raises(Exception) as caught:  # Ray's wrapper: what is unwrapped
        ray.get(write_on_a_full_disk.remote())
    assert "\n" in str(caught.value)  # Ray's own text: a remote traceback, what `error:` printed before
    line = describe(caught.value, "/data/run")
    assert line.startswith("no space left on the device writing /data/run/corpus/shards/000003.tar")
    assert "\n" not in line and "ray::" not in line
    assert cause_line(caught.value).startswith("OSError: [Errno 28]")


# -- 13: requests the cluster can never meet ---------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("sets, key, has", [
    (["teachers.luma.num_gpus=1"], "teachers.luma.num_gpus = 1", "0 GPU"),
    (["teachers.luma.num_cpus=64"], "teachers.luma.num_cpus = 64", "2 CPU"),
    (["teachers.luma.resources={tpu=1}"], "teachers.luma.resources.tpu = 1", "2 CPU, 0 GPU"),
    (["train.gpus_per_worker=1"], "train.gpus_per_worker = 1", "0 GPU"),
    (["train.resources_per_worker={tpu=2}"], "train.resources_per_worker.tpu = 2", "1 node"),
    (["train.workers=2", "train.cpus_per_worker=1.5"], "train.workers = 2 with train.cpus_per_worker = 1.5", "fits 1"),
])
def test_a_request_the_cluster_cannot_meet_fails_at_once(run, ray_session, sets, key, has):
    root, cfg = run
    if sets[0].startswith("teachers"):
        shutil.rmtree(root / "ledger" / "teach" / "luma")  # luma has cells to compute: it needs its actors
    before = sorted(p.name for p in (root / "ledger").rglob("*"))
    t0 = time.time()
    res = dad("train" if sets[0].startswith("train") else "teach", "-c", cfg, "--set", 'run.executor="ray"',
              *[a for s in sets for a in ("--set", s)])
    assert time.time() - t0 < 30
    one_line_error(res, key, "can never be met", has, "--address")
    assert sorted(p.name for p in (root / "ledger").rglob("*")) == before  # no work started, nothing marked


def test_a_finished_teacher_is_not_refused_for_resources_it_no_longer_needs(run, ray_session):
    _, cfg = run  # every cell done: `dad run` on a CPU machine after teaching on a GPU cluster
    res = dad("teach", "-c", cfg, "--set", 'run.executor="ray"', "--set", "teachers.luma.num_gpus=1")
    assert res.exit_code == 0, res.output


def test_require_resources_compares_with_the_nodes_alive(ray_session):
    from pipeline.runtime import Request, UnsatisfiableError, require_resources

    require_resources([Request({"CPU": ("k", 2)}), Request({"CPU": ("k", 0.5)}, count=4, count_key="n")])
    with pytest.raises(UnsatisfiableError, match="k = 2.5"):
        require_resources([Request({"CPU": ("k", 2.5)})])
    with pytest.raises(UnsatisfiableError, match="n = 5 with k = 0.5 each.*fits 4"):
        require_resources([Request({"CPU": ("k", 0.5)}, count=5, count_key="n")])


def test_usage_errors_stay_clicks_own_and_the_status_title_is_redacted(tmp_path, config_for):
    """A missing option is a usage message (exit 2), not an 'unexpected' error; `dad status` names a
    credentialed root without its secret."""
    res = dad("status")
    assert res.exit_code == 2 and "Missing option" in res.output and "unexpected" not in res.output, res.output
    cfg = config_for(tmp_path / "root")
    res = dad("status", "-c", cfg, "--root", "memory://KEY:SECRET@bucket/run")
    assert "SECRET" not in res.output and "bucket/run" in res.output, res.output
