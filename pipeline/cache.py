"""The target cache: one Zarr v3 group per teacher, one Zarr shard per corpus shard.

Arrays `global` (N,G,G) and `local` (N,K,L,L) in float16 with their `*_valid` masks, one row per sample
(row = shard·shard_size + index), stored in the teacher's output space (`as_disparity` converts on read).
One task writes a whole Zarr shard: zarr-python loses data when two writers touch one. Corrupt bytes are
never trained on: every chunk carries a CRC32C, each teach marker records the size and sha256 of its shard
objects (`check_shard`), and the metadata documents are compared with what `ensure_cache` writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.layout import cache_group, shard_name
from pipeline.ledger import Ledger
from pipeline.lineage import TEACH
from pipeline.storage import Root

if TYPE_CHECKING:
    from pipeline.config import DadConfig

ARRAYS = ("global", "local", "global_valid", "local_valid")
NDIM = {"global": 3, "local": 4, "global_valid": 3, "local_valid": 4}
LAYOUT = 2  # 1: Blosc only; 2: Blosc + per-chunk CRC32C. Part of the teach cell fingerprint.


class CacheCorruptError(ValueError):
    """Cached targets that cannot be trusted; the message names the teacher, the shard and the fix."""


def _compressors() -> tuple:
    return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())


def open_cache(root: Root, teacher: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(root.zarr_store(*cache_group(teacher), read_only=mode == "r"), mode=mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no cached targets for teacher {teacher!r} in {root.url}: "
                                f"run `dad teach --teacher {teacher}`") from None


def ensure_cache(root: Root, teacher: str, n_shards: int, shard_size: int, g: int, k: int, l: int,
                 attrs: dict) -> zarr.Group:
    """Create the group and arrays if missing (or if their shape changed); always refresh attributes."""
    group = zarr.open_group(root.zarr_store(*cache_group(teacher)), mode="a")
    existing = set(group.array_keys()) if group.attrs.get("cache_layout") == LAYOUT else set()
    for name, shape in _shapes(n_shards, shard_size, g, k, l).items():
        if name in existing and group[name].shape == shape:
            continue
        _create_array(group, name, shape, shard_size)
    group.attrs.update({**attrs, "cache_layout": LAYOUT})
    return group


def _shapes(n_shards: int, shard_size: int, g: int, k: int, l: int) -> dict[str, tuple[int, ...]]:
    n = n_shards * shard_size
    return {"global": (n, g, g), "local": (n, k, l, l), "global_valid": (n, g, g), "local_valid": (n, k, l, l)}


def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], shard_size: int) -> None:
    is_mask = name.endswith("_valid")
    group.create_array(
        name, shape=shape, chunks=(1, *shape[1:]), shards=(shard_size, *shape[1:]),
        dtype="bool" if is_mask else "float16", fill_value=False if is_mask else np.nan,
        compressors=_compressors(), overwrite=True)


def reference_metadata(n_shards: int, shard_size: int, g: int, k: int, l: int, attrs: dict | None = None
                       ) -> dict[str, bytes]:
    """Store key → the `zarr.json` bytes `ensure_cache` writes (built in memory): each array's, and the
    group's when its `attrs` are given."""
    from zarr.storage import MemoryStore

    store: dict = {}
    group = zarr.open_group(MemoryStore(store), mode="w")
    for name, shape in _shapes(n_shards, shard_size, g, k, l).items():
        _create_array(group, name, shape, shard_size)
    if attrs is not None:
        group.attrs.update({**attrs, "cache_layout": LAYOUT})
    return {key: buf.to_bytes() for key, buf in store.items() if attrs is not None or key != "zarr.json"}


