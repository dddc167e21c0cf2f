"""Where corpus images come from: folders, globs, WebDataset tars, and URI lists — all through fsspec.

`expand_sources` turns `corpus.sources` into units of reading work (a batch of plain files, or one tar)
plus the entries already known to be bad; `read_unit` yields `(uri, bytes)` or `(uri, Rejected)` for each
entry (tar members as `<tar-url>#<member>`). Every entry ends as a sample or a reject with its reason
(hostile tar members, special files, broken or looping links, oversized files, timeouts), and only the
`redact.public` form of a URI (no credentials, no signatures) is stored or shown.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import re
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

import fsspec
import pyarrow.parquet as pq
from fsspec.utils import glob_translate

from pipeline.images import Rejected, max_encoded_bytes
from pipeline.redact import public, redact

GLOB_CHARS = set("*?[")
FILES_PER_UNIT = 64


@dataclass
class Unit:
    kind: str                      # "files" | "tar" | "scenes" | "skimage"
    uris: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Fetch:
    """How entries are read: never more than `max_encoded_bytes(max_pixels)` bytes of one entry, and URLs
    with `timeout` seconds to connect and per read, `retries` more attempts after a timeout or a lost
    connection (corpus.max_pixels / corpus.timeout / corpus.retries)."""
    max_pixels: int = 40_000_000
    timeout: float = 30.0
    retries: int = 2

    @classmethod
    def of(cls, corpus) -> Fetch:
        return cls(corpus.max_pixels, corpus.timeout, corpus.retries)

    @property
    def max_bytes(self) -> int:
        return max_encoded_bytes(self.max_pixels)

    def too_large(self, size: int) -> Rejected | None:
        """Why an entry of `size` bytes is not read, or None."""
        if size <= self.max_bytes:
            return None
        return Rejected(f"file too large: {size} bytes > {self.max_bytes} (8 bytes per pixel of corpus.max_pixels "
                        f"= {self.max_pixels}, plus 64 MiB): not read; raise corpus.max_pixels to admit it")


def _ext(path: str) -> str:
    if "://" in path and not _is_local(path):  # a URL's query (a presigned URL's signature) is not its name
        path = urlsplit(path).path
    base = posixpath.basename(path)
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _with_protocol(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    proto = fsspec.utils.get_protocol(like)
    return path if proto in ("file", "local") and "://" not in like else fs.unstrip_protocol(path)


def _is_local(uri: str) -> bool:
    return fsspec.utils.get_protocol(uri) in ("file", "local")


def transport_options(uri: str, timeout: float) -> dict:
    """fsspec options that bound each network wait of `uri`'s filesystem by `timeout` seconds."""
    proto = fsspec.utils.get_protocol(uri)
    if proto in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)}}
    if proto in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    return {}


