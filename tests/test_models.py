"""Model files by URL + sha256 (pipeline/models.py): mirror hits by digest, refused mismatches, offline
failures before any work, and a download cache that is read instead of the source the second time."""

from __future__ import annotations

import hashlib

import fsspec
import pytest

from pipeline import models
from pipeline.config import ConfigError, load_config


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MIRROR_ENV, "")  # restored after the test, even if load_config sets it
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


def blob(tag: bytes = b"a") -> tuple[bytes, str]:
    data = b"TFL3" + tag * 1000
    return data, hashlib.sha256(data).hexdigest()


def test_mirror_is_matched_by_digest_not_by_name(isolated):
    data, sha = blob()
    mirror = isolated / "mirror"
    mirror.mkdir()
    (mirror / "some_other_name.tflite").write_bytes(data)
    (mirror / "decoy.tflite").write_bytes(b"TFL3 something else")
    path = models.resolve("https://example.invalid/x/model.tflite", sha, mirrors=[str(mirror)])
    assert path == str(mirror / "some_other_name.tflite")


def test_mirror_from_the_environment(isolated, monkeypatch):
    data, sha = blob()
    (isolated / "m").mkdir()
    (isolated / "m" / "f.onnx").write_bytes(data)
    monkeypatch.setenv(models.MIRROR_ENV, str(isolated / "m"))
    assert models.resolve("https://example.invalid/f.onnx", sha).endswith("f.onnx")


def test_fetch_once_then_the_cache_is_reused(isolated, monkeypatch):
    data, sha = blob(b"b")
    with fsspec.open("memory://published/model.tflite", "wb") as f:
        f.write(data)
    opened = []
    real_open = fsspec.open
    monkeypatch.setattr(models.fsspec, "open", lambda url, *a, **k: (opened.append(url), real_open(url, *a, **k))[1])
    first = models.resolve("memory://published/model.tflite", sha)
    second = models.resolve("memory://published/model.tflite", sha)
    assert first == second == str(isolated / "cache" / sha)
    assert opened == ["memory://published/model.tflite"]  # one read of the source, then the cache
    with open(first, "rb") as f:
        assert f.read() == data


def test_digest_mismatch_is_refused_with_both_digests(isolated):
    data, sha = blob(b"c")
    with fsspec.open("memory://published/wrong.tflite", "wb") as f:
        f.write(data + b"tampered")
    with pytest.raises(models.ModelFileError) as err:
        models.resolve("memory://published/wrong.tflite", sha)
    assert sha in str(err.value) and hashlib.sha256(data + b"tampered").hexdigest() in str(err.value)
    assert not list((isolated / "cache").glob("*"))  # nothing half-trusted is left behind
    local = isolated / "local.tflite"
    local.write_bytes(b"other bytes")
    with pytest.raises(models.ModelFileError, match="refusing it"):
        models.resolve(str(local), sha)


def test_unreachable_without_mirror_names_the_option(isolated):
    _, sha = blob(b"d")
    with pytest.raises(models.ModelFileError, match=r"run\.model_mirror.*DAD_MODEL_MIRROR"):
        models.resolve("memory://nowhere/model.tflite", sha, mirrors=[str(isolated / "empty")])


def test_remote_model_needs_a_sha256_and_credentials_are_not_shown(isolated):
    with pytest.raises(models.ModelFileError, match="needs its sha256") as err:
        models.resolve("https://user:secret@example.invalid/m.tflite?X-Amz-Signature=abc")
    assert "secret" not in str(err.value) and "Signature" not in str(err.value)
    assert models.display("s3://KEY:SECRET@bucket/m.onnx?token=1") == "s3://bucket/m.onnx"


def test_offline_teacher_fails_before_any_work(isolated, tmp_path):
    """`dad teach` with an unreachable URL and no mirror: refused while describing the teacher, so no
    stage output exists yet."""
    from stages.teachers import spec_for

    _, sha = blob(b"e")
    cfg = load_config(raw={"run": {"root": str(tmp_path / "root")}, "corpus": {"sources": ["x"]},
                           "teachers": {"t": {"adapter": "tflite", "model": "memory://gone/t.tflite", "sha256": sha}}})
    with pytest.raises(models.ModelFileError, match="teachers.t.model: cannot fetch"):
        spec_for("t", cfg.teachers["t"])
    assert not (tmp_path / "root").exists()


def test_config_mirror_becomes_the_process_default(isolated, monkeypatch):
    mirror = isolated / "mine"
    load_config(raw={"run": {"root": "r", "model_mirror": [str(mirror)]}, "corpus": {"sources": ["x"]}})
    import os

    assert os.environ[models.MIRROR_ENV].split(os.pathsep)[0] == str(mirror)
    with pytest.raises(ConfigError, match="sha256"):
        load_config(raw={"run": {"root": "r"}, "corpus": {"sources": ["x"]},
                         "teachers": {"t": {"adapter": "tflite", "model": "m", "sha256": "XYZ"}}})
