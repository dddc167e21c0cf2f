"""Shard stage: an unlabeled corpus → WebDataset tar shards, a manifest, rejects and the crop plan.

Every source entry is listed and hashed (sample id = content hash; duplicates are recorded), unique
samples are assigned to shards in sample-id order, and one Ray task per unfinished shard decodes, draws
the crop plan, cuts the region (stored with its G×G global view, `corpus.view`), writes the tar and its
parts, then its marker with their digests; the parts are finally concatenated into the manifest, rejects
and plan. Same inputs and config → byte-identical shards. A damaged cell is rebuilt only into its recorded
bytes, and changed sources are refused (shard them into a new --root). Paths, markers and checks:
docs/run-root.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from functools import partial

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.config import DadConfig
from pipeline.corpus import (
    VIEWS,
    ShardCorruptError,
    cell_objects,
    check_object,
    damaged_cells,
    digest_of,
    file_digest,
    mismatch,
    shard_rel,
    verify_corpus,
)
from pipeline.crops import global_input, plan_crops
from pipeline.images import Rejected, decode_rgb, decode_trusted, encode, resize
from pipeline.layout import (
    CROP_PLAN,
    LISTING,
    MANIFEST,
    REJECTS,
    SOURCES,
    corpus_part,
    corpus_shard,
    rel_path,
    shard_name,
)
from pipeline.ledger import Ledger, stage_lock
from pipeline.lineage import Lineage, check_recorded
from pipeline.redact import public
from pipeline.runtime import executor_for
from pipeline.sources import Fetch, Unit, expand_sources, private_uris, read_unit, transport_options
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
FINAL_FILES = tuple(rel_path(p) for p in (MANIFEST, REJECTS, CROP_PLAN))
SIGNATURE = SOURCES


class SourcesChangedError(ValueError):
    """The sources differ from those the corpus was listed from; the message says how."""


@dataclass
class ShardJob:
    shard: int
    items: list[tuple[str, str]]          # (uri, sha256) in shard order
    expect: dict | None = None            # a repair: the tar must rebuild into exactly these bytes
    view: str | None = None               # the view format (`corpus.view`); a repair: as its marker says


# -- step 1: listing ------------------------------------------------------------------------

def hash_unit(unit: Unit, extensions: list[str], fetch: Fetch | None = None) -> list[dict]:
    rows = []
    for uri, data in read_unit(unit, extensions, fetch=fetch):
        if isinstance(data, Rejected):
            rows.append({"uri": uri, "sha256": None, "nbytes": 0, "reason": str(data)})
        elif len(data) == 0:
            rows.append({"uri": uri, "sha256": None, "nbytes": 0, "reason": "zero bytes"})
        else:
            rows.append({"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data),
                         "reason": None})
    return rows


def list_corpus(root: Root, cfg: DadConfig, ex, ledger: Ledger, fp: str) -> pa.Table:
    want = None
    if ledger.is_done(STAGE, "_", "listing", fp):
        want = ledger.info(STAGE, "_", "listing", fp).get("objects", {}).get("corpus/listing.parquet")
        why = want and check_object(root, "corpus/listing.parquet", want, deep=True)
        if not why:
            return root.read_table(*LISTING)
        log.warning("shard: %s: listing the sources again", why.rsplit(":", 1)[0])
    signature = source_signature(cfg.corpus.sources, cfg.corpus.timeout)  # before hashing: a file changed meanwhile shows later
    units, early = expand_sources(cfg.corpus.sources, cfg.corpus.extensions, Fetch.of(cfg.corpus))
    rows = [{"uri": r["source_uri"], "sha256": None, "nbytes": 0, "reason": r["reason"]} for r in early]
    hash_fn = partial(hash_unit, extensions=cfg.corpus.extensions, fetch=Fetch.of(cfg.corpus))
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
    data = parquet_bytes(table)
    if want is not None and digest_of(data) != want:  # a damaged listing is repaired only into what was recorded
        raise ShardCorruptError(
            f"corpus/listing.parquet is damaged and listing the sources again gives another listing: the "
            f"sources changed since `dad shard` ({describe_changes(listing_changes(root, cfg) or {})}); "
            f"restore them, or shard them into a new --root")
    sig = parquet_bytes(pa.Table.from_pylist([{"uri": u, "stamp": st} for u, st in sorted(signature.items())],
                                             schema=pa.schema([("uri", pa.string()), ("stamp", pa.string())])))
    root.write_bytes(sig, *SIGNATURE)
    root.write_bytes(data, *LISTING)
    objects = {"corpus/listing.parquet": digest_of(data), "/".join(SIGNATURE): digest_of(sig)}
    # `private`: how many files or tars the listing names by a public form that is not their URI (credentials,
    # odd names); a rerun that has shards left to write lists the sources again to read them (`private_for`).
    ledger.mark(STAGE, "_", "listing", fp, {"entries": len(rows), "objects": objects,
                                            "private": len(private_uris(units))})
    return table


def private_for(cfg: DadConfig, ledger: Ledger, fp: str) -> dict[str, str]:
    """public → real URI of the entries the listing stores only by their public form (in memory only). A
    listing marker without `private` was written before public forms existed: it stored real URIs."""
    if not ledger.info(STAGE, "_", "listing", fp).get("private"):
        return {}
    return private_uris(expand_sources(cfg.corpus.sources, cfg.corpus.extensions, Fetch.of(cfg.corpus))[0])


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as `Root.write_table` stores it, as bytes: what a marker's digest is taken of."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def source_signature(sources: list[str], timeout: float = Fetch.timeout) -> dict[str, str]:
    """uri → "size mtime" of every file the sources name (a URI list: the list file itself; generated
    sources: their spec). Metadata only, no file is read: cheap enough for every `dad status`. URIs in
    their public form (no credentials), network waits bounded by `timeout` (corpus.timeout)."""
    out: dict[str, str] = {}
    for src in sources:
        if src.startswith(("scenes:", "skimage:")):
            out[src] = "generated"
            continue
        try:
            fs, path = fsspec.core.url_to_fs(src, **transport_options(src, timeout))
            if any(c in src for c in "*?["):
                found = fs.glob(path, detail=True)
            elif fs.isdir(path):
                found = fs.find(path, detail=True)
            else:
                found = {path: fs.info(path)} if fs.exists(path) else {}
        except (OSError, ValueError):
            continue  # unreadable now: its files count as removed
        local = fsspec.utils.get_protocol(src) in ("file", "local") and "://" not in src
        for p, info in found.items():
            if info.get("type") == "directory":
                continue
            stamp = next((info[k] for k in ("mtime", "LastModified", "ETag", "updated", "created") if k in info), "")
            out[public(p if local else fs.unstrip_protocol(p))] = f"{info.get('size')} {stamp}"
    return out


def listing_changes(root: Root, cfg: DadConfig) -> dict[str, list[str]] | None:
    """What differs between the sources now and when they were listed: {"added", "removed", "modified"}
    (uris, sorted; all empty: unchanged). None: the listing recorded no signature (made before it existed)."""
    if not root.exists(*SIGNATURE):
        return None
    then = dict(zip(*root.read_table(*SIGNATURE).select(["uri", "stamp"]).to_pydict().values()))
    now = source_signature(cfg.corpus.sources, cfg.corpus.timeout)
    return {"added": sorted(set(now) - set(then)), "removed": sorted(set(then) - set(now)),
            "modified": sorted(u for u in set(now) & set(then) if now[u] != then[u])}


def describe_changes(changes: dict[str, list[str]], short: bool = False) -> str:
    """"a rerun would add 2 file(s) (a.jpg, b.jpg), drop 1 (c.jpg) and re-read 1 modified (d.jpg)"."""
    def some(uris: list[str]) -> str:
        return "" if short else " (" + ", ".join(uris[:3]) + (", …" if len(uris) > 3 else "") + ")"

    parts = [f"{verb} {len(changes[k])}{what}{some(changes[k])}"
             for k, verb, what in (("added", "add", " file(s)"), ("removed", "drop", ""),
                                   ("modified", "re-read", " modified"))
             if changes.get(k)]
    if not parts:
        return "a rerun would change nothing"
    return "a rerun would " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])


# -- step 2: assignment ---------------------------------------------------------------------

def assign(listing: pa.Table, shard_size: int) -> list[ShardJob]:
    good = [(r["sha256"], r["uri"]) for r in listing.to_pylist() if r["reason"] is None]
    good.sort()
    return [ShardJob(i // shard_size, [(uri, sha) for sha, uri in good[i:i + shard_size]])
            for i in range(0, len(good), shard_size)]


# -- step 3: one shard ------------------------------------------------------------------------

def _units_for(items: list[tuple[str, str]], private: dict[str, str] | None = None) -> list[Unit]:
    """Group a shard's items by how they are read (files, tars, generated sources); `private` maps the
    public form the listing stores back to the URI that is read (`private_for`)."""
    private = private or {}
    generated = {"scenes": [], "skimage": []}
    files, tars = [], set()
    for uri, _ in items:
        kind = uri.split(":", 1)[0]
        if kind in generated:
            generated[kind].append(uri)
        elif ".tar#" in uri:  # `<tar-url>#<member>` (sources.read_unit); a plain file name may contain '#'
            tars.add(private.get(uri[:uri.index(".tar#") + 4], uri[:uri.index(".tar#") + 4]))
        else:
            files.append(private.get(uri, uri))
    units = ([Unit("files", files)] if files else []) + [Unit("tar", [t]) for t in sorted(tars)]
    return units + [Unit(kind, uris) for kind, uris in generated.items() if uris]


def write_shard(job: ShardJob, root: Root, cfg: DadConfig, fp: str, private: dict[str, str] | None = None) -> dict:
    """Read, validate, crop and encode one shard's samples; write tar + parts; then the marker, with
    their digests. `job.expect` (a repair): the tar must rebuild into exactly those bytes, else nothing is
    written — a shard that later stages were computed from is never replaced by different content."""
    c, k = cfg.corpus, cfg.crops
    view = job.view or c.view
    wanted = {uri for uri, _ in job.items}
    blobs: dict[str, bytes | Rejected] = {}
    for unit in _units_for(job.items, private):
        for uri, data in read_unit(unit, c.extensions, wanted=wanted, fetch=Fetch.of(c)):
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
                   "index": index, "source_uri": uri, "width": w, "height": h, **plan.to_row(),
                   "stored_side": stored, "sha256": sha}
            tar.write({"__key__": sample_id, **stored_members(region, cfg, view),
                       "json": json.dumps(row, sort_keys=True).encode()})
            manifest.append(row)
    name = shard_name(job.shard)
    tar_digest = digest_of(buf.getvalue())
    if job.expect is not None and tar_digest != job.expect:
        raise ShardCorruptError(mismatch(
            shard_rel(job.shard), tar_digest, job.expect, "rebuilt from its sources it differs, so the sources changed "
            "since `dad shard`: restore them, or shard them into a new --root"))
    parts = {rel_path(corpus_part(job.shard, "manifest")): pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA),
             rel_path(corpus_part(job.shard, "rejects")): pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)}
    objects = {shard_rel(job.shard): tar_digest}
    root.write_bytes(buf.getvalue(), *corpus_shard(job.shard))
    for rel, table in parts.items():
        data = parquet_bytes(table)
        root.write_bytes(data, rel)
        objects[rel] = digest_of(data)
    info = {"samples": len(manifest), "rejects": len(rejects), "view": view, "objects": objects}
    Ledger(root).mark(STAGE, "_", name, fp, info)
    return info


def stored_members(region: np.ndarray, cfg: DadConfig, view: str | None = None) -> dict[str, bytes]:
    """A sample's image members: the region (PNG or JPEG) and its G×G global view in `view` (default
    `corpus.view`; "none": no view) as later stages would compute it, from the region as stored (after
    JPEG, if JPEG)."""
    c, view = cfg.corpus, view or cfg.corpus.view
    data = encode(region, c.image_format, c.jpeg_quality)
    out = {"png" if c.image_format == "png" else "jpg": data}
    if view != "none":
        stored = region if c.image_format == "png" else decode_trusted(data)
        out[VIEWS[view]] = encode(global_input(stored, cfg.crops.global_size), view)
    return out


def _recorded_view(ledger: Ledger, fp: str, shard: int) -> str:
    """The view format of a recorded tar: a shard written before views were stored has none, and its repair
    must rebuild it without one to get its recorded bytes back."""
    try:
        return ledger.info(STAGE, "_", shard_name(shard), fp).get("view") or "none"
    except (FileNotFoundError, ValueError):
        return "none"


# -- step 4: finalize --------------------------------------------------------------------------

def finalize(root: Root, listing: pa.Table, jobs: list[ShardJob], recorded: dict[int, dict | None] | None = None
             ) -> tuple[pa.Table, pa.Table, dict]:
    """Concatenate the parts (each checked against its cell's marker as it is read: a damaged part would
    otherwise be blessed into the manifest); returns manifest, rejects and the final files' digests."""
    recorded = recorded or {}

    def part(shard: int, kind: str) -> pa.Table:
        rel = rel_path(corpus_part(shard, kind))
        data = root.read_bytes(rel)
        want = (recorded.get(shard) or {}).get(rel)
        if want is not None and digest_of(data) != want:
            raise ShardCorruptError(mismatch(rel, digest_of(data), want))
        return pq.read_table(io.BytesIO(data))

    parts = [part(j.shard, "manifest") for j in jobs]
    manifest = pa.concat_tables(parts) if parts else MANIFEST_SCHEMA.empty_table()
    early = [{"source_uri": r["uri"], "reason": r["reason"]} for r in listing.to_pylist() if r["reason"]]
    late = [part(j.shard, "rejects") for j in jobs]
    rejects = pa.concat_tables([pa.Table.from_pylist(early, schema=REJECT_SCHEMA), *late])
    plan_cols = ["sample_id", "row", "region_x0", "region_y0", "region_side", "stored_side", "patch", "boxes"]
    objects = {}
    for rel, table in zip(FINAL_FILES, (manifest, rejects, manifest.select(plan_cols))):
        data = parquet_bytes(table)
        root.write_bytes(data, rel)
        objects[rel] = digest_of(data)
    return manifest, rejects, objects


