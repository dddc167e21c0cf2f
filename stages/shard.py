"""Shard stage: an unlabeled corpus → WebDataset tar shards, a manifest, rejects and the crop plan.

1. **List** every source (folders, globs, tars, URI lists) and hash every entry in Ray tasks;
   `corpus/listing.parquet` records uri, sha256 and any early reject. Sample ids are content
   hashes, so exact duplicates collapse to one sample and the rest are recorded as duplicates.
2. **Assign** unique samples to shards of `corpus.shard_size` in sample-id order (a content-hash
   order: shards mix sources, and the assignment depends on nothing but the inputs).
3. **Write** one Ray task per unfinished shard: decode (rejecting bad images with a reason), draw
   the crop plan from (seed, sample_id), cut the global region at native resolution (capped at
   `corpus.max_region`), encode, and write `corpus/shards/NNNNNN.tar` plus its manifest/reject
   parts; then its ledger marker. Same inputs and config → byte-identical shards, whatever the
   number of workers or crashes in between.
4. **Finalize**: concatenate the parts into `corpus/manifest.parquet`, `corpus/rejects.parquet`
   and `crops/plan.parquet`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import webdataset as wds

from pipeline.config import DadConfig, fingerprint
from pipeline.crops import PLAN_VERSION, plan_crops
from pipeline.images import Rejected, decode_rgb, encode, resize
from pipeline.ledger import Ledger, check_recorded, stage_lock
from pipeline.runtime import executor_for
from pipeline.sources import Unit, expand_sources, read_unit
from pipeline.storage import Root

log = logging.getLogger("dad.shard")
STAGE = "shard"

MANIFEST_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("row", pa.int64()), ("shard", pa.int32()), ("index", pa.int32()),
    ("source_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("region_x0", pa.int32()), ("region_y0", pa.int32()), ("region_side", pa.int32()),
    ("stored_side", pa.int32()), ("patch", pa.int32()), ("boxes", pa.list_(pa.list_(pa.float64()))),
    ("sha256", pa.string()),
])
REJECT_SCHEMA = pa.schema([("source_uri", pa.string()), ("reason", pa.string())])


def shard_fingerprint(cfg: DadConfig) -> str:
    return fingerprint({"cfg": cfg.section_fingerprint("run.seed", "corpus", "crops"), "plan": PLAN_VERSION})


@dataclass
class ShardJob:
    shard: int
    items: list[tuple[str, str]]          # (uri, sha256) in shard order


# -- step 1: listing ------------------------------------------------------------------------

def hash_unit(unit: Unit, extensions: list[str]) -> list[dict]:
    rows = []
    for uri, data in read_unit(unit, extensions):
        if isinstance(data, Rejected):
            rows.append({"uri": uri, "sha256": None, "nbytes": 0, "reason": str(data)})
        elif len(data) == 0:
            rows.append({"uri": uri, "sha256": None, "nbytes": 0, "reason": "zero bytes"})
        else:
            rows.append({"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data),
                         "reason": None})
    return rows


def list_corpus(root: Root, cfg: DadConfig, ex, ledger: Ledger, fp: str) -> pa.Table:
    if ledger.is_done(STAGE, "_", "listing", fp):
        return root.read_table("corpus", "listing.parquet")
    units, early = expand_sources(cfg.corpus.sources, cfg.corpus.extensions)
    rows = [{"uri": r["source_uri"], "sha256": None, "nbytes": 0, "reason": r["reason"]} for r in early]
    hash_fn = partial(hash_unit, extensions=cfg.corpus.extensions)
    for _, unit_rows in ex.map(hash_fn, units, description="listing"):
        rows.extend(unit_rows)
    rows.sort(key=lambda r: r["uri"])
    first_by_hash: dict[str, str] = {}
    for r in rows:
        if r["sha256"] and r["reason"] is None:
            if r["sha256"] in first_by_hash:
                r["reason"] = f"duplicate of {first_by_hash[r['sha256']]}"
            else:
                first_by_hash[r["sha256"]] = r["uri"]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("uri", pa.string()), ("sha256", pa.string()), ("nbytes", pa.int64()), ("reason", pa.string())]))
    root.write_table(table, "corpus", "listing.parquet")
    ledger.mark(STAGE, "_", "listing", fp, {"entries": len(rows)})
    return table


# -- step 2: assignment ---------------------------------------------------------------------

def assign(listing: pa.Table, shard_size: int) -> list[ShardJob]:
    good = [(r["sha256"], r["uri"]) for r in listing.to_pylist() if r["reason"] is None]
    good.sort()
    return [ShardJob(i // shard_size, [(uri, sha) for sha, uri in good[i:i + shard_size]])
            for i in range(0, len(good), shard_size)]


# -- step 3: one shard ------------------------------------------------------------------------

def _units_for(items: list[tuple[str, str]]) -> list[Unit]:
    """Group a shard's items by how they are read (files, tars, generated sources)."""
    generated = {"scenes": [], "skimage": []}
    files, tars = [], set()
    for uri, _ in items:
        kind = uri.split(":", 1)[0]
        if kind in generated:
            generated[kind].append(uri)
        elif ".tar#" in uri:  # `<tar-url>#<member>` (sources.read_unit); a plain file name may contain '#'
            tars.add(uri[:uri.index(".tar#") + 4])
        else:
            files.append(uri)
    units = ([Unit("files", files)] if files else []) + [Unit("tar", [t]) for t in sorted(tars)]
    return units + [Unit(kind, uris) for kind, uris in generated.items() if uris]


