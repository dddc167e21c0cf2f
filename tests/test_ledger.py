"""Ledger, locks and the recorded config: markers last, crash-safe reruns, one writer per stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.kit.configs import dad_config
from pipeline import storage
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.ledger import Ledger, LockError, stage_lock
from pipeline.lineage import Lineage, StaleConfigError, check_recorded
from pipeline.storage import Root
from stages import shard

DAD = str(Path(sys.executable).parent / "dad")


def outputs(root: Root) -> dict[str, bytes]:
    out = {f"shards/{n}": root.read_bytes("corpus", "shards", n)
           for n in root.listdir("corpus", "shards") if n.endswith(".tar")}
    for name in (("corpus", "manifest.parquet"), ("corpus", "rejects.parquet"), ("crops", "plan.parquet")):
        out["/".join(name)] = root.read_bytes(*name)
    return out


def _cfg(root, sources, **sections):
    """Only root, sources and `sections`: the product's defaults for everything else."""
    return dad_config(root, sources, preset="bare", **sections)


def _shard_markers(root: Root) -> list[str]:
    return sorted(n for n in root.listdir("ledger", "shard", "_") if n[:6].isdigit())


# -- the ledger itself -----------------------------------------------------------------------------

def test_ledger_markers_round_trip():
    root = Root(f"memory://ledger-{uuid.uuid4().hex[:8]}")
    led = Ledger(root)
    assert led.done("teach", "t1", "fpA") == set() and led.scopes("teach") == []
    led.mark("teach", "t1", "000000", "fpA", {"samples": 3})
    led.mark("teach", "t1", "000001", "fpA")
    led.mark("teach", "t1", "000001", "fpB")
    led.mark("teach", "t2", "000000", "fpA")
    assert led.is_done("teach", "t1", "000000", "fpA") and not led.is_done("teach", "t1", "000000", "fpB")
    assert led.done("teach", "t1", "fpA") == {"000000", "000001"}
    assert led.done("teach", "t1", "fpB") == {"000001"}
    assert led.markers("teach", "t1") == {"000000": {"fpA"}, "000001": {"fpA", "fpB"}}
    info = led.info("teach", "t1", "000000", "fpA")
    assert (info["cell"], info["fingerprint"], info["samples"], info["scope"]) == ("000000", "fpA", 3, "t1")
    assert led.scopes("teach") == ["t1", "t2"]
    led.forget("teach", "t1")
    assert led.markers("teach", "t1") == {} and led.done("teach", "t2", "fpA") == {"000000"}


def test_recorded_config_guards_later_stages(tmp_path):
    root = Root(str(tmp_path / "run"))
    cfg = _cfg(root.url, ["x"])
    check_recorded(root, cfg, "shard")
    assert load_config(raw=__import__("tomllib").loads(root.read_bytes("dad.toml").decode())) == cfg
    check_recorded(root, _cfg(root.url, ["x"], train={"steps": 3}), "teach")  # not a shard setting
    changed = _cfg(root.url, ["x"], crops={"local_count": 2})
    with pytest.raises(StaleConfigError, match=r"crops\.local_count changed since `dad shard`"):
        check_recorded(root, changed, "teach")
    check_recorded(root, changed, "shard")  # nothing sharded yet: the shard stage may re-record
    assert "local_count = 2" in root.read_bytes("dad.toml").decode()
    Ledger(root).mark("shard", "_", "listing", "fp")
    with pytest.raises(StaleConfigError, match=r"corpus\.shard_size differ"):
        check_recorded(root, _cfg(root.url, ["x"], crops={"local_count": 2}, corpus={"shard_size": 8}), "shard")


