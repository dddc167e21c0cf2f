"""Where corpus images come from: folders, globs, WebDataset tars, and URI lists — all through fsspec.

`expand_sources` turns `corpus.sources` into *units* of reading work (a batch of plain files, or one
tar) plus the entries it already knows are bad. `read_unit` yields `(uri, bytes)` or
`(uri, Rejected)` for every entry of a unit. Tar members are addressed as `<tar-url>#<member>`;
members that are links, absolute paths or contain `..` are refused (we never extract to disk, but
such a member is a sign of a hostile or broken archive and is reported, not read).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

from pipeline.images import Rejected

GLOB_CHARS = set("*?[")
FILES_PER_UNIT = 64


@dataclass
class Unit:
    kind: str                      # "files" | "tar" | "scenes" | "skimage"
    uris: list[str] = field(default_factory=list)


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    proto = fsspec.utils.get_protocol(like)
    return path if proto in ("file", "local") and "://" not in like else fs.unstrip_protocol(path)


def expand_sources(sources: list[str], extensions: list[str]) -> tuple[list[Unit], list[dict]]:
    """Resolve sources into reading units, deterministically ordered; and rejects found on the way."""
    exts = {e.lower() for e in extensions}
    files: list[str] = []
    tars: list[str] = []
    rejects: list[dict] = []

    def add_path(uri: str) -> None:
        ext = _ext(uri)
        if ext == ".tar":
            tars.append(uri)
        elif ext in exts:
            files.append(uri)
        else:
            rejects.append({"source_uri": uri, "reason": f"not an image extension ({ext or 'none'})"})

    generated: list[Unit] = []
    for src in sources:
        if src.startswith("scenes:"):
            uris = generated_mod().scene_uris(src.removeprefix("scenes:"))
            generated += [Unit("scenes", uris[i:i + FILES_PER_UNIT]) for i in range(0, len(uris), FILES_PER_UNIT)]
            continue
        if src.startswith("skimage:"):
            if src != "skimage:photos":
                raise ValueError(f"corpus.sources: {src!r}: the only scikit-image source is 'skimage:photos'")
            generated.append(Unit("skimage", generated_mod().photo_uris()))
            continue
        ext = _ext(src)
        if ext in (".txt", ".parquet") and not any(c in src for c in GLOB_CHARS):
            for uri in _read_list(src):
                add_path(uri)
            continue
        fs, path = fsspec.core.url_to_fs(src)
        if any(c in src for c in GLOB_CHARS):
            matches = sorted(fs.glob(path))
            if not matches:
                raise FileNotFoundError(f"corpus.sources: {src!r} matches no files")
            for m in matches:
                if fs.isdir(m):
                    continue
                add_path(_with_protocol(fs, m, src))
        elif fs.isdir(path):
            for m in sorted(fs.find(path)):
                add_path(_with_protocol(fs, m, src))
        elif fs.exists(path):
            add_path(src)
        else:
            raise FileNotFoundError(f"corpus.sources: {src!r} does not exist")
    files = sorted(set(files))
    units = [Unit("files", files[i:i + FILES_PER_UNIT]) for i in range(0, len(files), FILES_PER_UNIT)]
    units += [Unit("tar", [t]) for t in sorted(set(tars))]
    return units + generated, rejects


def generated_mod():
    from pipeline.datasets import generated

    return generated


def _read_list(src: str) -> list[str]:
    base = posixpath.dirname(src)
    with fsspec.open(src, "rb") as f:
        if src.endswith(".parquet"):
            table = pq.read_table(f)
            col = "uri" if "uri" in table.column_names else table.column_names[0]
            uris = [str(u) for u in table.column(col).to_pylist() if u]
        else:
            uris = [ln.strip() for ln in f.read().decode().splitlines()]
    uris = [u for u in uris if u and not u.startswith("#")]
    return [u if "://" in u or u.startswith("/") else posixpath.join(base, u) for u in uris]


def member_problem(info: tarfile.TarInfo) -> str | None:
    name = info.name
    if info.issym() or info.islnk():
        return f"tar member is a link ({name} -> {info.linkname})"
    if name.startswith("/") or posixpath.isabs(name):
        return f"tar member has an absolute path ({name})"
    if ".." in name.split("/"):
        return f"tar member escapes its folder ({name})"
    if not info.isfile():
        return None if info.isdir() else f"tar member is not a regular file ({name})"
    return None


def read_unit(unit: Unit, extensions: list[str], wanted: set[str] | None = None
              ) -> Iterator[tuple[str, bytes | Rejected]]:
    """Yield (uri, bytes-or-Rejected) for each entry; with `wanted`, only those URIs are read."""
    if unit.kind == "scenes":
        uris = [u for u in unit.uris if wanted is None or u in wanted]
        yield from zip(uris, generated_mod().render_bytes(uris))
        return
    if unit.kind == "skimage":
        for uri in unit.uris:
            if wanted is None or uri in wanted:
                yield uri, generated_mod().photo_bytes(uri)
        return
    if unit.kind == "files":
        for uri in unit.uris:
            if wanted is not None and uri not in wanted:
                continue
            try:
                with fsspec.open(uri, "rb") as f:
                    yield uri, f.read()
            except Exception as err:  # noqa: BLE001 - I/O errors become rejects
                yield uri, Rejected(f"unreadable file: {type(err).__name__}: {err}")
        return
    tar_uri = unit.uris[0]
    exts = {e.lower() for e in extensions}
    try:
        with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                uri = f"{tar_uri}#{info.name}"
                problem = member_problem(info)
                if problem:
                    if wanted is None:
                        yield uri, Rejected(problem)
                    continue
                if info.isdir() or _ext(info.name) not in exts:
                    continue  # WebDataset side files (.json, .cls …) belong to their image
                if wanted is not None and uri not in wanted:
                    continue
                data = tar.extractfile(info)
                yield uri, data.read() if data else Rejected("tar member has no data")
    except (tarfile.TarError, EOFError, OSError) as err:
        yield tar_uri, Rejected(f"corrupt tar: {type(err).__name__}: {err}")