def metadata_problems(root: Root, teacher: str, reference: dict[str, bytes], reader_attrs: dict) -> dict[str, str]:
    """Store key → why, for each metadata document of the cache that a reader would misread: unreadable,
    an array's differing from `reference`, or a group attribute in `reader_attrs` (output space, shard size)
    with another value. {} for a cache not created yet, or one of an older layout (teach recreates it)."""
    def load(key: str):
        try:
            return json.loads(root.read_bytes(*cache_group(teacher), key))
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON (nor UTF-8): damaged
            return "unreadable"

    group = load("zarr.json")
    if group is None and not root.exists(*cache_group(teacher)):
        return {}
    out = {}
    attrs = group.get("attributes") if isinstance(group, dict) else None
    if not isinstance(attrs, dict) or group.get("node_type") != "group":
        out["zarr.json"] = "missing" if group is None else "not readable as the group's metadata"
    elif attrs.get("cache_layout") != LAYOUT:
        return {}
    elif wrong := [key for key, value in reader_attrs.items() if attrs.get(key) != value]:
        out["zarr.json"] = f"attribute(s) {', '.join(wrong)} differ from the teacher's settings"
    for key, want in reference.items():
        if key == "zarr.json":
            continue
        got = load(key)
        if got != json.loads(want):
            out[key] = ("missing" if got is None else "not readable as JSON" if got == "unreadable"
                        else "differs from what teach writes")
    return out


def repair_metadata(root: Root, teacher: str, keys, reference: dict[str, bytes]) -> None:
    """Rewrite the given metadata documents with `reference` (from `reference_metadata` with attrs).
    Chunks are left alone: only what describes them is restored."""
    for key in keys:
        root.write_bytes(reference[key], *cache_group(teacher), key)


def write_shard(group: zarr.Group | Mapping[str, zarr.Array], shard: int, shard_size: int,
                global_pred: np.ndarray, local_pred: np.ndarray) -> dict:
    """Write one corpus shard's predictions (n ≤ shard_size samples) as whole Zarr shards.

    A value is invalid (mask False, stored NaN) if it is NaN/inf or overflows float16 (|x| > 65504).
    The float16 cast happens here, so nothing is read back from the store. `group` may also be a dict
    of the four opened arrays (`open_arrays`): a worker writing many shards then reads no metadata."""
    n = global_pred.shape[0]

    def pad(a: np.ndarray, fill) -> np.ndarray:
        out = np.full((shard_size, *a.shape[1:]), fill, dtype=a.dtype)
        out[:n] = a
        return out

    start, stop = shard * shard_size, (shard + 1) * shard_size
    arrays = {name: group[name] for name in ARRAYS}
    _drop_shard(arrays, shard)
    invalid = {}
    for name, pred in (("global", global_pred), ("local", local_pred)):
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.asarray(pred).astype(np.float16)
        valid = np.isfinite(values)
        values[~valid] = np.nan
        arrays[name][start:stop] = pad(values, np.nan)
        arrays[f"{name}_valid"][start:stop] = pad(valid, False)
        invalid[name] = int((~valid).sum())
    return {"invalid_global_px": invalid["global"], "invalid_local_px": invalid["local"]}


def _drop_shard(arrays: Mapping[str, zarr.Array], shard: int) -> None:
    """Delete the stored shard objects a whole-shard write replaces. zarr-python reads an existing shard
    before writing into it, even when the write covers all of it: a corrupt shard (the reason it is being
    recomputed) would fail that read, and a sound one would be read for nothing."""
    from zarr.core.sync import sync

    for name, arr in arrays.items():
        sp = arr.store_path
        sync(sp.store.delete("/".join(p for p in (sp.path, *shard_key(name, shard).split("/")[1:]) if p)))


def open_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    """The four arrays of a cache group, opened once (each `group[name]` reads metadata from the store)."""
    return {name: group[name] for name in ARRAYS}


# Cache layouts whose validity masks are exactly "the stored value is finite" (`write_shard` stores NaN
# wherever a pixel is invalid and re-checks finiteness after the float16 cast).
MASK_IS_FINITE_LAYOUTS = {None, 1, 2}


