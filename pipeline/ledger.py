"""Completion markers, locks and read leases: what makes reruns safe (docs/run-root.md).

* Marker `ledger/<stage>/<scope>/<cell>.<fingerprint>.json`: written after the cell's outputs are
  complete; its presence is the only meaning of "done".
* Lock `ledger/locks/<stage>.<scope>.lock`: one writer at a time; a holder on this host whose process is
  gone is taken over, one elsewhere needs `--break-lock`.
* Read lease `ledger/leases/<stage>.<scope>/<token>.json`: held by readers (score, train) of the teachers'
  caches; the writer refuses to rewrite leased outputs, a reader refuses to start while the lock is held.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from pipeline.storage import Root


class LockError(RuntimeError):
    pass


class Ledger:
    def __init__(self, root: Root):
        self.root = root

    def _dir(self, stage: str, scope: str) -> tuple[str, ...]:
        return ("ledger", stage, scope)

    def mark(self, stage: str, scope: str, cell: str, fp: str, info: dict | None = None) -> None:
        record = {"stage": stage, "scope": scope, "cell": cell, "fingerprint": fp,
                  "finished": time.time(), **(info or {})}
        self.root.write_json(record, *self._dir(stage, scope), f"{cell}.{fp}.json")

    def unmark(self, stage: str, scope: str, cell: str, fp: str) -> None:
        """Withdraw a marker (its outputs turned out bad): the cell is not done until it is redone."""
        self.root.remove(*self._dir(stage, scope), f"{cell}.{fp}.json")

    def is_done(self, stage: str, scope: str, cell: str, fp: str) -> bool:
        return self.root.exists(*self._dir(stage, scope), f"{cell}.{fp}.json")

    def done(self, stage: str, scope: str, fp: str) -> set[str]:
        """Cells done under fingerprint `fp` (one listing, not one request per cell)."""
        suffix = f".{fp}.json"
        return {n[: -len(suffix)] for n in self.root.listdir(*self._dir(stage, scope)) if n.endswith(suffix)}

    def markers(self, stage: str, scope: str) -> dict[str, set[str]]:
        """cell → fingerprints it has markers for (for `dad status`)."""
        out: dict[str, set[str]] = {}
        for name in self.root.listdir(*self._dir(stage, scope)):
            if name.endswith(".json") and name.count(".") >= 2:
                cell, fp, _ = name.rsplit(".", 2)
                out.setdefault(cell, set()).add(fp)
        return out

    def info(self, stage: str, scope: str, cell: str, fp: str) -> dict:
        return self.root.read_json(*self._dir(stage, scope), f"{cell}.{fp}.json")

    def scopes(self, stage: str) -> list[str]:
        return self.root.listdir("ledger", stage)

    def forget(self, stage: str, scope: str) -> None:
        self.root.remove(*self._dir(stage, scope), recursive=True)

    def record_run(self, summary: dict) -> None:
        """Keep the latest finished run of a command (`ledger/_runs/<stage>[-<name>].json`): wall time
        and summary for the report. Not a marker: nothing is skipped because of it."""
        key = "-".join(str(x) for x in (summary.get("stage", "stage"), summary.get("name")) if x)
        flat = {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool)) or v is None}
        self.root.write_json({**flat, "finished": time.time()}, "ledger", "_runs", f"{key}.json")

    def runs(self) -> list[dict]:
        """The recorded runs, oldest first."""
        records = [self.root.read_json("ledger", "_runs", n) for n in self.root.listdir("ledger", "_runs")
                   if n.endswith(".json")]
        return sorted(records, key=lambda r: r["finished"])


# -- locks ---------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LockHolder:
    host: str
    pid: int
    started: float
    token: str
    command: str = ""

    def describe(self) -> str:
        age = time.time() - self.started
        return f"pid {self.pid} on {self.host} ({self.command or 'dad'}), started {age:.0f} s ago"

    def is_dead(self) -> bool:
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


@contextlib.contextmanager
def stage_lock(root: Root, stage: str, scope: str = "_", break_lock: bool = False, command: str = ""):
    """Hold the (stage, scope) lock for the duration of the block."""
    parts = ("ledger", "locks", f"{stage}.{scope}.lock")
    me = LockHolder(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex, command)
    payload = json.dumps(me.__dict__).encode()
    if not root.create_exclusive(payload, *parts):
        try:
            holder = LockHolder(**root.read_json(*parts))
        except (FileNotFoundError, ValueError, TypeError):
            holder = None
        if holder is not None and holder.token == me.token:
            pass
        elif holder is None or holder.is_dead() or break_lock:
            root.remove(*parts)
            if not root.create_exclusive(payload, *parts):
                raise LockError(f"could not take the {stage} lock on {root.url}: another writer raced us")
        else:
            raise LockError(
                f"another `dad {stage}` is writing to {root.url}: held by {holder.describe()}.\n"
                f"Wait for it, or if that process is gone, rerun with --break-lock.")
    try:
        yield me
    finally:
        try:
            if LockHolder(**root.read_json(*parts)).token == me.token:
                root.remove(*parts)
        except (FileNotFoundError, ValueError, TypeError):
            pass


def _holder(root: Root, *parts: str) -> LockHolder | None:
    """The holder recorded in a lock or lease file (None: absent or unreadable)."""
    try:
        return LockHolder(**root.read_json(*parts))
    except (FileNotFoundError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def read_leases(root: Root, stage: str, scopes: list[str], command: str = "", break_lock: bool = False):
    """Hold a shared read lease on each (stage, scope) for the block; refuse if its writer holds the lock.

    The lease is published before the writer's lock is looked at (and the writer takes its lock before it
    looks at leases), so of two that start together at least one sees the other and refuses."""
    me = LockHolder(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex, command)
    taken = []
    try:
        for scope in scopes:
            parts = ("ledger", "leases", f"{stage}.{scope}", f"{me.token}.json")
            root.write_json(me.__dict__, *parts)
            taken.append(parts)
        for scope in scopes:
            writer = _holder(root, "ledger", "locks", f"{stage}.{scope}.lock")
            if writer is not None and not writer.is_dead() and not break_lock:
                raise LockError(
                    f"`dad {stage}` is writing the outputs of {scope!r} this run reads, in {root.url}: held by "
                    f"{writer.describe()}. Wait for it to finish, then rerun (if that process is gone: --break-lock)")
        yield me
    finally:
        for parts in taken:
            root.remove(*parts)


def refuse_if_leased(root: Root, stage: str, scope: str, what: str, break_lock: bool = False) -> None:
    """Raise LockError naming the reader and its lease file if (stage, scope) has a live read lease.

    A lease whose holder on this host is gone, or an unreadable one, is removed; one from another host
    is removed only with `break_lock`."""
    folder = ("ledger", "leases", f"{stage}.{scope}")
    for name in root.listdir(*folder):
        holder = _holder(root, *folder, name)
        if holder is None or holder.is_dead() or break_lock:
            root.remove(*folder, name)
            continue
        raise LockError(
            f"{what} is being read by `{holder.command or 'dad'}` (pid {holder.pid} on {holder.host}, lease "
            f"{root.uri(*folder, name)}): rewriting it now would change the data under that run. Wait for "
            f"it to finish (if that process is gone: --break-lock)")
