"""Bad inputs (issue #9, R3), shared by tests/test_faults.py, test_security.py and bench/faults.py.

* `bad_corpus` — a folder (+ tars) with ≥ 25 kinds of bad corpus files and what must happen to each.
* `BAD_CONFIGS` — configs the loader must refuse, each with a fragment its message must contain.
* `corrupt_bytes` — flip bytes in place (same size: only a checksum can tell).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _png(arr_or_img) -> bytes:
    """PNG bytes of an array or PIL image, in whatever mode it has (16-bit, palette, grey …)."""
    from PIL import Image

    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple]) -> bytes:
    """A tar of (name, data[, type[, linkname]]) members, names taken as given (hostile ones too)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, *rest in members:
            info = tarfile.TarInfo(name)
            info.type = rest[0] if rest else tarfile.REGTYPE
            info.linkname = rest[1] if len(rest) > 1 else ""
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


@dataclass
class BadFile:
    """One file of a bad corpus and what must become of it."""

    kind: str          # what is wrong with it
    uri: str           # how it appears in manifest/rejects (folder path, or tar#member)
    expect: str        # "reject" | "sample"
    reason: str = ""   # for rejects: the reason must start with this


def bad_corpus(folder: Path) -> tuple[Path, list[BadFile]]:
    """A corpus folder with every kind of bad input we know of, and what must become of each."""
    from PIL import Image

    from bench.kit.images import exif_jpeg, image_array, image_bytes, png_bomb

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    files: list[BadFile] = []

    def put(name: str, data: bytes, kind: str, expect: str, reason: str = "") -> None:
        (d / name).write_bytes(data)
        files.append(BadFile(kind, str(d / name), expect, reason))

    good = image_bytes(96, 72, "jpeg", seed=901)
    put("good.jpg", good, "a good image", "sample")
    put("truncated.jpg", image_bytes(300, 200, "jpeg", seed=902)[:2500], "truncated JPEG", "reject",
        "truncated or corrupt image data")
    put("truncated.png", image_bytes(120, 90, "png", seed=903)[:400], "truncated PNG", "reject",
        "truncated or corrupt image data")
    put("zero.png", b"", "zero bytes", "reject", "zero bytes")
    put("text.jpg", b"<html>not an image</html>\n" * 20, "not an image", "reject", "not an image")
    put("bomb.png", png_bomb(), "decompression bomb (20000² 1-bit PNG)", "reject", "too many pixels")
    buf = io.BytesIO()
    Image.fromarray(image_array(80, 64, seed=904)).convert("CMYK").save(buf, format="JPEG", quality=95)
    put("cmyk.jpg", buf.getvalue(), "CMYK JPEG", "sample")
    put("gray16.png", _png(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16))),
        "16-bit grayscale PNG", "sample")
    put("gray.png", _png(image_array(70, 50, seed=905)[..., 1]), "8-bit grayscale", "sample")
    halves = np.zeros((64, 96, 3), np.uint8)
    halves[:, 48:] = 255
    put("exif6.jpg", exif_jpeg(halves, 6), "EXIF-rotated (orientation 6)", "sample")
    bad_exif = bytearray(exif_jpeg(halves + 1, 3))
    i = bad_exif.find(b"Exif\x00\x00")
    bad_exif[i + 10:i + 14] = b"\xff\xff\xff\x7f"  # the EXIF IFD offset points past the end
    put("badexif.jpg", bytes(bad_exif), "garbled EXIF block", "sample")
    put("one.png", _png(np.full((1, 1, 3), 7, np.uint8)), "1×1 image", "reject", "too small")
    put("aspect.png", _png(np.full((40, 400, 3), 90, np.uint8)), "extreme aspect ratio (10:1)", "reject",
        "extreme aspect ratio")
    pal = Image.fromarray(image_array(64, 64, seed=906)).convert("P", palette=Image.ADAPTIVE)
    pal.info["transparency"] = 0
    put("palette.png", _png(pal), "palette PNG with transparency", "sample")
    float_tif = io.BytesIO()
    Image.fromarray(np.linspace(-5, 9, 64 * 64, dtype=np.float32).reshape(64, 64)).save(float_tif, format="TIFF")
    put("float.tif", float_tif.getvalue(), "32-bit float TIFF", "sample")
    put("png_named.jpg", image_bytes(64, 64, "png", seed=907), "PNG bytes with a .jpg name", "sample")
    put("z_dup.jpg", good, "duplicate of good.jpg", "reject", "duplicate of")
    put("odd name #1 é.jpg", image_bytes(64, 64, "jpeg", seed=908), "file name with '#', spaces, non-ASCII",
        "sample")
    put("notes.txt", b"a text file", "not an image extension", "reject", "not an image extension")
    header_bomb = bytearray(_png(np.zeros((64, 64, 3), np.uint8)))
    header_bomb[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR says 200000²
    header_bomb[29:33] = zlib.crc32(bytes(header_bomb[12:29])).to_bytes(4, "big")
    put("header_bomb.png", bytes(header_bomb), "PNG header claiming 200000² px (small file)", "reject",
        "too many pixels")

    # tars: hostile members, a corrupt tar, a truncated tar
    t_ok = image_bytes(64, 64, "jpeg", seed=910)
    tar = d / "members.tar"
    tar.write_bytes(tar_bytes([("ok.jpg", t_ok), ("../escape.jpg", image_bytes(64, 64, "jpeg", seed=911)),
                          ("/abs/path.jpg", image_bytes(64, 64, "jpeg", seed=912)),
                          ("sym.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
                          ("hard.jpg", b"", tarfile.LNKTYPE, "ok.jpg"),
                          ("dev.jpg", b"", tarfile.CHRTYPE),
                          ("z_dupe.jpg", t_ok)]))
    files += [BadFile("tar member (good)", f"{tar}#ok.jpg", "sample"),
              BadFile("tar member with ../", f"{tar}#../escape.jpg", "reject", "tar member escapes its folder"),
              BadFile("tar member with an absolute path", f"{tar}#/abs/path.jpg", "reject",
                      "tar member has an absolute path"),
              BadFile("tar symlink member", f"{tar}#sym.jpg", "reject", "tar member is a link"),
              BadFile("tar hard-link member", f"{tar}#hard.jpg", "reject", "tar member is a link"),
              BadFile("tar device member", f"{tar}#dev.jpg", "reject", "tar member is not a regular file"),
              BadFile("tar member duplicating another", f"{tar}#z_dupe.jpg", "reject", "duplicate of")]
    (d / "corrupt.tar").write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files.append(BadFile("corrupt tar", str(d / "corrupt.tar"), "reject", "corrupt tar"))
    t1 = image_bytes(64, 64, "jpeg", seed=913)
    whole = tar_bytes([("t1.jpg", t1), ("t2.png", image_bytes(200, 200, "png", seed=914))])
    t2_data = 512 + -(-len(t1) // 512) * 512 + 512  # t1's header and padded data, t2's header
    (d / "truncated.tar").write_bytes(whole[:t2_data + 700])  # t2's data cut short
    files += [BadFile("member before a tar's truncation", f"{d / 'truncated.tar'}#t1.jpg", "sample"),
              BadFile("truncated tar", str(d / "truncated.tar"), "reject", "corrupt tar")]
    return d, files


def corrupt_bytes(path: Path, offset_fraction: float = 0.5, count: int = 8) -> None:
    """Flip `count` bytes in the middle of a file (same size: only a checksum can tell)."""
    data = bytearray(Path(path).read_bytes())
    i = int(len(data) * offset_fraction)
    for j in range(i, min(i + count, len(data))):
        data[j] ^= 0x5A
    Path(path).write_bytes(bytes(data))


BAD_CONFIGS = {  # raw sections (over a bare config) → a fragment the message must contain
    "unknown key": ({"corpus": {"shard_sise": 4}}, "corpus.shard_sise: unknown key"),
    "wrong type": ({"corpus": {"shard_size": "many"}}, "corpus.shard_size"),
    "zero shard size": ({"corpus": {"shard_size": 0}}, "corpus.shard_size"),
    "no sources": ({"corpus": {"sources": []}}, "corpus.sources"),
    "patch > region": ({"crops": {"patch": 700, "min_region": 644}}, "must not exceed crops.min_region"),
    "global not ×14": ({"crops": {"global_size": 57}}, "multiple of 14"),
    "local > global": ({"crops": {"local_store": 600}}, "local_store must not exceed"),
    "affine teacher": ({"teachers": {"t": {"adapter": "pixel", "model": "r+2g", "output_space": "affine_depth"}}},
                       "affine"),
    "bad output space": ({"teachers": {"t": {"adapter": "pixel", "model": "r+2g", "output_space": "heat"}}},
                         "teachers.t.output_space"),
    "teacher name escapes": ({"teachers": {"../../etc": {"adapter": "pixel", "model": "r+2g"}}}, "teacher name"),
    "teacher name with a slash": ({"teachers": {"a/b": {"adapter": "pixel", "model": "r+2g"}}}, "teacher name"),
    "train name escapes": ({"train": {"name": "../../x"}}, "train.name"),
    "filter w/o threshold": ({"score": {"policy": "filter"}}, "filter_threshold"),
    "no loss": ({"train": {"use_sc": False, "use_lg": False}}, "cannot both be false"),
    "negative lr": ({"train": {"lr_decoder": -1}}, "train.lr_decoder"),
    "memory root on ray": ({"run": {"root": "memory://x", "executor": "ray"}}, "memory://"),
    "eval res not ×14": ({"eval": {"resolution": 500}}, "multiple of 14"),
    "unknown section": ({"trian": {"steps": 3}}, "trian: unknown key"),
}