def run(cfg: DadConfig, address: str | None = None, break_lock: bool = False, verify: bool = False,
        lineage: Lineage | None = None) -> dict:
    """Shard the corpus (idempotent: finished shards are never redone).

    Done cells are checked against their markers (sizes; sha256 with `verify=True`) and a damaged one is
    rebuilt into its recorded bytes. Sources changed since the listing: refused (`verify` only warns,
    since it rebuilds nothing but the recorded bytes)."""
    t0 = time.time()
    root = Root(cfg.run.root)
    ledger = Ledger(root)
    with stage_lock(root, STAGE, break_lock=break_lock, command="dad shard"):
        check_recorded(root, cfg, STAGE)
        fp = (lineage or Lineage(cfg)).shard
        if ledger.is_done(STAGE, "_", "listing", fp):
            changes = listing_changes(root, cfg)
            if changes and any(changes.values()):
                message = (f"corpus.sources changed since `dad shard` listed them for {root.url}: "
                           f"{describe_changes(changes)}. A listed corpus is not extended (its shards, cached "
                           f"targets and scores depend on the whole listing): restore the sources, or shard "
                           f"them into a new --root")
                if not verify:
                    raise SourcesChangedError(message)
                log.warning("%s", message)
        ex = executor_for(cfg.run, root.process_local, address)
        listing = list_corpus(root, cfg, ex, ledger, fp)
        jobs = assign(listing, cfg.corpus.shard_size)
        done = ledger.done(STAGE, "_", fp)
        recorded = cell_objects(ledger, fp, [j.shard for j in jobs if shard_name(j.shard) in done])
        damaged = damaged_cells(root, recorded, deep=verify)
        for shard, why in sorted(damaged.items()):  # the marker stays: a rebuild is checked against it
            log.warning("shard: %s: rebuilding it", why.rsplit(": ", 1)[0])
        unrecorded = [s for s, objs in recorded.items() if objs is None and verify]
        if unrecorded:  # sharded before digests existed: rebuilt, kept only if byte-identical, then recorded
            log.info("shard: %d shard(s) have no recorded digests: rebuilding them to record them", len(unrecorded))
        todo = [j for j in jobs if shard_name(j.shard) not in done or j.shard in damaged or j.shard in unrecorded]
        for j in todo:
            if j.shard in recorded:
                objs = recorded[j.shard]
                j.expect = objs[shard_rel(j.shard)] if objs else file_digest(root, shard_rel(j.shard))
                j.view = _recorded_view(ledger, fp, j.shard)
        private = private_for(cfg, ledger, fp) if todo else {}
        for _ in ex.map(partial(write_shard, root=root, cfg=cfg, fp=fp, private=private), todo, description="shard"):
            pass
        manifest, rejects, objects = finalize(root, listing, jobs, cell_objects(ledger, fp, [j.shard for j in jobs]))
        summary = {"stage": STAGE, "shards": len(jobs), "written": len(todo), "skipped": len(jobs) - len(todo),
                   "samples": manifest.num_rows, "rejects": rejects.num_rows,
                   "seconds": round(time.time() - t0, 2), "fingerprint": fp}
        ledger.mark(STAGE, "_", "final", fp, {**summary, "objects": objects})
    return summary