class CacheReader:
    """A teacher's cache opened for reading once: its arrays (each `group[name]` re-reads metadata from the
    store, which costs more than the data at small sizes) and, for known layouts, masks derived from the
    values (half the reads, the same result). Usable wherever a group is (`read_rows(reader, rows)`)."""

    def __init__(self, group: zarr.Group):
        self.attrs, self.store, self._arrays = group.attrs, group.store, open_arrays(group)
        self.masks_implied = group.attrs.get("cache_layout") in MASK_IS_FINITE_LAYOUTS

    def __getitem__(self, name: str) -> zarr.Array:
        return self._arrays[name]

    def rows(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The four arrays of `rows`, one basic slice per row (an orthogonal selection over a sharded array
        costs ~4× more per row)."""
        if not self.masks_implied:
            return read_rows(self, rows)
        return self.values_and_masks(rows, lambda arr: np.stack([arr[int(r)] for r in rows]))

    def span(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows lo … hi − 1 in one slice per array: ~1.2 ms a row at the quickstart's sizes, against ~4 ms for
        a row read alone (the cost of a Zarr read is per call)."""
        if not self.masks_implied:
            return read_rows(self, list(range(lo, hi)))
        return self.values_and_masks(range(lo, hi), lambda arr: arr[lo:hi])

    def values_and_masks(self, rows, read) -> dict[str, np.ndarray]:
        """`read(array)` of the two value arrays, and the masks they imply."""
        out = {}
        for name in ("global", "local"):
            try:
                out[name] = read(self[name])
            except Exception as err:  # noqa: BLE001 - whatever the codec raised, the cause is the stored bytes
                raise _undecodable(self, name, rows, err) from err
        return {**out, "global_valid": np.isfinite(out["global"]), "local_valid": np.isfinite(out["local"])}


def _undecodable(group, name: str, rows, err: Exception) -> CacheCorruptError:
    """The one message for stored bytes that do not decode: the teacher, the corpus shards, the repair."""
    teacher = str(group.attrs.get("teacher", {}).get("name", group.store))
    size = int(group.attrs.get("shard_size") or group[name].shards[0])
    shards = sorted({int(r) // size for r in rows})
    return CacheCorruptError(
        f"cached targets of teacher {teacher!r} ({name}, corpus shard(s) {shards}) cannot be decoded: "
        f"{type(err).__name__}: {err}. The cache is corrupt; recompute it with "
        f"`dad teach --verify --teacher {teacher}`")


def read_rows(group: zarr.Group, rows: list[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Read the four arrays for the given slots (orthogonal selection: only those chunks).

    A chunk that fails to decode (checksum, codec or I/O error on a stored object) raises
    `CacheCorruptError` naming the teacher and corpus shard: corrupt bytes are never returned."""
    rows = np.asarray(rows, dtype=np.int64)
    out = {}
    for name in ARRAYS:
        try:
            out[name] = group[name].get_orthogonal_selection((rows,))
        except Exception as err:  # noqa: BLE001 - whatever the codec raised, the cause is the stored bytes
            raise _undecodable(group, name, rows, err) from err
    return out


# -- integrity of stored shards ----------------------------------------------------------------

def shard_key(name: str, shard: int) -> str:
    """Store key of the Zarr shard object holding corpus shard `shard` of array `name`."""
    return "/".join([name, "c", str(shard), *["0"] * (NDIM[name] - 1)])


def shard_digests(root: Root, teacher: str, shard: int) -> dict[str, dict | None]:
    """array → {"bytes", "sha256"} of its stored shard object (None: not stored, every value is the fill)."""
    out: dict[str, dict | None] = {}
    for name in ARRAYS:
        try:
            data = root.read_bytes(*cache_group(teacher), shard_key(name, shard))
        except FileNotFoundError:
            out[name] = None
            continue
        out[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def check_shard(root: Root, teacher: str, shard: int, recorded: dict | None, deep: bool,
                sizes: dict[str, int] | None = None) -> str | None:
    """Why corpus shard `shard` of `teacher`'s cache no longer matches its teach marker (None: it does).

    `recorded` is the marker's `objects` entry. Cheap (deep=False): each object exists with its recorded
    size (`sizes`: store key → size from one listing, else one lookup per object). Deep: sha256 too."""
    if not isinstance(recorded, dict) or set(recorded) != set(ARRAYS):
        return "its teach marker records no checksums (written by an older version)"
    for name in ARRAYS:
        want, key = recorded[name], shard_key(name, shard)
        if deep:
            got = shard_digests(root, teacher, shard)[name]
            if got != want:
                what = "missing" if got is None else ("present but should not be" if want is None else
                                                      f"{got['bytes']} bytes, sha256 {got['sha256'][:12]}…")
                expect = "absent" if want is None else f"{want['bytes']} bytes, sha256 {want['sha256'][:12]}…"
                return f"{key}: {what}; its teach marker recorded {expect}"
            continue
        if sizes is not None:
            size = sizes.get(key)
        else:
            try:
                size = root.fs.size(root.path(*cache_group(teacher), key))
            except FileNotFoundError:
                size = None
        if (size is None) != (want is None) or (want is not None and size != want["bytes"]):
            return f"{key}: {'missing' if size is None else f'{size} bytes'}; its teach marker recorded " \
                   f"{'absent' if want is None else str(want['bytes']) + ' bytes'}"
    return None


def object_sizes(root: Root, teacher: str) -> dict[str, int]:
    """Store key (relative to the teacher's group) → size, for every stored object, in one listing."""
    base = root.path(*cache_group(teacher)).rstrip("/") + "/"
    try:
        found = root.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    strip = base.lstrip("/")
    return {path.lstrip("/")[len(strip):]: int(info["size"]) for path, info in found.items()
            if path.lstrip("/").startswith(strip)}


def as_disparity(pred: np.ndarray, space: str, eps: float = 1e-6) -> np.ndarray:
    """Teacher output → disparity (larger = nearer). Depth-like spaces are inverted exactly."""
    if space == "disparity":
        return pred.astype(np.float32)
    if space in ("depth", "metric_depth", "affine_depth"):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pred > eps, 1.0 / np.maximum(pred.astype(np.float32), eps), np.nan).astype(np.float32)
    raise ValueError(f"unknown output space {space!r}")


# -- checked against the teach markers --------------------------------------------------------------

def verify_cells(root: Root, name: str, fp: str, shards: list[int], deep: bool) -> dict[int, str]:
    """Done cells of `name` whose stored shard objects no longer match their marker: shard → why.

    Cheap (deep=False): one listing of the cache's object sizes, one read per marker. Deep: sha256 of every
    stored shard object (reads the whole cache of that teacher)."""
    ledger = Ledger(root)
    sizes = None if deep else object_sizes(root, name)
    bad = {}
    for s in shards:
        try:
            recorded = ledger.info(TEACH, name, shard_name(s), fp).get("objects")
        except (FileNotFoundError, ValueError) as err:
            bad[s] = f"unreadable teach marker: {type(err).__name__}: {err}"
            continue
        why = check_shard(root, name, s, recorded, deep=deep, sizes=sizes)
        if why:
            bad[s] = why
    return bad


def reader_attrs(cfg: DadConfig, output_space: str) -> dict:
    """The cache attributes readers act on: how values convert to disparity, and slot → shard."""
    return {"output_space": output_space, "shard_size": cfg.corpus.shard_size}


def require_intact_metadata(root: Root, cfg: DadConfig, spaces: dict[str, str], shards: list[int]) -> None:
    """Raise CacheCorruptError if a teacher's cache metadata would be misread (naming the document and the
    command that rewrites it); cheap: five small documents per teacher."""
    c = cfg.crops
    reference = reference_metadata(max(shards) + 1, cfg.corpus.shard_size, c.global_size, c.local_count, c.local_store)
    for name, space in spaces.items():
        damaged = metadata_problems(root, name, reference, reader_attrs(cfg, space))
        if damaged:
            key, why = min(damaged.items())
            raise CacheCorruptError(f"cached targets of teacher {name!r} cannot be read as written: cache/{name}/{key} "
                                    f"{why}; rewrite it with `dad teach --verify --teacher {name}`, then rerun")
