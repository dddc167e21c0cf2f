"""Model files by URL + sha256: fetched once, verified, reused; a mirror folder serves offline machines.

`resolve` returns a local path to bytes with the wanted digest, looking first in the mirror folders
(`run.model_mirror`, then `DAD_MODEL_MIRROR`; matched by digest, whatever the file's name), then in the
download cache (`run.model_cache`, `DAD_MODEL_CACHE`, default `~/.cache/dad/models`), and only then at the
URL, read once into the cache. Bytes with another digest are refused naming both digests; credentials
never appear in a message (`display`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import fsspec

from pipeline.redact import redact
from pipeline.storage import temp_file

MIRROR_ENV = "DAD_MODEL_MIRROR"
CACHE_ENV = "DAD_MODEL_CACHE"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MODEL_SUFFIXES = (".tflite", ".onnx", ".pt", ".pth", ".safetensors", ".bin")


class ModelFileError(ValueError):
    """A model file cannot be found, fetched or trusted; the message says what to do."""


def display(url: str) -> str:
    """The URL as messages and specs show it: without credentials or signatures (`redact`)."""
    return redact(url)


def is_remote(ref: str) -> bool:
    return "://" in ref and fsspec.utils.get_protocol(ref) not in ("file", "local")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _digest_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def digest(path: str | Path) -> str:
    """sha256 of a local file, cached per (path, size, mtime) within the process."""
    st = os.stat(path)
    return _digest_cached(str(path), st.st_size, st.st_mtime_ns)


def mirror_folders(extra: list[str] | None = None) -> list[str]:
    env = [p for p in os.environ.get(MIRROR_ENV, "").split(os.pathsep) if p]
    return [*(extra or []), *env]


def cache_folder(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dad" / "models").expanduser()


def find_in_mirrors(sha256: str, mirrors: list[str]) -> str | None:
    for folder in mirrors:
        base = Path(folder).expanduser()
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.suffix in MODEL_SUFFIXES and digest(f) == sha256:
                return str(f)
    return None


def resolve(ref: str, sha256: str | None = None, mirrors: list[str] | None = None,
            cache: str | None = None, what: str = "model") -> str:
    """A local path whose bytes have `sha256` (required for remote refs). See the module docstring."""
    if sha256 is not None and not SHA256.match(sha256):
        raise ModelFileError(f"{what}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    local = fsspec.core.strip_protocol(ref) if not is_remote(ref) else None
    if local is not None and sha256 is None:
        if not os.path.isfile(local):
            raise ModelFileError(f"{what}: model file {ref!r} not found")
        return local
    if sha256 is None:
        raise ModelFileError(f"{what}: a remote model ({display(ref)}) needs its sha256 (the key `sha256`), "
                             f"so that what is fetched can be trusted")
    if local is not None and os.path.isfile(local):
        return _checked(local, sha256, what, display(ref))
    hit = find_in_mirrors(sha256, mirror_folders(mirrors))
    if hit:
        return hit
    target = cache_folder(cache) / sha256
    if target.is_file():
        return _checked(str(target), sha256, what, f"the model cache ({target})")
    if local is not None:
        raise ModelFileError(f"{what}: model file {ref!r} not found and no mirror holds sha256 {sha256[:12]}…")
    return _fetch(ref, sha256, target, what, mirror_folders(mirrors))


def _checked(path: str, sha256: str, what: str, where: str) -> str:
    found = digest(path)
    if found != sha256:
        raise ModelFileError(f"{what}: {where} has sha256 {found}, but the config pins {sha256}: refusing it "
                             f"(a different or corrupted file; fix `sha256` or replace the file)")
    return path


def _fetch(url: str, sha256: str, target: Path, what: str, mirrors: list[str]) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = temp_file(str(target.parent), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(url, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sha256:
            raise ModelFileError(f"{what}: {display(url)} has sha256 {h.hexdigest()}, but the config pins "
                                 f"{sha256}: refusing it")
        os.replace(tmp, target)
    except ModelFileError:
        os.unlink(tmp)
        raise
    except Exception as err:  # noqa: BLE001 - any transport failure means "unreachable"
        os.unlink(tmp)
        searched = ", ".join(mirrors) or "none configured"
        raise ModelFileError(
            f"{what}: cannot fetch {display(url)} ({type(err).__name__}: {redact(str(err)).splitlines()[0][:200]}) and "
            f"no mirror holds sha256 {sha256[:12]}… (mirrors searched: {searched}). Offline? Put the file in a "
            f"folder and name it with `run.model_mirror = [\"DIR\"]` or {MIRROR_ENV}=DIR") from None
    return str(target)


def use_run_settings(mirrors: list[str], cache: str | None) -> None:
    """Make `run.model_mirror` / `run.model_cache` the process's defaults (absolute paths, inherited by a
    local Ray cluster and passed to a remote one by `pipeline.runtime.init_ray`)."""
    if mirrors:
        have = [p for p in os.environ.get(MIRROR_ENV, "").split(os.pathsep) if p]
        mine = [m if "://" in m else os.path.abspath(os.path.expanduser(m)) for m in mirrors]
        os.environ[MIRROR_ENV] = os.pathsep.join(dict.fromkeys([*mine, *have]))
    if cache:
        os.environ[CACHE_ENV] = os.path.abspath(os.path.expanduser(cache))


def graph_source(cfg) -> tuple[str, str, dict]:
    """A tflite student's starting model: (sha256, local path, GraphStudent options). `teacher:<name>` takes
    that teacher's file (URL + sha256 + mirror), output and input normalization."""
    ref, name = cfg.student.init_from, cfg.student.init_teacher
    if name is not None:
        tcfg = cfg.teachers[name]
        path = resolve(tcfg.model, tcfg.sha256, what=f"student.init_from ({ref})")
        space = "depth" if tcfg.output_space in ("depth", "metric_depth", "affine_depth") else "disparity"
        options = {"output_index": tcfg.output_index, "output_space": space, "mean": tcfg.input_mean,
                   "std": tcfg.input_std}
    else:
        path, options = resolve(ref, what="student.init_from"), {}
    return digest(path), path, options
