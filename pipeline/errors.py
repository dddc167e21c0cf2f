"""Failures as one line for the user: what went wrong, which file or config key, and what to do next.

The CLI prints `describe(err)` instead of a traceback (`dad --debug …` or DAD_DEBUG=1 shows the traceback
as well). Ray wraps a task's exception (RayTaskError), Ray Train a worker's (WorkerGroupError) and the
stages their own causes (`raise … from err`): `causes` / `root_cause` / `cause_line` are the one place that unwraps
them. A file of the run root that exists but cannot be parsed raises `DamagedFileError`, whose message
carries the command that repairs it (`repair_hint`); `damaged_files` is what `dad status` checks.
"""

from __future__ import annotations

import errno
import json
import re
from urllib.parse import urlsplit

from pipeline.layout import (
    CROP_PLAN,
    LISTING,
    MANIFEST,
    METRICS_LOG,
    REJECTS,
    SCORES,
    SELECTION,
    SELECTION_SUMMARY,
    SUMMARY,
    VAL_LOG,
    rel_path,
    train_run,
)

# Ray formats a remote exception as its traceback; the last line is the error itself.
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b")
_TMP_SUFFIX = re.compile(r"\.tmp-[0-9a-f]{8,}$")
_DISK = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_DENIED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


class DamagedFileError(ValueError):
    """A file under the run root exists but cannot be read as what it should be (a ValueError, as the
    JSON/Parquet errors it replaces, so callers that treat those as "unreadable" keep doing so)."""

    def __init__(self, uri: str, rel: str, why: str):
        self.uri, self.rel = uri, rel
        super().__init__(f"{uri} is damaged ({_flat(why)[:200]}): {repair_hint(rel)}")


def repair_hint(rel: str) -> str:
    """The next step for a damaged run-root file `rel` (relative path): which command rewrites it."""
    parts = rel.strip("/").split("/")
    head, name = parts[0], parts[-1]
    if rel == "dad.toml":
        return "delete it and rerun `dad shard` (it is rewritten from your config; finished shards are kept)"
    if head == "ledger" and len(parts) > 1:
        if parts[1] == "_runs":
            return "delete it (it only records the last run of a command for the report)"
        if parts[1] in ("locks", "leases"):
            return "delete it if no dad command is running on this root"
        stage, scope = parts[1], parts[2] if len(parts) > 3 else "_"
        flag = {"teach": f" --teacher {scope}", "train": f" --name {scope}"}.get(stage, "")
        return f"delete it and rerun `dad {stage}{flag}` (only that cell is redone)"
    if rel in (rel_path(MANIFEST), rel_path(REJECTS), rel_path(CROP_PLAN)):
        return "rerun `dad shard` (it rewrites it from the finished shards)"
    if rel == rel_path(LISTING):
        return "delete it and ledger/shard/_/listing.*.json, then rerun `dad shard`"
    if head == "corpus" and len(parts) > 2 and parts[1] == "parts":
        return f"delete it and ledger/shard/_/{name.split('.')[0]}.*.json, then rerun `dad shard`"
    if rel in (rel_path(SELECTION), rel_path(SELECTION_SUMMARY)):
        return "rerun `dad score` (it rewrites the selection)"
    if rel == rel_path(SCORES):
        return "delete ledger/score/_/scores.*.json and rerun `dad score`"
    if head == "scores" and len(parts) > 2 and parts[1] == "parts":
        return f"delete it and ledger/score/metrics/{name.split('.')[0]}.*.json, then rerun `dad score`"
    if head == "train" and len(parts) > 2:
        run = parts[1]
        if name.endswith(".jsonl"):
            return "delete it (a training log: the weights do not depend on it)"
        if name == "summary.json":
            return f"delete ledger/train/{run}/final.*.json and rerun `dad train --name {run}`"
        return f"delete it and rerun `dad train --name {run}` (it resumes from the newest checkpoint left)"
    if head == "eval" and len(parts) > 2:
        return f"rerun the `dad eval … --name {parts[1]}` that wrote it"
    if head == "report":
        return "rerun `dad report`"
    return "restore or delete it, then rerun the stage that writes it"


def causes(err: BaseException):
    """`err`, then each exception it wraps, outermost first: through Ray's task wrapper (`.cause`) and every
    `raise … from`."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        inner = getattr(err, "cause", None) if _is_ray(err) else None
        err = inner if isinstance(inner, BaseException) else err.__cause__


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception: through Ray's task wrapper (`.cause`) and every `raise … from`."""
    *_, inner = causes(err)
    return inner