# -- listing ------------------------------------------------------------------------------------

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def entry_problem(path: str, st: os.stat_result) -> str | None:
    """Why a local entry (its lstat) cannot be read as a file, or None: regular files and symlinks to them
    are read; nothing else is ever opened (a FIFO would block, a device never end)."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "symlink loop: not followed"
            if err.errno == errno.ENOENT:
                return f"broken symlink (to {_link(path)!r}): not read"
            return f"unreadable symlink ({_os_reason(err)})"
        if stat.S_ISREG(target.st_mode):
            return None
        what = "a folder (folders behind symlinks are not walked)" if stat.S_ISDIR(target.st_mode) else _kind(target.st_mode)
        return f"symlink to {what}: not read"
    return f"not a regular file ({_kind(st.st_mode)}): not read"


def _link(path: str) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(path)
    return "?"


def _os_reason(err: OSError) -> str:
    return f"{type(err).__name__}: {err.strerror or err}"


def walk_local(top: str) -> Iterator[tuple[str, str | None]]:
    """(path, None) for every regular file (or symlink to one) under the folder `top`, (path, reason) for
    every other entry and every folder that cannot be listed. Iterative (no recursion limit), sorted,
    symlinked folders not followed, no file opened."""
    stack = [top.rstrip("/") or "/"]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
        except OSError as err:
            yield folder, f"unreadable folder ({_os_reason(err)}): its entries cannot be listed; fix its permissions"
            continue
        subfolders = []
        for name in names:
            path = f"{folder.rstrip('/')}/{name}"
            try:
                st = os.lstat(path)
            except OSError as err:  # vanished or unreadable since the folder was listed
                yield path, f"unreadable entry ({_os_reason(err)})"
                continue
            if stat.S_ISDIR(st.st_mode):
                subfolders.append(path)
            else:
                yield path, entry_problem(path, st)
        stack.extend(reversed(subfolders))


def expand_sources(sources: list[str], extensions: list[str], fetch: Fetch | None = None
                   ) -> tuple[list[Unit], list[dict]]:
    """Resolve sources into reading units, deterministically ordered; and rejects found on the way
    (their `source_uri` public)."""
    fetch = fetch or Fetch()
    exts = {e.lower() for e in extensions}
    files: list[str] = []
    tars: list[str] = []
    rejects: list[dict] = []

    def reject(uri: str, reason: str) -> None:
        rejects.append({"source_uri": public(uri), "reason": public(reason)})

    def add_path(uri: str) -> None:
        ext = _ext(uri)
        if ext == ".tar":
            tars.append(uri)
        elif ext in exts:
            files.append(uri)
        else:
            reject(uri, f"not an image extension ({ext or 'none'})")

    generated: list[Unit] = []
    for src in sources:
        if src.startswith("scenes:"):
            uris = generated_mod().scene_uris(src.removeprefix("scenes:"))
            generated += [Unit("scenes", uris[i:i + FILES_PER_UNIT]) for i in range(0, len(uris), FILES_PER_UNIT)]
        elif src.startswith("skimage:"):
            if src != "skimage:photos":
                raise ValueError(f"corpus.sources: {src!r}: the only scikit-image source is 'skimage:photos'")
            generated.append(Unit("skimage", generated_mod().photo_uris()))
        elif _ext(src) in (".txt", ".parquet") and not any(c in src for c in GLOB_CHARS):
            for uri in _read_list(src, fetch):
                add_path(uri)
        else:
            for uri, problem in _entries(src, fetch):
                if problem:
                    reject(uri, problem)
                else:
                    add_path(uri)
    files = sorted(set(files))
    units = [Unit("files", files[i:i + FILES_PER_UNIT]) for i in range(0, len(files), FILES_PER_UNIT)]
    units += [Unit("tar", [t]) for t in sorted(set(tars))]
    return units + generated, rejects


def _entries(src: str, fetch: Fetch) -> Iterator[tuple[str, str | None]]:
    """(uri, None) for each file a folder, glob or single-file source names, (uri, reason) for each entry
    that cannot be read as one. Local entries are classified by lstat (`entry_problem`, `walk_local`); an
    object store lists a prefix in one request, so its failure is the source's error, not a reject."""
    fs, path = fsspec.core.url_to_fs(src, **transport_options(src, fetch.timeout))
    local = _is_local(src)

    def classified(p: str) -> tuple[str, str | None]:
        try:
            return _with_protocol(fs, p, src), entry_problem(p, os.lstat(p)) if local else None
        except OSError as err:
            return _with_protocol(fs, p, src), f"unreadable entry ({_os_reason(err)})"

    if local and "**" in path:  # walked like a folder: fsspec's walk drops the folders it cannot list
        yield from _deep_glob(fs, path, src)
    elif any(c in src for c in GLOB_CHARS):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"corpus.sources: {redact(src)!r} matches no files")
        yield from (classified(m) for m in matches if not fs.isdir(m))
    elif local and os.path.isdir(path):  # a folder named in the config is walked, even through a symlink
        yield from ((_with_protocol(fs, p, src), problem) for p, problem in walk_local(path))
    elif local and os.path.lexists(path):
        yield src, classified(path)[1]  # a file named in the config keeps the name it was given
    elif not local and fs.isdir(path):
        yield from ((_with_protocol(fs, m, src), None) for m in sorted(fs.find(path)))
    elif not local and fs.exists(path):
        yield src, None
    else:
        raise FileNotFoundError(f"corpus.sources: {redact(src)!r} does not exist")


