"""Security (issue #9, R6): checkpoints never run code, tar members never escape, image size limits hold,
credentials never reach logs, configs, markers or the report.

The S3 run in tests/test_s3.py repeats the credential check where credentials are actually used.
The stored-region cap (`corpus.max_region`) is checked in tests/test_shard.py::test_region_cap_and_jpeg_output.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bench.kit.bad_inputs import tar_bytes
from bench.kit.configs import dad_config
from bench.kit.images import write_ramps
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.storage import Root
from stages import shard

# -- checkpoints are data, never code ---------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


def _evil_files(folder: Path, sentinel: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    evil = _Payload(str(sentinel))
    # 1. a torch zip checkpoint in our own format with the payload where the weights should be
    p = folder / "zip.pt"
    torch.save({"format": "dad.student", "version": 1, "model_config": {}, "state_dict": evil, "extra": None}, p)
    out["torch zip, payload in state_dict"] = p
    # 2. ... and hidden in the model config
    p = folder / "config.pt"
    torch.save({"format": "dad.student", "version": 1, "model_config": {"encoder": evil}, "state_dict": {}}, p)
    out["torch zip, payload in model_config"] = p
    # 3. plain pickles (torch's legacy, non-zip path), protocols 0 and 4
    for proto in (0, 4):
        p = folder / f"plain{proto}.pt"
        p.write_bytes(pickle.dumps(evil, protocol=proto))
        out[f"plain pickle protocol {proto}"] = p
    # 4. a torch checkpoint saved with the legacy (non-zip) serializer
    p = folder / "legacy.pt"
    torch.save({"state_dict": evil}, p, _use_new_zipfile_serialization=False)
    out["torch legacy format"] = p
    return out


def _real_checkpoint(path: Path) -> Path:
    from student.checkpoint import save_checkpoint
    from student.model import build_student

    torch.manual_seed(0)
    save_checkpoint(build_student("tiny"), str(path))
    return path


@pytest.mark.timeout(300)
def test_crafted_pickles_fail_safely_on_every_loading_path(tmp_path):
    from stages.teachers import build_teacher
    from stages.train import check_compatible
    from student.checkpoint import CheckpointError, load_checkpoint
    from student.model import build_student, load_encoder_weights

    sentinel = tmp_path / "PWNED"
    evil = _evil_files(tmp_path / "evil", sentinel)
    # the payload is live: a plain unpickler runs it (so the checks below can fail)
    pickle.loads((tmp_path / "evil" / "plain4.pt").read_bytes())
    assert sentinel.is_dir()
    sentinel.rmdir()

    good = _real_checkpoint(tmp_path / "good.pt")
    load_checkpoint(str(good))  # a real checkpoint loads
    cfg = load_config(raw={"run": {"root": str(tmp_path / "run")}, "corpus": {"sources": ["x"]},
                           "teachers": {"t": {"adapter": "checkpoint", "model": str(good)}}})
    for kind, path in evil.items():
        with pytest.raises(CheckpointError, match="weights-only|not a"):
            load_checkpoint(str(path))
        with open(path, "rb") as f, pytest.raises(CheckpointError):
            load_checkpoint(f)
        with pytest.raises(CheckpointError):
            check_compatible(cfg, str(path), "--init-from")  # dad train --init-from
        tcfg = cfg.teachers["t"].model_copy(update={"model": str(path)})
        with pytest.raises(CheckpointError):
            build_teacher("t", tcfg)  # a student used as a teacher
        with pytest.raises(Exception):  # noqa: B017 - any refusal; what matters is that nothing ran
            load_encoder_weights(build_student("tiny"), str(path))
        assert not sentinel.exists(), f"{kind}: the payload ran"

    # through the CLI: one clear message, exit code 2, nothing executed
    data = tmp_path / "evalset"
    data.mkdir()
    Image.fromarray(np.full((28, 28, 3), 90, np.uint8)).save(data / "a.png")
    np.save(data / "a.npy", np.ones((28, 28), np.float32))
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(cfg.to_toml())
    for flag in ("eval", "train"):
        args = (["eval", "-c", str(cfg_file), "--checkpoint", str(evil["torch zip, payload in state_dict"]),
                 "--dataset", f"folder:{data}", "--set", "eval.resolution=28"] if flag == "eval" else
                ["train", "-c", str(cfg_file), "--init-from", str(evil["plain pickle protocol 4"])])
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and not sentinel.exists()


# -- tar members cannot escape ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_tar_members_never_escape_and_nothing_is_extracted(tmp_path, media):
    victim = tmp_path / "victim"
    victim.mkdir()
    img = media.image_bytes(64, 64, "jpeg", seed=1)
    members = [("ok.jpg", img), ("../../victim/up.jpg", media.image_bytes(64, 64, "jpeg", seed=2)),
               (f"{victim}/abs.jpg", media.image_bytes(64, 64, "jpeg", seed=3)),
               ("a/b/../../../victim/mid.jpg", media.image_bytes(64, 64, "jpeg", seed=4)),
               ("link.jpg", b"", tarfile.SYMTYPE, str(victim / "target.jpg")),
               ("hard.jpg", b"", tarfile.LNKTYPE, "/etc/passwd")]
    src = tmp_path / "src" / "deep"
    src.mkdir(parents=True)
    (src / "hostile.tar").write_bytes(tar_bytes(members))
    (victim / "target.jpg").write_bytes(media.image_bytes(64, 64, "jpeg", seed=5))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    root = Root(str(tmp_path / "run"))
    cfg = dad_config(root.url, src / "hostile.tar", preset="fault")
    summary = shard.run(cfg)
    assert summary["samples"] == 1
    rejects = {r["source_uri"].split("#", 1)[1]: r["reason"] for r in root.read_table("corpus", "rejects.parquet").to_pylist()}
    assert set(rejects) == {m[0] for m in members[1:]}
    assert all(r.startswith("tar member") for r in rejects.values()), rejects
    # nothing outside the run root was created or touched; inside it, only our own names
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not str(p).startswith(root.url)}
    assert after == before
    with tarfile.open(root.path("corpus", "shards", "000000.tar")) as t:
        names = t.getnames()
    (row,) = root.read_table("corpus", "manifest.parquet").to_pylist()
    assert names == [f"{row['sample_id']}.{ext}" for ext in ("global.webp", "json", "png")]
    assert row["source_uri"].endswith("hostile.tar#ok.jpg")


# -- image size limits -----------------------------------------------------------------------------------

_BOMB_PROBE = r"""
import resource, sys, time, json
from pipeline.images import decode_rgb, Rejected
data = open(sys.argv[1], 'rb').read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
try:
    decode_rgb(data, max_pixels=40_000_000, min_side=32, max_aspect=4.0)
    reason = None