def cause_line(err: BaseException) -> str:
    """'Type: message' of the innermost error in one line (a failed Ray Train group: its first rank's)."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"rank {rank}: {cause_line(failures[rank])}"
    cause = root_cause(err)
    lines = [x for x in str(cause).strip().splitlines() if x.strip()]
    if len(lines) > 1 and _EXCEPTION_LINE.match(lines[-1].strip()):
        return lines[-1].strip()
    return f"{type(cause).__name__}: {lines[0].strip() if lines else '(no message)'}"


def describe(err: BaseException, root: str | None = None) -> str:
    """The one line the CLI prints for `err` (`root`: the run root the command used, if known). Credentials
    in a URL (`s3://KEY:SECRET@bucket`) and signature parameters never reach the terminal."""
    from pipeline.redact import redact

    return redact(_line(err, root))


def _line(err: BaseException, root: str | None) -> str:
    while _is_ray(err) and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause  # Ray's text is a remote traceback; the task's own exception says it better
    inner = root_cause(err)
    if isinstance(inner, OSError) and inner.errno in (*_DISK, *_DENIED, errno.ENOTDIR):
        return _os_line(inner, root)  # the disk is the problem, whichever stage wrapped it
    if _is_object_store(err):
        return _store_line(err, root)
    if isinstance(err, OSError) and err.__cause__ is not None and _is_object_store(err.__cause__):
        return _store_line(err.__cause__, root)  # s3fs's translation drops the bucket and the request
    if isinstance(err, OSError) and err.errno is not None:
        return _os_line(err, root)
    text = _flat(str(err))
    if isinstance(err, (ValueError, RuntimeError, OSError)) and text:  # ours are phrased for the user
        return text
    return (f"unexpected {type(err).__name__}: {text or '(no message)'} — rerun with --debug for the traceback "
            f"(and report it if the cause is not yours)")


def _os_line(err: OSError, root: str | None) -> str:
    where = err.filename or root or "the run root"
    if isinstance(where, str):
        where = _TMP_SUFFIX.sub("", where)  # the file being written, not its temporary name
    if err.errno in _DISK:
        return (f"{_DISK[err.errno]} writing {where}: free space (or use another --root), then rerun the same "
                f"command; finished work is kept")
    if err.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system: choose a writable run root (--root / run.root)"
    if err.errno in _DENIED:
        return (f"{where}: {_DENIED[err.errno]}: give this user access to it, or choose another run root "
                f"(--root / run.root) if it is part of one")
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and isinstance(where, str):
        blocker = _file_in_path(where)
        if blocker:
            return (f"{blocker} is a file where a folder is expected: run.root (--root) must name a folder; "
                    f"move that file away or choose another root")
    base = (root or "").split("://", 1)[-1].rstrip("/")
    if isinstance(err, FileNotFoundError) and base and isinstance(where, str) and where.startswith(f"{base}/"):
        return f"{where} is missing: {repair_hint(where[len(base) + 1:])}"
    return f"{err.strerror or _flat(str(err))}: {where}"


def _store_line(err: BaseException, root: str | None) -> str:
    name, where = type(err).__name__, root or "the run root"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        url = urlsplit(str(getattr(err, "kwargs", {}).get("endpoint_url", "")) or _first_url(str(err)))
        host = url.hostname or "?"
        return (f"cannot reach the object store holding {where} ({url.scheme or 'http'}://{host}"
                f"{f':{url.port}' if url.port else ''}): check AWS_ENDPOINT_URL and the network, then rerun")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (f"no usable credentials for the object store holding {where}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), then rerun")
    error = (getattr(err, "response", None) or {}).get("Error", {})
    if error:
        return (f"the object store refused a request for {where} ({error.get('Code', '?')}: "
                f"{_flat(str(error.get('Message', '')))}): check the bucket in run.root and your permissions")
    return f"object store error for {where}: {name}: {_flat(str(err))[:300]}"


def damaged_files(root) -> list[tuple[str, str]]:
    """(relative path, one-line message) for each file of the run root that later stages parse and that
    cannot be parsed — what `dad status` reports. Cheap: Parquet footers, small JSON/TOML documents."""
    import tomllib

    import pyarrow.parquet as pq

    found = []

    def check(rel: str, parse) -> None:
        parts = rel.split("/")
        try:
            if root.exists(*parts):
                parse(parts)
        except DamagedFileError as err:
            found.append((rel, str(err)))
        except (ValueError, tomllib.TOMLDecodeError) as err:  # ArrowInvalid, TOMLDecodeError, UnicodeError
            found.append((rel, str(DamagedFileError(root.uri(*parts), rel, str(err)))))

    def footer(parts):
        with root.fs.open(root.path(*parts), "rb") as f:
            try:
                pq.read_metadata(f)
            except ValueError:  # ArrowInvalid
                raise DamagedFileError(root.uri(*parts), "/".join(parts), "not a readable Parquet file") from None

    check("dad.toml", lambda p: tomllib.loads(root.read_bytes(*p).decode()))
    for parts in (LISTING, MANIFEST, REJECTS, CROP_PLAN, SCORES, SELECTION):
        check(rel_path(parts), footer)
    check(rel_path(SELECTION_SUMMARY), lambda p: root.read_json(*p))
    for name in root.listdir("ledger", "_runs"):
        check(f"ledger/_runs/{name}", lambda p: root.read_json(*p))
    for run in root.listdir("train"):
        check(rel_path(train_run(run, SUMMARY)), lambda p: root.read_json(*p))
        for log in (METRICS_LOG, VAL_LOG):
            check(rel_path(train_run(run, log)), lambda p: root.read_jsonl(*p))
    return found


def parse_jsonl(data: bytes, uri: str, rel: str) -> list[dict]:
    """The records of a JSON-lines log. A last line cut short (no newline: a crash while it was appended)
    is dropped, as if never written; any other unreadable line is damage."""
    text = data.decode(errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:  # the unterminated last line
                break
            raise DamagedFileError(uri, rel, f"line {i + 1} is not JSON: {err}") from None
    return records


def _is_ray(err: BaseException) -> bool:
    return type(err).__module__.startswith("ray.")


def _is_object_store(err: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in ("botocore", "aiobotocore") for c in type(err).__mro__)


def _file_in_path(path: str) -> str | None:
    """The first component of a local `path` that exists as a file (not a folder)."""
    import os

    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        p = "/".join(parts[:i])
        if os.path.isfile(p):
            return p
    return None


def _first_url(text: str) -> str:
    m = re.search(r"https?://[^\s\"']+", text)
    return m.group(0) if m else ""


def _flat(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
