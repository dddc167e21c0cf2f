"""Reading the sharded corpus back: the manifest, and the samples of one WebDataset shard.

Shards stream through fsspec and WebDataset's tar iterators, so a shard on s3:// reads like one on disk.
A JPEG has no checksum, so integrity comes from the shard markers: `check_object` compares an object's
size or sha256 with its marker, `iter_shard(..., expect=...)` hashes the whole tar before yielding any
sample, and `require_intact_corpus` checks what a later stage will read (docs/run-root.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from webdataset import tariterators

from pipeline.crops import global_input
from pipeline.images import decode_trusted
from pipeline.layout import CORPUS_PARTS, CORPUS_SHARDS, MANIFEST, corpus_shard, rel_path, shard_name
from pipeline.ledger import Ledger
from pipeline.lineage import SHARD
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


VIEWS = {"webp": "global.webp", "ppm": "global.ppm"}  # `corpus.view` → the member holding a sample's G×G view


@dataclass(frozen=True)
class Sample:
    """One stored sample: its manifest row and its encoded members, decoded only when asked for."""

    record: dict
    members: dict[str, bytes]

    def region(self) -> np.ndarray:
        """The square region at its stored resolution (the teachers' local patches are cut from it)."""
        return decode_trusted(self.members["png"] if "png" in self.members else self.members["jpg"])

    def view(self, g: int) -> np.ndarray:
        """The G×G global view every teacher and the student see: `global_input` of the stored region.
        `dad shard` stores it, lossless, beside the region (`corpus.view`; decoding the WebP costs a third of
        decoding the region and resizing it, the raw PPM a thirtieth); a shard written without it, or at
        another G, has it computed: the same pixels."""
        for member in VIEWS.values():
            if member in self.members:
                view = decode_trusted(self.members[member])
                if view.shape[:2] == (g, g):
                    return view
        return global_input(self.region(), g)


def iter_shard(root: Root, shard: int, expect: dict | None = None) -> Iterator[Sample]:
    """Yield every sample of a shard, in shard order.

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
            members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
            yield Sample(json.loads(sample["json"]), members)


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


# -- checked against the shard markers (fp: the corpus fingerprint, `Lineage.shard`) ---------------------

def cell_objects(ledger: Ledger, fp: str, shards: list[int]) -> dict[int, dict | None]:
    """shard → the objects its marker vouches for ({path: {"bytes", "sha256"}}); None: a marker written
    before digests were recorded (or unreadable), so nothing can be checked."""
    out: dict[int, dict | None] = {}
    for s in shards:
        try:
            out[s] = ledger.info(SHARD, "_", shard_name(s), fp).get("objects")
        except (FileNotFoundError, ValueError):
            out[s] = None
    return out


def damaged_cells(root: Root, recorded: dict[int, dict | None], deep: bool, tars_only: bool = False
                  ) -> dict[int, str]:
    """shard → why, for cells whose stored objects differ from their marker (size; sha256 if deep)."""
    sizes = None if deep else {**object_sizes(root, *CORPUS_SHARDS), **object_sizes(root, *CORPUS_PARTS)}
    bad = {}
    for s, objs in recorded.items():
        for rel, want in (objs or {}).items():
            if tars_only and rel != shard_rel(s):
                continue
            why = check_object(root, rel, want, deep, sizes)
            if why:
                bad[s] = why
                break
    return bad


def verify_corpus(root: Root, fp: str, shards: list[int] | None = None, deep: bool = False) -> list[str]:
    """What differs from the shard markers among the files later stages read: the manifest, rejects and
    crop plan (always by sha256: small) and the tars of `shards` (default: all; by size, or sha256 if deep,
    streamed once). One line per damaged object, each naming `dad shard --verify`."""
    ledger = Ledger(root)
    try:
        final = ledger.info(SHARD, "_", "final", fp).get("objects") or {}
    except (FileNotFoundError, ValueError):
        final = {}
    bad = [why for rel, want in sorted(final.items()) if (why := check_object(root, rel, want, deep=True))]
    if shards is None:
        shards = sorted(int(c) for c in ledger.done(SHARD, "_", fp) if c.isdigit())
    return bad + [why for _, why in sorted(damaged_cells(root, cell_objects(ledger, fp, shards), deep,
                                                         tars_only=True).items())]


def require_intact_corpus(root: Root, fp: str, shards: list[int] | None = None, deep: bool = False) -> None:
    """Raise ShardCorruptError (one line, the first damaged object and how many more) if `verify_corpus`
    finds anything: no stage reads a corpus that differs from what `dad shard` wrote."""
    bad = verify_corpus(root, fp, shards, deep)
    if bad:
        more = f" (and {len(bad) - 1} more object(s))" if len(bad) > 1 else ""
        raise ShardCorruptError(f"the corpus in {root.url} is damaged: {bad[0]}{more}")


def tar_record(root: Root, fp: str, shard: int) -> dict | None:
    """The recorded digest of one shard's tar (None: none recorded), for `iter_shard(expect=...)`."""
    objs = cell_objects(Ledger(root), fp, [shard])[shard]
    return (objs or {}).get(shard_rel(shard))
