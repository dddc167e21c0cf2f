"""The shard stage on real files, real tars and real Ray: rejects with reasons, orientation, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.kit.configs import dad_config
from pipeline.crops import global_input
from pipeline.images import decode_rgb, decode_trusted
from pipeline.lineage import StaleConfigError
from pipeline.storage import Root
from stages import shard

BIG = 40_000_000


def outputs(root: Root) -> dict[str, bytes]:
    """Every byte the stage promises to reproduce: shards, manifest, rejects, crop plan."""
    out = {f"shards/{n}": root.read_bytes("corpus", "shards", n)
           for n in root.listdir("corpus", "shards") if n.endswith(".tar")}
    for name in (("corpus", "manifest.parquet"), ("corpus", "rejects.parquet"), ("crops", "plan.parquet")):
        out["/".join(name)] = root.read_bytes(*name)
    return out


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _png(arr_or_img) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _cfg(root, sources, **sections):
    """Only root, sources and `sections`: the product's defaults for everything else."""
    return dad_config(root, sources, preset="bare", **sections)


def _mem() -> str:
    return f"memory://dad-test-{uuid.uuid4().hex[:8]}"


# -- a corpus with every kind of bad file ---------------------------------------------------------

@pytest.fixture
def bad_corpus(tmp_path, media):
    d = tmp_path / "mixed"
    d.mkdir()
    good = {}

    def put(name: str, data: bytes, is_good: bool) -> None:
        (d / name).write_bytes(data)
        if is_good:
            good[name] = data

    jpeg = media.image_bytes(120, 90, "jpeg", seed=11)
    put("good0.jpg", jpeg, True)
    put("good1.png", media.image_bytes(100, 100, "png", seed=12), True)
    buf = io.BytesIO()
    Image.fromarray(media.image_array(80, 64, seed=13)).convert("CMYK").save(buf, format="JPEG", quality=95)
    put("cmyk.jpg", buf.getvalue(), True)
    put("gray16.png", _png(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))), True)
    put("gray.png", _png(media.image_array(70, 50, seed=14)[..., 1]), True)
    rgba = np.dstack([media.image_array(60, 60, seed=15), np.tile(np.arange(60, dtype=np.uint8) * 4, (60, 1))])
    put("rgba.png", _png(rgba), True)
    halves = np.zeros((96, 160, 3), np.uint8)
    halves[:, 80:] = 255
    put("exif6.jpg", media.exif_jpeg(halves, 6), True)
    put("z_copy_of_good0.jpg", jpeg, False)
    put("truncated.jpg", media.image_bytes(300, 200, "jpeg", seed=16)[:3000], False)
    put("empty.jpg", b"", False)
    put("text.jpg", b"just some text\n" * 10, False)
    put("bomb.png", media.png_bomb(), False)
    put("tiny.png", _png(np.full((1, 1, 3), 90, np.uint8)), False)
    put("thin.png", _png(np.full((4000, 1, 3), 90, np.uint8)), False)
    put("wide.png", _png(np.full((40, 400, 3), 90, np.uint8)), False)
    put("notes.txt", b"not an image", False)
    expected_rejects = {
        "z_copy_of_good0.jpg": f"duplicate of {d / 'good0.jpg'}",
        "truncated.jpg": "truncated or corrupt image data",
        "empty.jpg": "zero bytes",
        "text.jpg": "not an image (unrecognised format)",
        "bomb.png": "too many pixels: 20000x20000 = 400000000 > corpus.max_pixels = 40000000",
        "tiny.png": "too small: short side 1 px < corpus.min_side = 32",
        "thin.png": "too small: short side 1 px < corpus.min_side = 32",
        "wide.png": "extreme aspect ratio 10.0 > corpus.max_aspect = 4.0",
        "notes.txt": "not an image extension (.txt)",
    }
    return d, good, expected_rejects


