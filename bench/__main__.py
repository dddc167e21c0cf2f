"""Benchmark runner: `python -m bench [--quick] [names...]` (or `make bench`).

A benchmark is a public module `bench/<name>.py` with `run(quick: bool) -> dict[str, dict]`, each entry
`{value, unit, goal, detail}` (`goal` like ">= 1.0", or None). Each module runs in its own subprocess
(timeout `BENCH_TIMEOUT`, default 3600 s), so a crash, a hang or a Ray left running cannot disturb the
others. Results merge into `bench/results.json` (a failing module gets an entry with its error and loses
its previous ones); a table is printed, and the exit status is 1 if any module failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
GOAL = re.compile(r"^\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")


def discover() -> list[str]:
    """Public modules of the bench package (private `_x`, `__main__` and the `kit` package excluded), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_") and not m.ispkg)


def goal_met(value, goal) -> bool | None:
    """True/False when `goal` is a comparison like '>= 0.8' and value a number; None when it can't say."""
    if goal is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    m = GOAL.match(str(goal))
    if not m:
        return None
    op, ref = m.group(1), float(m.group(2))
    return {">=": value >= ref, "<=": value <= ref, ">": value > ref, "<": value < ref, "==": value == ref}[op]


def check_result(module: str, result) -> dict[str, dict]:
    if not isinstance(result, dict) or not result:
        raise TypeError(f"bench.{module}.run() must return a non-empty dict, got {type(result).__name__}")
    clean = {}
    for name, entry in result.items():
        if not isinstance(entry, dict) or not {"value", "unit", "goal", "detail"} <= set(entry):
            raise TypeError(f"bench.{module}: entry {name!r} needs keys value, unit, goal, detail")
        clean[str(name)] = {k: entry[k] for k in ("value", "unit", "goal", "detail")}
    return clean


def run_in_process(module: str, quick: bool, out: str) -> int:
    """Child side: import one module, run it, write its checked result (or error) as JSON."""
    try:
        mod = importlib.import_module(f"bench.{module}")
        fn = getattr(mod, "run", None)
        if not callable(fn):
            raise TypeError(f"bench.{module} defines no run(quick) function")
        payload = {"ok": True, "result": check_result(module, fn(quick))}
    except BaseException as err:  # noqa: BLE001 - reported to the parent, never raised past it
        payload = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    Path(out).write_text(json.dumps(payload, default=str))
    return 0 if payload["ok"] else 1


def run_module(module: str, quick: bool, timeout: float) -> tuple[dict | None, str | None, float]:
    """Parent side: run one module in a subprocess; (result, error, seconds)."""
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench", "--_child", module, "--_out", out] + (["--quick"] if quick else [])
        try:
            proc = subprocess.run(cmd, cwd=HERE.parent, timeout=timeout, stdout=sys.stderr, check=False)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s", time.time() - t0
        if not os.path.exists(out):
            return None, f"exited with status {proc.returncode} without a result", time.time() - t0
        payload = json.loads(Path(out).read_text())
    if not payload["ok"]:
        sys.stderr.write(payload.get("traceback", ""))
        return None, payload["error"], time.time() - t0
    return payload["result"], None, time.time() - t0


def load_results(path: Path = RESULTS) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def merge(results: dict, module: str, new: dict | None, error: str | None, quick: bool) -> dict:
    """Drop the module's previous entries, add the new ones (or one error entry)."""
    merged = {k: v for k, v in results.items() if not (isinstance(v, dict) and v.get("module") == module)}
    stamp = {"module": module, "quick": quick, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if error is not None:
        merged[module] = {"value": None, "unit": None, "goal": None, "detail": f"FAILED: {error}", **stamp,
                          "error": error}
    else:
        for name, entry in (new or {}).items():
            merged[name] = {**entry, **stamp}
    return dict(sorted(merged.items()))


def print_table(results: dict, ran: set[str], path: Path = RESULTS) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dad benchmarks ({path})")
    for col, just in (("name", "left"), ("value", "right"), ("unit", "left"), ("goal", "left"),
                      ("met?", "center"), ("run", "left")):
        table.add_column(col, justify=just)
    for name, e in results.items():
        value = e.get("value")
        shown = f"{value:.3g}" if isinstance(value, float) else ("—" if value is None else str(value))
        met = goal_met(value, e.get("goal"))
        mark = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[met]
        if e.get("error"):
            mark = "[red]error[/]"
        when = ("now" if e.get("module") in ran else e.get("when", "")) + (" (quick)" if e.get("quick") else "")
        table.add_row(name, shown, str(e.get("unit") or ""), str(e.get("goal") or "—"), mark, when)
    Console().print(table)
    for name, e in results.items():
        if e.get("module") in ran:
            Console().print(f"[bold]{name}[/]: {e.get('detail')}", markup=True, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repetitions")
    ap.add_argument("--results", default=str(RESULTS), help="results file to merge into")
    ap.add_argument("names", nargs="*", help="benchmark modules to run (default: all)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return run_in_process(args._child, args.quick, args._out)

    available = discover()
    unknown = [n for n in args.names if n not in available]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available) or 'none'}")
    chosen = args.names or available
    timeout = float(os.environ.get("BENCH_TIMEOUT", "3600"))
    path = Path(args.results)
    results, failed = load_results(path), []
    for module in chosen:
        print(f"== bench.{module}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        new, error, secs = run_module(module, args.quick, timeout)
        print(f"== bench.{module}: {'FAILED: ' + error if error else 'ok'} in {secs:.0f} s", file=sys.stderr,
              flush=True)
        if error:
            failed.append(module)
        results = merge(results, module, new, error, args.quick)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")  # after each module: partial runs count
    print_table(results, set(chosen), path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
