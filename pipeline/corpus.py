"""Reading the sharded corpus back: the manifest, and the samples of one WebDataset shard.

Shards are read as a byte stream through fsspec and split with WebDataset's own tar iterators, so
a shard on s3:// streams exactly like one on disk. Decoding is of our own shards (trusted PNG/JPEG).

Integrity (issue #19): a JPEG has no checksum, so a flipped byte in a shard decodes to plausible wrong
pixels. The shard stage records each written object's size and sha256 in its marker; `check_object`
compares them (size only, or sha256 streamed in chunks), and `iter_shard(..., expect=...)` hashes the
whole tar once before yielding any sample, so a stage never reads bytes that differ from what was written.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from webdataset import tariterators

from pipeline.images import decode_trusted
from pipeline.layout import MANIFEST, corpus_shard, rel_path
from pipeline.storage import Root


def manifest(root: Root, columns: list[str] | None = None) -> pa.Table:
    if not root.exists(*MANIFEST):
        raise FileNotFoundError(f"no corpus at {root.url}: run `dad shard` first")
    return root.read_table(*MANIFEST, columns=columns)


def shard_ids(root: Root) -> list[int]:
    return sorted(set(manifest(root, ["shard"]).column("shard").to_pylist()))


def shard_rel(shard: int) -> str:
    """The tar's path under the root, as markers and messages name it."""
    return rel_path(corpus_shard(shard))


def iter_shard(root: Root, shard: int, decode: bool = True, expect: dict | None = None
               ) -> Iterator[tuple[dict, np.ndarray | bytes]]:
    """Yield (record, rgb) for every sample of a shard, in shard order.

    `expect` ({"bytes", "sha256"} from the shard's marker): the tar is read once, checked, and only then
    split, so no sample of a shard that differs from what was written is ever yielded."""
    url = root.uri(*corpus_shard(shard))
    with root.fs.open(root.path(*corpus_shard(shard)), "rb") as f:
        if expect is not None:
            data = f.read()
            if digest_of(data) != expect:
                raise ShardCorruptError(mismatch(shard_rel(shard), digest_of(data), expect))
            f = io.BytesIO(data)
        files = ({**entry, "__url__": url} for entry in tariterators.tar_file_iterator(f))
        for sample in tariterators.group_by_keys(files):
            record = json.loads(sample["json"])
            image = sample.get("png", sample.get("jpg"))
            yield record, decode_trusted(image) if decode else image


# -- integrity of stored corpus objects ---------------------------------------------------------

class ShardCorruptError(ValueError):
    """A corpus object that differs from what its marker recorded; the message names it and the fix."""


def digest_of(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(root: Root, rel: str) -> dict | None:
    """{"bytes", "sha256"} of a stored object, streamed in 4 MiB chunks (None: it does not exist)."""
    h, n = hashlib.sha256(), 0
    try:
        with root.fs.open(root.path(rel), "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return None
    return {"bytes": n, "sha256": h.hexdigest()}


def mismatch(rel: str, got: dict | None, want: dict, fix: str = "restore it with `dad shard --verify`") -> str:
    """One line: what `rel` is, what its marker recorded, and the command that restores it."""
    what = "missing" if got is None else f"{got['bytes']} bytes" + (
        f", sha256 {got['sha256'][:12]}…" if "sha256" in got else "")
    return f"{rel}: {what}; its shard marker recorded {want['bytes']} bytes, sha256 {want['sha256'][:12]}…: {fix}"


def check_object(root: Root, rel: str, want: dict, deep: bool, sizes: dict[str, int] | None = None) -> str | None:
    """Why `rel` no longer matches its recorded digest (None: it does). Cheap: size (`sizes`: path → size
    from one listing, else one lookup); deep: sha256 too."""
    if deep:
        got = file_digest(root, rel)
    elif sizes is not None:
        got = {"bytes": sizes[rel]} if rel in sizes else None
    else:
        try:
            got = {"bytes": int(root.fs.size(root.path(rel)))}
        except FileNotFoundError:
            got = None
    same = got is not None and got["bytes"] == want["bytes"] and got.get("sha256", want["sha256"]) == want["sha256"]
    return None if same else mismatch(rel, got, want)


def object_sizes(root: Root, *folder: str) -> dict[str, int]:
    """Path under the root → size, for every object under `folder`, in one listing."""
    try:
        found = root.fs.ls(root.path(*folder), detail=True)
    except FileNotFoundError:
        return {}
    return {"/".join([*folder, e["name"].rstrip("/").rsplit("/", 1)[-1]]): int(e["size"])
            for e in found if e.get("type") != "directory"}
