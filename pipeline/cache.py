"""The target cache: one Zarr v3 group per teacher, one Zarr shard per corpus shard (DESIGN §3–§4).

Arrays (N = number of corpus shards × shard_size slots; slot = shard·shard_size + index):

    global        (N, G, G)     float16   teacher prediction on the G×G global input
    local         (N, K, L, L)  float16   K local-patch predictions resampled to L×L
    global_valid  (N, G, G)     bool      finite pixels of `global`
    local_valid   (N, K, L, L)  bool

Inner chunks hold one sample (so training reads only the bytes it needs); outer shards hold exactly
one corpus shard, written in one call by one task — zarr-python loses data when two writers touch
one shard (STACK.md). Values are float16 through Blosc-zstd with byte shuffle: smooth depth maps
compress to well under a third of their float32 size (bench P4). Predictions are stored in the
teacher's declared output space; `as_disparity` converts when reading.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.storage import Root

ARRAYS = ("global", "local", "global_valid", "local_valid")


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


def cache_path(teacher: str) -> tuple[str, str]:
    return ("cache", teacher)


def open_cache(root: Root, teacher: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(root.zarr_store(*cache_path(teacher), read_only=mode == "r"), mode=mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no cached targets for teacher {teacher!r} in {root.url}: "
                                f"run `dad teach --teacher {teacher}`") from None


def ensure_cache(root: Root, teacher: str, n_shards: int, shard_size: int, g: int, k: int, l: int,
                 attrs: dict) -> zarr.Group:
    """Create the group and arrays if missing (or if their shape changed); always refresh attributes."""
    group = zarr.open_group(root.zarr_store(*cache_path(teacher)), mode="a")
    n = n_shards * shard_size
    shapes = {"global": (n, g, g), "local": (n, k, l, l), "global_valid": (n, g, g), "local_valid": (n, k, l, l)}
    existing = set(group.array_keys())
    for name, shape in shapes.items():
        if name in existing and group[name].shape == shape:
            continue
        is_mask = name.endswith("_valid")
        group.create_array(
            name, shape=shape, chunks=(1, *shape[1:]), shards=(shard_size, *shape[1:]),
            dtype="bool" if is_mask else "float16", fill_value=False if is_mask else np.nan,
            compressors=_compressor(), overwrite=True)
    group.attrs.update(attrs)
    return group


def write_shard(group: zarr.Group, shard: int, shard_size: int, global_pred: np.ndarray,
                local_pred: np.ndarray) -> dict:
    """Write one corpus shard's predictions (n ≤ shard_size samples) as whole Zarr shards."""
    n = global_pred.shape[0]
    g_valid = np.isfinite(global_pred)
    l_valid = np.isfinite(local_pred)

    def pad(a: np.ndarray, fill) -> np.ndarray:
        out = np.full((shard_size, *a.shape[1:]), fill, dtype=a.dtype)
        out[:n] = a
        return out

    start, stop = shard * shard_size, (shard + 1) * shard_size
    with np.errstate(over="ignore", invalid="ignore"):
        group["global"][start:stop] = pad(np.where(g_valid, global_pred, np.nan).astype(np.float16), np.nan)
        group["local"][start:stop] = pad(np.where(l_valid, local_pred, np.nan).astype(np.float16), np.nan)
    # float16 overflow (|x| > 65504) also makes a value invalid: recompute after the cast.
    g16, l16 = group["global"][start:start + n], group["local"][start:start + n]
    g_valid &= np.isfinite(g16)
    l_valid &= np.isfinite(l16)
    group["global_valid"][start:stop] = pad(g_valid, False)
    group["local_valid"][start:stop] = pad(l_valid, False)
    return {"invalid_global_px": int((~g_valid).sum()), "invalid_local_px": int((~l_valid).sum())}


def read_rows(group: zarr.Group, rows: list[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Read the four arrays for the given slots (orthogonal selection: only those chunks)."""
    rows = np.asarray(rows, dtype=np.int64)
    return {name: group[name].get_orthogonal_selection((rows,)) for name in ARRAYS}


def as_disparity(pred: np.ndarray, space: str, eps: float = 1e-6) -> np.ndarray:
    """Teacher output → disparity (larger = nearer). Depth-like spaces are inverted exactly."""
    if space == "disparity":
        return pred.astype(np.float32)
    if space in ("depth", "metric_depth", "affine_depth"):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pred > eps, 1.0 / np.maximum(pred.astype(np.float32), eps), np.nan).astype(np.float32)
    raise ValueError(f"unknown output space {space!r}")