except Rejected as e:
    reason = str(e)
print(json.dumps({"reason": reason, "seconds": time.time() - t0,
                  "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def _jpeg_claiming(width: int, height: int, media) -> bytes:
    data = bytearray(media.image_bytes(64, 48, "jpeg", seed=9))
    i = data.find(b"\xff\xc0")
    assert i > 0
    data[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.timeout(120)
def test_image_size_limits_hold_before_pixels_are_allocated(tmp_path, media):
    import zlib

    png = bytearray(media.image_bytes(64, 64, "png", seed=3))
    png[16:24] = (300_000).to_bytes(4, "big") + (300_000).to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    cases = {"png bomb 20000²": media.png_bomb(), "png header 300000²": bytes(png),
             "jpeg header 65000²": _jpeg_claiming(65000, 65000, media),
             "just above the limit": media.png_bomb(8000, 5001)}
    for kind, data in cases.items():
        path = tmp_path / "probe.bin"
        path.write_bytes(data)
        res = subprocess.run([sys.executable, "-c", _BOMB_PROBE, str(path)], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).parents[1], check=False)
        assert res.returncode == 0, res.stderr[-2000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["reason"] and out["reason"].startswith("too many pixels"), (kind, out)
        assert out["seconds"] < 5 and out["grew_mb"] < 64, (kind, out)  # 40 Mpx of RGB would be 120 MB
    from pipeline.images import Rejected, decode_rgb

    ok = media.image_bytes(100, 100, "png", seed=4)
    assert decode_rgb(ok, max_pixels=10_000).shape == (100, 100, 3)  # the limit is inclusive
    with pytest.raises(Rejected, match="too many pixels: 100x100 = 10000 > corpus.max_pixels = 9999"):
        decode_rgb(ok, max_pixels=9999)


# -- credentials stay out of everything we write ------------------------------------------------------------

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAULTSUITE7Q2X", "AWS_SECRET_ACCESS_KEY": "s3cr3t/FaultSuite+Key9zz",
           "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEFaultSuiteToken", "HF_TOKEN": "hf_FaultSuiteTokenXYZ"}


def assert_no_secrets(texts: dict[str, bytes | str], secrets=SECRETS) -> None:
    for where, text in texts.items():
        blob = text if isinstance(text, bytes) else text.encode()
        for name, value in secrets.items():
            assert value.encode() not in blob, f"{name} leaked into {where}"


def tree_texts(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.timeout(300)
def test_credentials_never_reach_logs_configs_markers_or_the_report(tmp_path, monkeypatch, caplog, capfd):
    import logging

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAD_VERBOSE", "1")
    caplog.set_level(logging.DEBUG)
    src = write_ramps(tmp_path / "src", 4, sizes=((64, 64),))
    root = tmp_path / "run"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(dad_config(root, src, preset="fault").to_toml())
    runner = CliRunner()
    outputs = {}
    for args in (["shard"], ["teach"], ["score"], ["status"], ["report"], ["config", "show"], ["teachers"]):
        res = runner.invoke(app, [*args, "-c", str(cfg_file)])
        assert res.exit_code == 0, (args, res.output)
        outputs[" ".join(args)] = res.output
    assert (root / "dad.toml").exists() and (root / "report" / "index.html").exists()
    assert any((root / "ledger" / "teach").rglob("*.json"))
    captured = capfd.readouterr()
    assert_no_secrets({**outputs, **tree_texts(root), "log records": caplog.text, "stdout": captured.out,
                       "stderr": captured.err})