def write_shard(job: ShardJob, root: Root, cfg: DadConfig, fp: str) -> dict:
    """Read, validate, crop and encode one shard's samples; write tar + parts; then the marker."""
    c, k = cfg.corpus, cfg.crops
    wanted = {uri for uri, _ in job.items}
    blobs: dict[str, bytes | Rejected] = {}
    for unit in _units_for(job.items):
        for uri, data in read_unit(unit, c.extensions, wanted=wanted):
            blobs[uri] = data
    manifest, rejects = [], []
    buf = io.BytesIO()
    with wds.TarWriter(buf, user="dad", group="dad", mtime=0.0, encoder=False) as tar:
        for uri, sha in job.items:
            data = blobs.get(uri, Rejected("vanished between listing and sharding"))
            try:
                if isinstance(data, Rejected):
                    raise data
                if hashlib.sha256(data).hexdigest() != sha:
                    raise Rejected("content changed between listing and sharding")
                rgb = decode_rgb(data, c.max_pixels, c.min_side, c.max_aspect)
            except Rejected as why:
                rejects.append({"source_uri": uri, "reason": str(why)})
                continue
            sample_id = sha[:16]
            h, w = rgb.shape[:2]
            plan = plan_crops(sample_id, w, h, cfg.run.seed, k.min_region, k.patch, k.local_count)
            x0, y0, s = plan.region
            stored = min(s, c.max_region)
            region = resize(rgb[y0:y0 + s, x0:x0 + s], (stored, stored))
            index = len(manifest)
            row = {"sample_id": sample_id, "row": job.shard * c.shard_size + index, "shard": job.shard,
                   "index": index, "source_uri": uri, "width": w, "height": h, "region_x0": x0,
                   "region_y0": y0, "region_side": s, "stored_side": stored, "patch": plan.patch,
                   "boxes": [list(b) for b in plan.boxes], "sha256": sha}
            ext = "png" if c.image_format == "png" else "jpg"
            tar.write({"__key__": sample_id, ext: encode(region, c.image_format, c.jpeg_quality),
                       "json": json.dumps(row, sort_keys=True).encode()})
            manifest.append(row)
    name = f"{job.shard:06d}"
    root.write_bytes(buf.getvalue(), "corpus", "shards", f"{name}.tar")
    root.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), "corpus", "parts", f"{name}.manifest.parquet")
    root.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), "corpus", "parts", f"{name}.rejects.parquet")
    info = {"samples": len(manifest), "rejects": len(rejects)}
    Ledger(root).mark(STAGE, "_", name, fp, info)
    return info


# -- step 4: finalize --------------------------------------------------------------------------

def finalize(root: Root, listing: pa.Table, jobs: list[ShardJob]) -> tuple[pa.Table, pa.Table]:
    parts = [root.read_table("corpus", "parts", f"{j.shard:06d}.manifest.parquet") for j in jobs]
    manifest = pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()
    early = [{"source_uri": r["uri"], "reason": r["reason"]} for r in listing.to_pylist() if r["reason"]]
    late = [root.read_table("corpus", "parts", f"{j.shard:06d}.rejects.parquet") for j in jobs]
    rejects = pa.concat_tables([pa.Table.from_pylist(early, schema=REJECT_SCHEMA), *late])
    root.write_table(manifest, "corpus", "manifest.parquet")
    root.write_table(rejects, "corpus", "rejects.parquet")
    plan_cols = ["sample_id", "row", "region_x0", "region_y0", "region_side", "stored_side", "patch", "boxes"]
    root.write_table(manifest.select(plan_cols), "crops", "plan.parquet")
    return manifest, rejects


def run(cfg: DadConfig, address: str | None = None, break_lock: bool = False) -> dict:
    """Shard the corpus (idempotent: finished shards are never redone)."""
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger = Ledger(root)
    with stage_lock(root, STAGE, break_lock=break_lock, command="dad shard"):
        check_recorded(root, cfg, STAGE)
        fp = shard_fingerprint(cfg)
        ex = executor_for(cfg.run, root.process_local, address)
        listing = list_corpus(root, cfg, ex, ledger, fp)
        jobs = assign(listing, cfg.corpus.shard_size)
        done = ledger.done(STAGE, "_", fp)
        todo = [j for j in jobs if f"{j.shard:06d}" not in done]
        for _ in ex.map(partial(write_shard, root=root, cfg=cfg, fp=fp), todo, description="shard"):
            pass
        manifest, rejects = finalize(root, listing, jobs)
        summary = {"stage": STAGE, "shards": len(jobs), "written": len(todo), "skipped": len(jobs) - len(todo),
                   "samples": manifest.num_rows, "rejects": rejects.num_rows,
                   "seconds": round(time.time() - t0, 2), "fingerprint": fp}
        ledger.mark(STAGE, "_", "final", fp, summary)
    return summary


def status(cfg: DadConfig, root: Root) -> list[dict]:
    ledger, fp = Ledger(root), shard_fingerprint(cfg)
    markers = ledger.markers(STAGE, "_")
    cells = {c: fps for c, fps in markers.items() if c not in ("listing", "final")}
    done = sum(fp in fps for fps in cells.values())
    stale = sum(fp not in fps for fps in cells.values())
    total = done
    if ledger.is_done(STAGE, "_", "listing", fp):
        total = len(assign(root.read_table("corpus", "listing.parquet"), cfg.corpus.shard_size))
    note = "complete" if ledger.is_done(STAGE, "_", "final", fp) else ("not started" if not markers else "incomplete")
    return [{"stage": STAGE, "scope": "corpus", "done": done, "total": total, "stale": stale, "note": note}]