def _deep_glob(fs: fsspec.AbstractFileSystem, pattern: str, src: str) -> Iterator[tuple[str, str | None]]:
    """A local `**` glob as `walk_local` from its fixed prefix, matched with fsspec's own glob rule: every
    entry that matches is a file or a reject, and a folder that cannot be listed (it may hold matches) is
    a reject rather than silently empty."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    top = "/".join(parts[:fixed]) or "/"
    rule = re.compile(glob_translate(pattern))
    found = False
    if os.path.isdir(top):
        for p, problem in walk_local(top):
            if rule.match(p) or (problem or "").startswith("unreadable folder"):
                found = True
                yield _with_protocol(fs, p, src), problem
    if not found:
        raise FileNotFoundError(f"corpus.sources: {redact(src)!r} matches no files")


def private_uris(units: list[Unit]) -> dict[str, str]:
    """public form → real URI, for the files and tars whose public form differs (credentials, odd names):
    what the shard stage needs, in memory only, to read an entry the listing stores by its public form."""
    return {public(u): u for unit in units if unit.kind in ("files", "tar") for u in unit.uris if public(u) != u}


def generated_mod():
    from pipeline.datasets import generated

    return generated


def _read_list(src: str, fetch: Fetch) -> list[str]:
    base = posixpath.dirname(src)

    def once() -> bytes:
        with open_entry(src, fetch) as (f, _):
            return f.read()

    data = attempts(once, src, fetch)
    if isinstance(data, Rejected):
        raise FileNotFoundError(f"corpus.sources: the URI list {redact(src)!r} cannot be read ({public(str(data))})")
    if src.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        col = "uri" if "uri" in table.column_names else table.column_names[0]
        uris = [str(u) for u in table.column(col).to_pylist() if u]
    else:  # surrogateescape: a local name that is not UTF-8 still names its file
        uris = [ln.strip() for ln in data.decode("utf-8", "surrogateescape").splitlines()]
    uris = [u for u in uris if u and not u.startswith("#")]
    return [u if "://" in u or u.startswith("/") else posixpath.join(base, u) for u in uris]


# -- reading ------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_entry(uri: str, fetch: Fetch) -> Iterator[tuple[BinaryIO, int | None]]:
    """(file object, size or None) of `uri`, opened only as a regular file: a local one without blocking
    (O_NONBLOCK: a FIFO that took a file's place cannot hang the open) and checked by fstat before any
    read; a remote one by its info, every network wait bounded by `fetch.timeout`."""
    if _is_local(uri):
        path = fsspec.core.strip_protocol(uri) if "://" in uri else uri
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise Rejected(f"not a regular file ({_kind(st.st_mode)}): not read")
            yield f, st.st_size
        return
    fs, path = fsspec.core.url_to_fs(uri, **transport_options(uri, fetch.timeout))
    info = fs.info(path)
    if info.get("type", "file") != "file":
        raise Rejected(f"not a regular file ({info.get('type')}): not read")
    size = info.get("size")
    http = fsspec.utils.get_protocol(uri) in ("http", "https")
    with fs.open(path, "rb", **({"block_size": 0, "size": size} if http else {})) as f:  # stream, no 2nd HEAD
        yield f, size


def read_file(uri: str, fetch: Fetch) -> bytes | Rejected:
    """The bytes of one file, or why not: never more than `fetch.max_bytes` read (a bigger file is
    rejected from its size), URLs retried (`attempts`)."""
    def once() -> bytes:
        with open_entry(uri, fetch) as (f, size):
            if size is not None and (why := fetch.too_large(size)):
                raise why
            data = f.read(fetch.max_bytes + 1)
        if why := fetch.too_large(len(data)):  # it grew, or a server that gave no size
            raise why
        return data

    return attempts(once, uri, fetch)


def attempts(fn, uri: str, fetch: Fetch):
    """fn(), retried `fetch.retries` times for a URL whose failure may pass (a timeout, a lost connection,
    HTTP 408/429/5xx); what it raises at last becomes a Rejected saying why and after how many attempts."""
    tries = 1 if _is_local(uri) else fetch.retries + 1
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Rejected as why:
            return why
        except Exception as err:  # noqa: BLE001 - every I/O failure becomes a reject, never a crashed listing
            if attempt < tries and _transient(err):
                time.sleep(min(0.25 * 2 ** attempt, 5.0))
                continue
            return Rejected(_failure(err, attempt, fetch))
    raise AssertionError("unreachable")


def _chain(err: BaseException) -> list[BaseException]:
    out = [err]
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
        out.append(nxt)
    return out


def _transient(err: BaseException) -> bool:
    for e in _chain(err):
        names = " ".join(c.__name__ for c in type(e).__mro__)
        if isinstance(e, (TimeoutError, ConnectionError)) or "Timeout" in names or "ConnectionError" in names \
                or "ServerDisconnected" in names or getattr(e, "status", None) in (408, 429, 500, 502, 503, 504):
            return True
    return False


def _failure(err: BaseException, tries: int, fetch: Fetch) -> str:
    chain = _chain(err)
    cause = chain[-1]
    what = f"{type(cause).__name__}: {cause}".rstrip(": ")
    if not _transient(err):
        return f"unreadable file: {what}"
    said = f"{tries} attempt(s), corpus.retries = {fetch.retries}"
    if any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain):
        return f"timed out: no answer within corpus.timeout = {fetch.timeout:g} s ({said})"
    return f"unreachable ({said}): {what}"


def _public(data: bytes | Rejected) -> bytes | Rejected:
    return Rejected(public(str(data))) if isinstance(data, Rejected) else data


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


def read_unit(unit: Unit, extensions: list[str], wanted: set[str] | None = None, fetch: Fetch | None = None
              ) -> Iterator[tuple[str, bytes | Rejected]]:
    """Yield (public uri, bytes-or-Rejected) for each entry; with `wanted` (public uris), only those are read."""
    fetch = fetch or Fetch()
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
            if wanted is None or public(uri) in wanted:
                yield public(uri), _public(read_file(uri, fetch))
        return
    yield from _read_tar(unit.uris[0], {e.lower() for e in extensions}, wanted, fetch)


def _read_tar(tar_uri: str, exts: set[str], wanted: set[str] | None, fetch: Fetch
              ) -> Iterator[tuple[str, bytes | Rejected]]:
    """A tar's members as `<public tar uri>#<public member name>`, streamed (members never extracted)."""
    tar_pub = public(tar_uri)
    with contextlib.ExitStack() as stack:
        f = attempts(lambda: stack.enter_context(open_entry(tar_uri, fetch))[0], tar_uri, fetch)
        if isinstance(f, Rejected):
            yield tar_pub, _public(f)
            return
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    uri = f"{tar_pub}#{public(info.name)}"
                    problem = member_problem(info)
                    if problem:
                        if wanted is None:
                            yield uri, Rejected(public(problem))
                        continue
                    if info.isdir() or _ext(info.name) not in exts:
                        continue  # WebDataset side files (.json, .cls …) belong to their image
                    if wanted is not None and uri not in wanted:
                        continue
                    if why := fetch.too_large(info.size):  # skipped by the stream, never read
                        yield uri, why
                        continue
                    data = tar.extractfile(info)
                    yield uri, data.read() if data else Rejected("tar member has no data")
        except (tarfile.TarError, EOFError, OSError) as err:
            yield tar_pub, Rejected(public(f"corrupt tar: {type(err).__name__}: {err}"))
        except Exception as err:  # noqa: BLE001 - a transport failure mid-stream (a URL that stopped answering)
            yield tar_pub, Rejected(public(f"tar unreadable after its first members: {_failure(err, 1, fetch)}"))
