"""Object storage (issue #9, R5): the whole pipeline with its run root on s3:// (moto's S3 server on
127.0.0.1, started and stopped here) gives the same manifest, targets, scores, weights and metrics as
the same run on local disk — and the credentials it runs with appear in none of its outputs or logs (R6).

s3fs takes the endpoint from `AWS_ENDPOINT_URL` and the keys from the usual AWS variables; nothing about
them is in the config. The S3 run uses the inline executor (each stage runs in this process).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_security import assert_no_secrets

from bench.kit import faults as ff
from bench.kit.configs import raw_config
from bench.kit.images import write_ramps
from bench.kit.s3 import S3_CREDS, eval_metrics, moto_s3, run_pipeline, write_evalset
from pipeline.cache import ARRAYS, open_cache
from pipeline.config import load_config
from pipeline.storage import Root

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

CREDS = S3_CREDS


@pytest.fixture
def s3():
    with moto_s3("dad-faults") as fs:
        yield fs


@pytest.mark.timeout(600)
def test_pipeline_on_s3_matches_local_disk(tmp_path, s3, caplog, capfd):
    caplog.set_level(logging.INFO)
    src = write_ramps(tmp_path / "src", 6, sizes=((64, 64),))
    dataset = write_evalset(tmp_path / "evalset")
    local_raw = raw_config(tmp_path / "local", src, preset="fault", train={"steps": 2},
                           eval={"resolution": 28, "pictures": 1})
    s3_raw = ff.with_root(local_raw, "s3://dad-faults/run")

    got = run_pipeline(s3_raw, dataset)
    want = run_pipeline(local_raw, dataset)
    assert got["shard"]["samples"] == want["shard"]["samples"] == 6
    assert got["teach"]["cells"] == want["teach"]["cells"] == 6
    assert got["train"]["steps"] == want["train"]["steps"] == 2

    s3_root, local_root = Root("s3://dad-faults/run"), Root(str(tmp_path / "local"))
    listed = s3.find("dad-faults/run")
    assert any(p.endswith("corpus/shards/000000.tar") for p in listed)
    assert any("/cache/r2g/global/c/" in p for p in listed)
    for stage in ff.STAGES:  # every promised output, by content
        a, b = ff.outputs(s3_raw, stage), ff.outputs(local_raw, stage)
        assert a.digests == b.digests, (stage, sorted(k for k in a.digests if a.digests[k] != b.digests.get(k)))
        assert sorted(a.units) == sorted(b.units) and a.units
    # byte for byte where bytes are the contract: shard tars, the manifest, every stored Zarr shard
    for parts in (("corpus", "manifest.parquet"), ("corpus", "shards", "000001.tar"), ("crops", "plan.parquet")):
        assert s3_root.read_bytes(*parts) == local_root.read_bytes(*parts)
    for teacher in ("r2g", "luma"):
        ga, gb = open_cache(s3_root, teacher), open_cache(local_root, teacher)
        for name in ARRAYS:
            np.testing.assert_array_equal(ga[name][...], gb[name][...])
    for parts in (("scores", "scores.parquet"), ("scores", "selection.parquet")):
        assert s3_root.read_table(*parts).to_pylist() == local_root.read_table(*parts).to_pylist()
    m_s3, m_local = eval_metrics(s3_root), eval_metrics(local_root)
    assert m_s3 == m_local
    assert s3_root.read_bytes("eval", "student", "per_sample.csv") == local_root.read_bytes("eval", "student",
                                                                                              "per_sample.csv")
    # a rerun on S3 redoes nothing
    import stages.teach

    again = stages.teach.run(load_config(raw=s3_raw))
    assert (again["cells"], again["skipped"], again["recomputed"]) == (0, 6, 0)

    # R6: the credentials it ran with are nowhere in what it wrote or logged
    texts = {p: s3.cat_file(p) for p in s3.find("dad-faults/run")}
    captured = capfd.readouterr()
    assert_no_secrets({**texts, "log": caplog.text, "stdout": captured.out, "stderr": captured.err}, CREDS)
    assert b"AKIA" not in s3_root.read_bytes("dad.toml")