# -- markers come last ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_marker_only_after_outputs(tmp_path, make_corpus, monkeypatch, write_config):
    photos = make_corpus("photos", n=9, size=(120, 90))
    root = Root(str(tmp_path / "run"))
    cfg = _cfg(root.url, [photos], corpus={"shard_size": 3}, run={"executor": "inline"})

    writes: list[str] = []
    real_write = storage.Root.write_bytes
    real_fsync = os.fsync

    def recording_write(self, data, *parts):
        writes.append("/".join(parts))
        return real_write(self, data, *parts)

    def failing_fsync(fd):  # the disk fails while shard 1's tar is half written
        if "000001.tar" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.Root, "write_bytes", recording_write)
    monkeypatch.setattr(storage.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        shard.run(cfg)
    assert _shard_markers(root) == [f"000000.{Lineage(cfg).shard}.json"]
    assert root.listdir("corpus", "shards") == ["000000.tar"]  # no partial tar, no temp file left behind
    assert not root.exists("ledger", "locks", "shard._.lock")  # the lock is released on failure
    assert not root.exists("corpus", "manifest.parquet")

    # `dad status` shows the partial state: 1 of 3 shards done
    cfg_file = write_config(root.url, photos, corpus={"shard_size": 3})
    res = CliRunner().invoke(app, ["status", "-c", str(cfg_file)])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if "shard" in ln and "corpus" in ln)
    assert [c.strip() for c in line.strip("│┃ ").split("│")] == ["shard", "corpus", "1", "3", "0", "incomplete"]

    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    writes.clear()
    summary = shard.run(cfg)
    assert (summary["written"], summary["skipped"], summary["samples"]) == (2, 1, 9)
    for cell in ("000001", "000002"):
        marker = next(i for i, w in enumerate(writes) if w.startswith(f"ledger/shard/_/{cell}."))
        for out in (f"corpus/shards/{cell}.tar", f"corpus/parts/{cell}.manifest.parquet",
                    f"corpus/parts/{cell}.rejects.parquet"):
            assert writes.index(out) < marker
    assert "corpus/shards/000000.tar" not in writes  # done work is not redone
    assert writes[-1].startswith("ledger/shard/_/final.")

    res = CliRunner().invoke(app, ["status", "-c", str(cfg_file)])
    line = next(ln for ln in res.stdout.splitlines() if "shard" in ln and "corpus" in ln)
    assert [c.strip() for c in line.strip("│┃ ").split("│")] == ["shard", "corpus", "3", "3", "0", "complete"]
    res = CliRunner().invoke(app, ["status", "-c", str(cfg_file), "--set", "crops.local_count=3"])
    line = next(ln for ln in res.stdout.splitlines() if "shard" in ln and "corpus" in ln)
    assert [c.strip() for c in line.strip("│┃ ").split("│")][2:5] == ["0", "0", "3"]  # 3 stale shards


# -- kill -9 mid-run -------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_kill9_mid_run_then_rerun_is_byte_identical(tmp_path, make_corpus, write_config):
    photos = make_corpus("photos", n=16, size=[(320, 240), (256, 288)], fmt="jpeg")
    killed = Root(str(tmp_path / "killed"))
    cfg_file = write_config(killed.url, photos, corpus={"shard_size": 2}, run={"num_cpus": 1, "executor": "ray"})
    proc = subprocess.Popen([DAD, "shard", "-c", str(cfg_file)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not _shard_markers(killed):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no shard finished in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run, holding the lock
        proc.wait(10)
    finally:
        time.sleep(1.0)
        try:  # Ray's own processes belong to the driver's session: reap whatever outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = len(_shard_markers(killed))
    assert 1 <= done_at_kill < 8 and not killed.exists("corpus", "manifest.parquet")
    assert killed.exists("ledger", "locks", "shard._.lock")  # left behind by the dead driver

    cfg = load_config(cfg_file, overrides=['run.executor="inline"'])
    rerun = shard.run(cfg)  # takes over the stale lock, redoes only what is missing
    assert (rerun["skipped"], rerun["written"], rerun["shards"]) == (done_at_kill, 8 - done_at_kill, 8)

    clean = Root(str(tmp_path / "clean"))
    shard.run(load_config(cfg_file, root=clean.url, overrides=['run.executor="inline"']))
    got, want = outputs(killed), outputs(clean)
    assert sorted(got) == sorted(want) and len(got) == 8 + 3  # 8 shards, manifest, rejects, plan
    assert got == want


# -- locks ---------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_second_writer_is_refused_naming_the_holder(tmp_path, make_corpus, write_config):
    photos = make_corpus("photos", n=3)
    root = Root(str(tmp_path / "run"))
    cfg = _cfg(root.url, [photos], run={"executor": "inline"})
    with stage_lock(root, "shard", command="dad shard (test holder)") as me:
        assert me.pid == os.getpid()
        with pytest.raises(LockError) as info:
            shard.run(cfg)
        msg = str(info.value)
        assert f"held by pid {os.getpid()} on {socket.gethostname()} (dad shard (test holder))" in msg
        assert "--break-lock" in msg
        cfg_file = write_config(root.url, photos, run={"executor": "inline"})
        res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file)])
        assert res.exit_code == 2 and f"held by pid {os.getpid()} on" in " ".join(res.output.split())
        assert not root.exists("dad.toml") and not root.exists("corpus")  # refused before any work
        # other stages and other scopes have their own locks
        with stage_lock(root, "teach", "t1"), stage_lock(root, "teach", "t2"):
            pass
    assert not root.exists("ledger", "locks", "shard._.lock")
    assert shard.run(cfg)["samples"] == 3


