"""The run root: every byte a stage reads or writes goes through fsspec under one URL.

A `Root` is tiny and picklable (URL + storage options), so Ray tasks rebuild it on any node. Writes are
atomic per object: local files go to a temporary name and are renamed; object stores make an object
visible only when its upload completes. Credentials in a root URL (`s3://KEY:SECRET@bucket/run`) move
into the storage options (memory only); `url`, which every message and output shows, is without them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DamagedFileError, parse_jsonl
from pipeline.redact import split_credentials


def temp_file(directory: str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
    """A new temporary file in `directory`, opened for writing: (fd, path), as `tempfile.mkstemp`.

    Why not mkstemp: it creates the file 0600, and a file renamed into place keeps that mode, so a
    teammate on a shared run root could not read a checkpoint. Created 0666 here, the kernel applies
    the umask exactly as for any other output (changing the umask to read it would race other threads).
    """
    while True:
        path = os.path.join(directory, f"{prefix}{uuid.uuid4().hex[:12]}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def credential_options(url: str) -> tuple[str, dict]:
    """(url without user:password@, the storage options that carry them for its filesystem)."""
    clean, user, password = split_credentials(url)
    if user is None:
        return url, {}
    proto = fsspec.utils.get_protocol(clean)
    if proto in ("s3", "s3a"):
        return clean, {"key": user, "secret": password}
    if proto in ("http", "https"):
        import aiohttp

        return clean, {"client_kwargs": {"auth": aiohttp.BasicAuth(user, password or "")}}
    return clean, {"username": user, "password": password}  # ftp, sftp, smb, webhdfs …


class Root:
    def __init__(self, url: str, storage_options: dict | None = None):
        url, secret = credential_options(url)
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = {**secret, **(storage_options or {})}
        self._fs = None

    def __reduce__(self):
        return (Root, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"Root({self.url!r})"

    # -- locations -------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            opts = dict(self.storage_options)
            if self.protocol == "file":
                opts.setdefault("auto_mkdir", True)
            self._fs, self._base = fsspec.core.url_to_fs(self.url, **opts)
        return self._fs

    @property
    def protocol(self) -> str:
        proto = fsspec.utils.get_protocol(self.url)
        return "file" if proto in ("file", "local") else proto

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def process_local(self) -> bool:
        """memory:// lives in one process: other Ray workers cannot see it."""
        return self.protocol == "memory"

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a relative location under the root."""
        self.fs  # noqa: B018 - resolve base
        return "/".join([self._base.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URL (with protocol) of a relative location, for libraries that take URLs."""
        rel = "/".join(p.strip("/") for p in parts if p)
        return f"{self.url}/{rel}" if rel else self.url

    # -- reading ---------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(self.read_bytes(*parts))
        except ValueError as err:  # not JSON, or not text: name the file and its repair
            raise DamagedFileError(self.uri(*parts), "/".join(parts), f"not valid JSON: {err}") from None

    def read_jsonl(self, *parts: str) -> list[dict]:
        """A JSON-lines log; a last line cut short by a crash is dropped (see `errors.parse_jsonl`)."""
        return parse_jsonl(self.read_bytes(*parts), self.uri(*parts), "/".join(parts))

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(*parts), "rb") as f:
            try:
                return pq.read_table(f, columns=columns)
            except pa.ArrowInvalid:  # truncated or not Parquet: name the file and its repair
                raise DamagedFileError(self.uri(*parts), "/".join(parts), "not a readable Parquet file") from None

    def listdir(self, *parts: str) -> list[str]:
        """Base names directly under a folder ([] if it does not exist)."""
        p = self.path(*parts)
        try:
            entries = self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # -- writing (atomic per object) -------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)  # a failed write leaves nothing behind, not a stray .tmp-* file
                if isinstance(err, OSError) and err.filename is None:
                    err.filename = target  # a full disk says which file it was writing
                raise
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), *parts)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(buf.getvalue(), *parts)

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Create an object only if absent. True if we created it (local: atomic link; else check-then-write)."""
        target = self.path(*parts)
        if self.is_local:
            # Write a private temp file, then hard-link it into place: link() fails if the target exists,
            # and the target never exists without its full content (O_EXCL + write would let a racing
            # reader see an empty lock file, take it for stale and break it).
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: plain O_EXCL create
                try:
                    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.unlink(tmp)
            return True
        if self.fs.exists(target):
            return False
        self.fs.pipe_file(target, data)
        return self.fs.cat_file(target) == data

    def remove(self, *parts: str, recursive: bool = False) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    # -- zarr ------------------------------------------------------------------------------
    def zarr_store(self, *parts: str, read_only: bool = False):
        """A zarr v3 store for a folder under the root (LocalStore on disk, FsspecStore elsewhere)."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(*parts), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.uri(*parts), storage_options=self.storage_options or None, read_only=read_only)
