"""Shared fixtures: small generated corpora, config files, one Ray cluster per test session.

* `make_corpus(folder, n=…, size=…, fmt=…)` writes distinct, seeded images and returns the folder.
* `write_config(root, sources, **sections)` writes a TOML config and returns its path.
* `ray_session` starts (once per session) a 2-CPU local Ray cluster bound to 127.0.0.1.

Images and configs come from bench/kit (shared with the benchmarks). Ray's environment and PYTHONPATH
(the repository root, where `bench.kit`'s plugin teachers live) are set at import time, so Ray
workers, forkserver children and subprocesses (`dad …`) inherit them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.kit.configs import raw_config, write_toml
from bench.kit.images import exif_jpeg, image_array, image_bytes, png_bomb

ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Rendered views are memoised in a folder of this session only: tests never read a user's cache.
os.environ["DAD_RENDER_CACHE"] = tempfile.mkdtemp(prefix="dad-test-renders-")


@pytest.fixture(scope="session")
def media():
    """bench.kit.images' makers for tests that need specific image bytes, as a fixture."""
    return SimpleNamespace(image_array=image_array, image_bytes=image_bytes, png_bomb=png_bomb,
                           exif_jpeg=exif_jpeg)


@pytest.fixture
def make_corpus(tmp_path):
    """Factory: write `n` distinct images into tmp_path/folder (created) and return the folder.

    size: (w, h) for all, or a list of sizes cycled over the images. fmt: 'jpeg' | 'png' | ….
    seed offsets the image seeds, so two corpora with different seeds share no image.
    """

    def _make(folder: str = "corpus", n: int = 8, size=(96, 72), fmt: str = "jpeg", seed: int = 0,
              prefix: str = "img", mode: str = "RGB") -> Path:
        out = tmp_path / folder
        out.mkdir(parents=True, exist_ok=True)
        sizes = size if isinstance(size, list) else [size]
        ext = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            (out / f"{prefix}{i:04d}.{ext}").write_bytes(image_bytes(w, h, fmt, seed=seed * 100_003 + i, mode=mode))
        return out

    return _make


@pytest.fixture
def write_config(tmp_path):
    """Factory: write a run config; `sections` maps section → {key: value} (merged over [run]/[corpus])."""

    def _write(root: str | Path, sources, name: str = "dad.toml", **sections: dict) -> Path:
        return write_toml(tmp_path / name, raw_config(root, sources, preset="bare", **sections))

    return _write


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs, 127.0.0.1) for the whole test session."""
    import ray

    from pipeline.config import RunCfg
    from pipeline.runtime import init_ray

    try:
        init_ray(RunCfg(root="unused", num_cpus=2))
    except Exception as err:  # noqa: BLE001 - a start-up race on a loaded machine: one more try, then fail
        print(f"ray_session: first ray.init failed ({type(err).__name__}: {err}); retrying once")
        ray.shutdown()
        init_ray(RunCfg(root="unused", num_cpus=2))
    yield
    # Shut down at session end only: other test modules reuse the cluster.
    from pipeline.runtime import shutdown_ray

    shutdown_ray()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module (as each Ray worker here): on a small shared machine two
    threads only contend (a 256² evaluation measured ~10× slower with two under load).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_between_modules():
    """Collect each module's garbage before the next one starts. s3fs/aiobotocore leave aiohttp sessions
    whose __del__ logs an error; run by the GC in the middle of a later `ast.parse` (pytest rewriting a
    lazily imported module), that logging made CPython 3.11 raise `SystemError: AST constructor recursion
    depth mismatch` in an unrelated test (seen once in test_score after test_s3)."""
    import gc

    yield
    gc.collect()


@pytest.fixture
def root_logger_restored():
    """The CLI points the root logger at CliRunner's stderr, which is closed once `invoke` returns:
    tests that invoke it and then log restore the handlers it replaced."""
    import logging

    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:], logging.root.level = handlers, level