@pytest.mark.timeout(120)
def test_bad_files_are_rejected_with_reasons_and_good_ones_sharded(tmp_path, bad_corpus, ray_session):
    folder, good, expected_rejects = bad_corpus
    root = Root(str(tmp_path / "run"))
    cfg = _cfg(root.url, [folder], corpus={"shard_size": 3}, run={"executor": "ray"})
    summary = shard.run(cfg)
    # 13 entries pass the listing (7 good + 6 that only decoding rejects) → ceil(13 / 3) = 5 shards;
    # decode-time rejects leave their shard short, never shift samples into another shard.
    assert (summary["samples"], summary["rejects"], summary["shards"]) == (7, 9, 5)

    rejects = {r["source_uri"].rsplit("/", 1)[-1]: r["reason"] for r in root.read_table("corpus", "rejects.parquet").to_pylist()}
    assert set(rejects) == set(expected_rejects)
    for name, reason in expected_rejects.items():
        assert rejects[name].startswith(reason), (name, rejects[name])

    manifest = root.read_table("corpus", "manifest.parquet").to_pylist()
    assert {r["source_uri"] for r in manifest} == {str(folder / n) for n in good}
    assert [r["row"] for r in manifest] == [r["shard"] * 3 + r["index"] for r in manifest]
    for k in range(5):
        assert [r["index"] for r in manifest if r["shard"] == k] == list(range(sum(r["shard"] == k for r in manifest)))
    assert [r["sample_id"] for r in manifest] == sorted(r["sample_id"] for r in manifest)
    plan = root.read_table("crops", "plan.parquet").to_pylist()
    assert [p["sample_id"] for p in plan] == [r["sample_id"] for r in manifest]

    by_key = {}
    for shard_no in range(5):
        members = tar_members(root.read_bytes("corpus", "shards", f"{shard_no:06d}.tar"))
        # WebDataset layout: each key's files are adjacent (<key>.global.webp, <key>.json, <key>.png), keys
        # in index order
        keys = [n.split(".", 1)[0] for n, _ in members]
        assert [n.split(".", 1)[1] for n, _ in members] == ["global.webp", "json", "png"] * (len(members) // 3)
        assert keys[::3] == keys[1::3] == keys[2::3] == [r["sample_id"] for r in manifest if r["shard"] == shard_no]
        for (_, view), (_, meta), (_, png) in zip(members[::3], members[1::3], members[2::3]):
            by_key[json.loads(meta)["sample_id"]] = (decode_trusted(png), json.loads(meta), decode_trusted(view))
    assert len(by_key) == 7

    for row in manifest:
        name = row["source_uri"].rsplit("/", 1)[-1]
        data = good[name]
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["sample_id"] == row["sha256"][:16]
        stored, meta, view = by_key[row["sample_id"]]
        assert meta == row
        np.testing.assert_array_equal(view, global_input(stored, cfg.crops.global_size))  # the view, lossless
        rgb = decode_rgb(data, BIG)  # oriented, RGB; every good image here is smaller than min_region
        assert (row["height"], row["width"]) == rgb.shape[:2]
        x0, y0, s = row["region_x0"], row["region_y0"], row["region_side"]
        assert s == min(rgb.shape[:2]) == row["stored_side"]
        np.testing.assert_array_equal(stored, rgb[y0:y0 + s, x0:x0 + s])  # native-resolution region, lossless

    # EXIF orientation 6: stored 160×96 with the left half black → shown 96×160 with the top half black.
    exif = next(r for r in manifest if r["source_uri"].endswith("exif6.jpg"))
    assert (exif["width"], exif["height"]) == (96, 160)
    region, y0 = by_key[exif["sample_id"]][0], exif["region_y0"]
    rows = np.arange(96) + y0  # image rows covered by the region
    assert region[rows < 76].max(initial=0) < 40 and region[rows > 84].min(initial=255) > 215
    assert (rows < 76).any() and (rows > 84).any()
    # 16-bit gray: value v → round(v / 257) in all three channels
    g16 = next(r for r in manifest if r["source_uri"].endswith("gray16.png"))
    region = by_key[g16["sample_id"]][0]
    src = (np.arange(64 * 48).reshape(48, 64) * 21)[g16["region_y0"]:, g16["region_x0"]:][:48, :48]
    np.testing.assert_array_equal(region[..., 0], np.rint(src / 257.0).astype(np.uint8))
    assert (region[..., 0] == region[..., 2]).all()


# -- tar sources --------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mtime = kind, link, len(data), 0
    tar.addfile(info, io.BytesIO(data) if data else None)


def _tar(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            _add(tar, *m)
    return buf.getvalue()


@pytest.mark.timeout(60)
def test_tar_sources_refuse_hostile_members_and_survive_corrupt_tars(tmp_path, media):
    d = tmp_path / "tars"
    d.mkdir()
    s1, s2, s3 = (media.image_bytes(96, 80, "jpeg", seed=s) for s in (21, 22, 23))
    (d / "wds.tar").write_bytes(_tar([
        ("s1.jpg", s1), ("s1.json", b'{"caption": "x"}'), ("s2.png", media.image_bytes(90, 90, "png", seed=24)),
        ("s2.cls", b"3"), ("sub", b"", tarfile.DIRTYPE), ("sub/s3.jpg", s3),
        ("../evil.jpg", s2), ("/abs.jpg", s2), ("link.jpg", b"", tarfile.SYMTYPE, "s1.jpg"),
        ("hard.jpg", b"", tarfile.LNKTYPE, "s1.jpg"), ("fifo.jpg", b"", tarfile.FIFOTYPE),
    ]))
    (d / "broken.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    t1 = media.image_bytes(64, 64, "jpeg", seed=25)
    whole = _tar([("t1.jpg", t1), ("t2.jpg", media.image_bytes(300, 300, "png", seed=26))])
    t2_data = 512 + -(-len(t1) // 512) * 512 + 512  # header, t1's padded data, t2's header
    (d / "truncated.tar").write_bytes(whole[:t2_data + 700])  # t1 complete, t2's data cut short
    root = Root(_mem())
    summary = shard.run(_cfg(root.url, [d / "*.tar"]))

    tar_uri = str(d / "wds.tar")
    rejects = {r["source_uri"]: r["reason"] for r in root.read_table("corpus", "rejects.parquet").to_pylist()}
    assert rejects.pop(f"{tar_uri}#../evil.jpg") == "tar member escapes its folder (../evil.jpg)"
    assert rejects.pop(f"{tar_uri}#/abs.jpg") == "tar member has an absolute path (/abs.jpg)"
    assert rejects.pop(f"{tar_uri}#link.jpg") == "tar member is a link (link.jpg -> s1.jpg)"
    assert rejects.pop(f"{tar_uri}#hard.jpg") == "tar member is a link (hard.jpg -> s1.jpg)"
    assert rejects.pop(f"{tar_uri}#fifo.jpg") == "tar member is not a regular file (fifo.jpg)"
    assert rejects.pop(str(d / "broken.tar")).startswith("corrupt tar: ReadError")
    assert rejects.pop(str(d / "truncated.tar")).startswith("corrupt tar:")
    assert rejects == {}
    manifest = root.read_table("corpus", "manifest.parquet").to_pylist()
    assert sorted(r["source_uri"] for r in manifest) == sorted(
        [f"{tar_uri}#s1.jpg", f"{tar_uri}#s2.png", f"{tar_uri}#sub/s3.jpg", f"{d / 'truncated.tar'}#t1.jpg"])
    s1_row = next(r for r in manifest if r["source_uri"].endswith("#s1.jpg"))
    assert s1_row["sha256"] == hashlib.sha256(s1).hexdigest()
    assert (summary["samples"], summary["rejects"]) == (4, 7)


# -- determinism, executors, roots, reruns ----------------------------------------------------------

@pytest.fixture
def mixed_sources(tmp_path, make_corpus, media):
    """A folder, a WebDataset tar (one member duplicates a folder image) and a .txt list of URIs."""
    photos = make_corpus("photos", n=14, size=[(120, 90), (90, 120), (700, 680), (64, 48)], fmt="jpeg")
    extra = make_corpus("extra", n=5, size=(150, 100), fmt="png", seed=1)
    members = [(f"k{i}.jpg", media.image_bytes(100, 80, "jpeg", seed=500 + i)) for i in range(6)]
    members.append(("dup.jpg", (photos / "img0000.jpg").read_bytes()))
    (tmp_path / "web.tar").write_bytes(_tar(members))
    (tmp_path / "list.txt").write_text("# a list\nextra/img0001.png\nextra/img0003.png\n" + f"{extra / 'img0004.png'}\n")
    return [photos, tmp_path / "web.tar", tmp_path / "list.txt"]


@pytest.mark.timeout(180)
def test_byte_identical_across_executors_and_roots(tmp_path, mixed_sources, ray_session):
    """inline (1 worker) vs Ray (2 CPUs, tasks in parallel) vs memory:// root: same bytes."""
    sections = {"corpus": {"shard_size": 5}}
    ray_root = Root(str(tmp_path / "ray"))
    s_ray = shard.run(_cfg(ray_root.url, mixed_sources, run={"executor": "ray"}, **sections))
    inline_root = Root(str(tmp_path / "inline"))
    s_inline = shard.run(_cfg(inline_root.url, mixed_sources, run={"executor": "inline"}, **sections))
    mem_root = Root(_mem())
    s_mem = shard.run(_cfg(mem_root.url, mixed_sources, **sections))  # auto → inline for memory://

    assert s_ray["samples"] == 6 + 14 + 3 == s_inline["samples"] == s_mem["samples"]
    assert s_ray["rejects"] == 1  # the duplicate tar member
    assert s_ray["shards"] == 5 and s_ray["fingerprint"] == s_inline["fingerprint"] == s_mem["fingerprint"]
    ref = outputs(ray_root)
    assert len([k for k in ref if k.startswith("shards/")]) == 5
    assert outputs(inline_root) == ref
    assert outputs(mem_root) == ref
    reasons = pq.read_table(io.BytesIO(ref["corpus/rejects.parquet"])).to_pylist()
    assert reasons == [{"source_uri": f"{mixed_sources[1]}#dup.jpg",
                        "reason": f"duplicate of {mixed_sources[0] / 'img0000.jpg'}"}]

    # a rerun does nothing and changes nothing
    again = shard.run(_cfg(inline_root.url, mixed_sources, run={"executor": "inline"}, **sections))
    assert (again["written"], again["skipped"]) == (0, 5)
    assert outputs(inline_root) == ref
    # a setting that is not the shard stage's is fine; a shard-stage one on the same root is refused
    shard.run(_cfg(inline_root.url, mixed_sources, run={"executor": "inline"}, train={"steps": 3}, **sections))
    with pytest.raises(StaleConfigError, match=r"crops\.local_count"):
        shard.run(_cfg(inline_root.url, mixed_sources, run={"executor": "inline"},
                       crops={"local_count": 3}, **sections))
    # a different seed gives different crop plans but the same pixels per sample id
    seeded = Root(_mem())
    shard.run(_cfg(seeded.url, mixed_sources, run={"seed": 1}, **sections))
    assert outputs(seeded)["crops/plan.parquet"] != ref["crops/plan.parquet"]


@pytest.mark.timeout(60)
def test_region_cap_and_jpeg_output(tmp_path, media):
    src = tmp_path / "big"
    src.mkdir()
    arr = media.image_array(900, 700, seed=31)
    (src / "a.png").write_bytes(_png(arr))
    (src / "b.png").write_bytes(_png(media.image_array(500, 400, seed=32)))
    root = Root(_mem())
    shard.run(_cfg(root.url, [src], corpus={"max_region": 320, "image_format": "jpeg", "jpeg_quality": 90}))
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in root.read_table("corpus", "manifest.parquet").to_pylist()}
    a, b = rows["a.png"], rows["b.png"]
    assert 644 <= a["region_side"] <= 700 and a["stored_side"] == 320 and a["patch"] == 560
    assert b["region_side"] == 400 and b["stored_side"] == 320 and b["patch"] == round(560 * 400 / 644)
    members = dict(tar_members(root.read_bytes("corpus", "shards", "000000.tar")))
    assert set(members) == {f"{r['sample_id']}.{ext}" for r in (a, b) for ext in ("jpg", "json", "global.webp")}
    for r in (a, b):  # the stored view is the one later stages would compute from the stored (lossy) region
        view = decode_trusted(members[f"{r['sample_id']}.global.webp"])
        region = decode_trusted(members[f"{r['sample_id']}.jpg"])
        assert view.shape == (560, 560, 3)
        np.testing.assert_array_equal(view, global_input(region, 560))
    img = Image.open(io.BytesIO(members[f"{a['sample_id']}.jpg"]))
    assert (img.format, img.size) == ("JPEG", (320, 320))
    x0, y0, s = a["region_x0"], a["region_y0"], a["region_side"]
    expect = np.asarray(Image.fromarray(arr[y0:y0 + s, x0:x0 + s]).resize((320, 320), Image.BICUBIC), dtype=float)
    assert np.abs(np.asarray(img, dtype=float) - expect).mean() < 4


def test_missing_source_fails_before_writing(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shard.run(_cfg(root, [tmp_path / "nowhere"], run={"executor": "inline"}))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        shard.run(_cfg(root, [tmp_path / "*.jpg"], run={"executor": "inline"}))
    shutil.rmtree(root, ignore_errors=True)
