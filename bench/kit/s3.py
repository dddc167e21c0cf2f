"""Object storage (issue #9, R5): moto's S3 server, and the whole pipeline run in-process so a run on
s3:// can be compared with one on local disk.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from bench.kit.faults import STAGES

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
