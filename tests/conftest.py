"""Shared fixtures: small generated corpora, config files, one Ray cluster per test session.

* `make_corpus(folder, n=…, size=…, fmt=…)` writes distinct, seeded images and returns the folder.
* `write_config(root, sources, **sections)` writes a TOML config and returns its path.
* `ray_session` starts (once per session) a 2-CPU local Ray cluster bound to 127.0.0.1.

Ray's environment is set at import time so subprocesses (`dad …`) inherit it too.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Rendered views are memoised in a folder of this session only: tests never read a user's cache.
os.environ["DAD_RENDER_CACHE"] = tempfile.mkdtemp(prefix="dad-test-renders-")


def image_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth seeded RGB pattern plus a little noise: compresses like a photo, distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy, phase = rng.uniform(0.005, 0.05, 3), rng.uniform(0.005, 0.05, 3), rng.uniform(0, 6.3, 3)
    chans = [127 + 100 * np.sin(xx * fx[c] + yy * fy[c] + phase[c]) for c in range(3)]
    arr = np.stack(chans, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def image_bytes(width: int, height: int, fmt: str = "jpeg", seed: int = 0, mode: str = "RGB",
                quality: int = 90) -> bytes:
    """Encoded bytes of `image_array` in a PIL format ('jpeg', 'png', 'webp' …) and mode."""
    img = Image.fromarray(image_array(width, height, seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt.lower() in ("jpeg", "jpg", "webp") else {}
    img.save(buf, format="JPEG" if fmt.lower() == "jpg" else fmt.upper(), **kwargs)
    return buf.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width×height (all black) in a few tens of KB: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 500) for _ in range(height // 500))
    idat += comp.compress(row * (height % 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_jpeg(arr: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """JPEG of the stored pixels `arr` with an EXIF Orientation tag (6 = rotate 90° clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="session")
def media():
    """Helpers for tests that need specific image bytes (no need to import conftest)."""
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


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


@pytest.fixture
def write_config(tmp_path):
    """Factory: write a run config; `sections` maps section → {key: value} (merged over [run]/[corpus])."""

    def _write(root: str | Path, sources, name: str = "dad.toml", **sections: dict) -> Path:
        srcs = [str(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
        data: dict[str, dict] = {"run": {"root": str(root)}, "corpus": {"sources": srcs}}
        for sec, values in sections.items():
            data.setdefault(sec, {}).update(values)
        text = "\n".join(f"[{sec}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in vals.items()) + "\n"
                         for sec, vals in data.items())
        path = tmp_path / name
        path.write_text(text)
        return path

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
