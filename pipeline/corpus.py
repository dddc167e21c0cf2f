"""Reading the sharded corpus back: the manifest, and the samples of one WebDataset shard.

Shards are read as a byte stream through fsspec and split with WebDataset's own tar iterators, so
a shard on s3:// streams exactly like one on disk. Decoding is of our own shards (trusted PNG/JPEG).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from webdataset import tariterators

from pipeline.images import decode_trusted
from pipeline.storage import Root


def manifest(root: Root, columns: list[str] | None = None) -> pa.Table:
    if not root.exists("corpus", "manifest.parquet"):
        raise FileNotFoundError(f"no corpus at {root.url}: run `dad shard` first")
    return root.read_table("corpus", "manifest.parquet", columns=columns)


def shard_ids(root: Root) -> list[int]:
    return sorted(set(manifest(root, ["shard"]).column("shard").to_pylist()))


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def iter_shard(root: Root, shard: int, decode: bool = True) -> Iterator[tuple[dict, np.ndarray | bytes]]:
    """Yield (record, rgb) for every sample of a shard, in shard order."""
    url = root.uri("corpus", "shards", f"{shard_name(shard)}.tar")
    with root.fs.open(root.path("corpus", "shards", f"{shard_name(shard)}.tar"), "rb") as f:
        files = ({**entry, "__url__": url} for entry in tariterators.tar_file_iterator(f))
        for sample in tariterators.group_by_keys(files):
            record = json.loads(sample["json"])
            image = sample.get("png", sample.get("jpg"))
            yield record, decode_trusted(image) if decode else image