@pytest.mark.timeout(120)
def test_lock_held_by_another_process_then_stale_after_its_death(tmp_path, make_corpus):
    photos = make_corpus("photos", n=3)
    root = Root(str(tmp_path / "run"))
    cfg = _cfg(root.url, [photos], run={"executor": "inline"})
    script = ("import time\nfrom pipeline.ledger import stage_lock\nfrom pipeline.storage import Root\n"
              f"with stage_lock(Root({root.url!r}), 'shard', command='holder'):\n"
              "    print('locked', flush=True)\n    time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=rf"held by pid {holder.pid} on {socket.gethostname()} \(holder\)"):
            shard.run(cfg)
    finally:
        holder.kill()
        holder.wait(10)
    assert json.loads(root.read_bytes("ledger", "locks", "shard._.lock"))["pid"] == holder.pid
    summary = shard.run(cfg)  # the holder is dead on this host: its lock is stale and taken over
    assert summary["samples"] == 3
    assert not root.exists("ledger", "locks", "shard._.lock")


def test_lock_from_another_host_needs_break_lock(tmp_path, make_corpus, write_config):
    photos = make_corpus("photos", n=2)
    root = Root(str(tmp_path / "run"))
    foreign = {"host": "other-node-7", "pid": 1, "started": time.time() - 60, "token": "t", "command": "dad shard"}
    root.write_json(foreign, "ledger", "locks", "shard._.lock")
    cfg_file = write_config(root.url, photos, run={"executor": "inline"})
    res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file)])
    assert res.exit_code == 2
    assert "held by pid 1 on other-node-7 (dad shard)" in " ".join(res.output.split())
    assert root.read_json("ledger", "locks", "shard._.lock") == foreign
    res = CliRunner().invoke(app, ["shard", "-c", str(cfg_file), "--break-lock"])
    assert res.exit_code == 0, res.output
    assert "samples=2" in res.stdout
    assert not root.exists("ledger", "locks", "shard._.lock")


def test_unreadable_lock_is_replaced_and_exclusive_create_is_atomic(tmp_path):
    root = Root(str(tmp_path / "run"))
    assert root.create_exclusive(b"first", "x.lock") is True
    assert root.create_exclusive(b"second", "x.lock") is False
    assert root.read_bytes("x.lock") == b"first"
    assert root.listdir() == ["x.lock"]  # no temp files left
    root.write_bytes(b"{not json", "ledger", "locks", "shard._.lock")
    with stage_lock(root, "shard") as me:
        assert root.read_json("ledger", "locks", "shard._.lock")["token"] == me.token
    mem = Root(f"memory://lock-{uuid.uuid4().hex[:8]}")
    assert mem.create_exclusive(b"a", "l") is True and mem.create_exclusive(b"b", "l") is False
