"""Ray runtime and executors: how a stage's per-cell work gets run.

Stages describe *what* to do per cell (a corpus shard, a (teacher, shard) pair) as plain functions; this
module decides *where*: `RayExecutor` (the default: `run.ray_address` / `--address`, or a local cluster
with this machine's CPUs and GPUs) or `InlineExecutor` (this process, one cell after another: memory://
roots, debugging, `run.executor = "inline"`). Both show a progress bar and return results in completion
order with the cell they belong to.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config import RunCfg

log = logging.getLogger("dad")
console = Console(stderr=True)

_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data re-applies its own INFO config at each execution otherwise
    "RAY_BACKEND_LOG_LEVEL": "fatal",  # C++ core-worker chatter; full logs stay in the Ray session folder
    "RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
}


def progress(total: int, description: str) -> Progress:
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=False,
                   disable=not console.is_terminal and os.environ.get("DAD_PROGRESS") != "1")
    bar.add_task(description, total=total)
    return bar


def init_ray(run: RunCfg, address: str | None = None) -> float:
    """Connect to (or start) Ray once per process; quiet, with the project importable on workers. Returns
    the seconds it took (0 when this process already had Ray: `dad run` starts it once for every stage)."""
    import ray

    if ray.is_initialized():
        return 0.0
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    address = address or run.ray_address
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING,
                                  configure_logging=True, include_dashboard=False)
    if address:
        kwargs["address"] = address
        kwargs.pop("include_dashboard")
        from pipeline.models import CACHE_ENV, MIRROR_ENV

        env = {k: os.environ[k] for k in (MIRROR_ENV, CACHE_ENV) if k in os.environ}
        if env:  # a local cluster inherits them; a remote one's workers get them here
            kwargs["runtime_env"] = {"env_vars": env}
    else:
        if run.num_cpus:
            kwargs["num_cpus"] = run.num_cpus
    warnings.filterwarnings("ignore", module="ray")
    t0 = time.time()
    ray.init(**kwargs)
    res = ray.cluster_resources()
    took = time.time() - t0
    log.info("ray: %s (%.0f CPU, %.0f GPU) in %.1f s", address or "local cluster",
             res.get("CPU", 0), res.get("GPU", 0), took)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # dad draws its own progress bars; Ray Data would warn once that its own are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.raise_original_map_exception = True  # a stage's own error (which cell, which teacher), not a wrapper
    except Exception:  # pragma: no cover - older/newer Ray
        pass
    return took


class UnsatisfiableError(ValueError):
    """A resource request no node of the cluster can meet: Ray would queue it forever, silently."""


@dataclass(frozen=True)
class Request:
    """What `count` units (teach actors, train workers) each ask Ray for: resource → (config key, amount)."""

    amounts: dict[str, tuple[str, float]]
    count: int = 1
    count_key: str = ""


def teacher_request(name: str, tcfg) -> Request:
    """One actor of teacher `name` (actors run one at a time if need be, so one must fit)."""
    key = f"teachers.{name}"
    amounts = {"CPU": (f"{key}.num_cpus", tcfg.num_cpus), "GPU": (f"{key}.num_gpus", tcfg.num_gpus),
               "memory": (f"{key}.memory", tcfg.memory or 0),
               **{r: (f"{key}.resources.{r}", v) for r, v in tcfg.resources.items()}}
    return Request(amounts)


def worker_request(train) -> Request:
    """`train.workers` DDP workers, all of which must run at once."""
    amounts = {"CPU": ("train.cpus_per_worker", train.cpus_per_worker),
               "GPU": ("train.gpus_per_worker", train.gpus_per_worker),
               **{r: (f"train.resources_per_worker.{r}", v) for r, v in train.resources_per_worker.items()}}
    return Request(amounts, train.workers, "train.workers")


def require_resources(requests: list[Request]) -> None:
    """Refuse, before any work, a request the connected cluster can never meet (a GPU on a CPU machine, a
    custom resource no node has, more CPUs than any node): Ray would wait for it forever. Checked against
    the nodes alive now (a local cluster's are all it will ever have); call after `init_ray`."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for req in requests:
        need = {r: (k, float(v)) for r, (k, v) in req.amounts.items() if v and v > 0}
        for r, (key, amount) in need.items():
            largest = max((n.get(r, 0.0) for n in nodes), default=0.0)
            if largest < amount:
                raise UnsatisfiableError(
                    f"{key} = {_amount(r, amount)} can never be met: no node of the Ray cluster has "
                    f"{_amount(r, amount)} {r} (it has {_cluster(nodes)}); lower it, or connect to a cluster "
                    f"that has it (--address / run.ray_address)")
        fits = sum(int(min((n.get(r, 0.0) / a for r, (_, a) in need.items()), default=req.count)) for n in nodes)
        if fits < req.count:
            keys = " and ".join(f"{k} = {_amount(r, a)}" for r, (k, a) in need.items())
            raise UnsatisfiableError(
                f"{req.count_key or 'the request'} = {req.count} with {keys} each can never be met: the Ray "
                f"cluster fits {fits} at once (it has {_cluster(nodes)}); lower them, or connect to a larger "
                f"cluster (--address / run.ray_address)")


def _amount(resource: str, value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if resource == "memory" else f"{value:g}"


def _cluster(nodes: list[dict]) -> str:
    """'1 node: 2 CPU, 0 GPU, 15.0 GiB memory' (+ custom resources): what a request is compared with."""
    total: dict[str, float] = {}
    for n in nodes:
        for r, v in n.items():
            if not r.startswith("node:") and r != "object_store_memory":
                total[r] = total.get(r, 0.0) + v
    parts = [f"{total.pop('CPU', 0):g} CPU", f"{total.pop('GPU', 0):g} GPU",
             f"{total.pop('memory', 0) / 2**30:.1f} GiB memory", *(f"{v:g} {r}" for r, v in sorted(total.items()))]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {', '.join(parts)}"


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def use_inline(run: RunCfg, process_local_root: bool) -> bool:
    if run.executor == "inline":
        return True
    if process_local_root:
        if run.executor == "ray":
            raise ValueError("run.executor = 'ray' cannot use a memory:// root (it is invisible to workers)")
        return True
    return False


class InlineExecutor:
    """Run cells in this process (memory:// roots, debugging)."""

    def map(self, fn: Callable, cells: list, description: str, **_: Any) -> Iterator[tuple[Any, Any]]:
        with progress(len(cells), description) as bar:
            for cell in cells:
                out = fn(cell)
                bar.advance(0, 1)  # task 0: the only bar
                yield cell, out


class RayExecutor:
    """One Ray task per cell; results stream back as they finish."""

    def __init__(self, run: RunCfg, address: str | None = None):
        init_ray(run, address)

    def map(self, fn: Callable, cells: list, description: str, num_cpus: float = 1,
            max_retries: int = 3, **options: Any) -> Iterator[tuple[Any, Any]]:
        import ray

        remote = ray.remote(_apply).options(num_cpus=num_cpus, max_retries=max_retries,
                                            retry_exceptions=False, **options)
        fn_ref = ray.put(fn)  # the work function (with its config) ships once, not once per cell
        pending = {remote.remote(fn_ref, cell): cell for cell in cells}
        with progress(len(cells), description) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                cell = pending.pop(ref)
                yield cell, ray.get(ref)
                bar.advance(0, 1)  # task 0: the only bar


def _apply(fn: Callable, cell: Any) -> Any:
    return fn(cell)


def executor_for(run: RunCfg, process_local_root: bool, address: str | None = None):
    return InlineExecutor() if use_inline(run, process_local_root) else RayExecutor(run, address)