# -- integrity: what later stages check before they read the corpus --------------------------------

def status(cfg: DadConfig, root: Root, lineage: Lineage | None = None) -> list[dict]:
    ledger, fp = Ledger(root), (lineage or Lineage(cfg)).shard
    markers = ledger.markers(STAGE, "_")
    cells = {c: fps for c, fps in markers.items() if c not in ("listing", "final")}
    done = sum(fp in fps for fps in cells.values())
    stale = sum(fp not in fps for fps in cells.values())
    total = done
    if ledger.is_done(STAGE, "_", "listing", fp):
        total = len(assign(root.read_table(*LISTING), cfg.corpus.shard_size))
    note = "complete" if ledger.is_done(STAGE, "_", "final", fp) else ("not started" if not markers else "incomplete")
    notes = [note]
    if note == "complete" and (damaged := verify_corpus(root, fp)):
        notes.append(f"{len(damaged)} object(s) differ from their markers ({damaged[0].split(':', 1)[0]}…): "
                     f"run `dad shard --verify`")
    if ledger.is_done(STAGE, "_", "listing", fp) and (changes := listing_changes(root, cfg)) and any(changes.values()):
        notes.append(f"listing stale, sources changed: {describe_changes(changes, short=True)}; "
                     f"`dad shard` refuses: shard them into a new --root")
    note = "; ".join(notes)
    return [{"stage": STAGE, "scope": "corpus", "done": done, "total": total, "stale": stale, "note": note}]
