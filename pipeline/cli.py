"""`dad`: the one face that wires the stages into a command line.

Every command takes `-c/--config FILE`, `--root URL` and repeated `--set section.key=value`, and
validates the whole config before doing any work. Stage modules are imported inside the commands so
`dad --help` stays instant.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from pipeline.config import ConfigError, DadConfig, load_config
from pipeline.errors import describe
from pipeline.layout import INIT, MODEL, rel_path, train_run
from pipeline.lineage import STAGES as LINEAGE_STAGES
from pipeline.redact import redact, redact_tree

# What the failing command was working on, for its one-line message (set per invocation).
_state: dict = {"root": None, "debug": False}


def _own_exits() -> tuple[type, ...]:
    """An exit on purpose (typer's and click's own, usage errors): not a failure to describe. Typer ≥ 0.20
    raises them from its vendored click (`typer._click`), older ones from click itself."""
    kinds = [typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
        kinds.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


_PASS_THROUGH = _own_exits()


class _GuardedGroup(TyperGroup):
    """Every failure of every command, whichever part raised it, ends as one line (`_report`); `--debug`
    may stand anywhere on the command line (users add it at the end of the command that failed)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug", *[a for i, a in enumerate(args) if not (a == "--debug" and i < end)]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as e:  # noqa: BLE001 - the point: nothing reaches the user as a bare traceback
            _report(e)


app = typer.Typer(
    name="dad", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False, cls=_GuardedGroup,
    help="[bold]dad[/bold] — distill a stronger monocular depth model from unlabeled images and several "
         "teachers (Distill Any Depth, arXiv 2502.19204).\n\n"
         "Stages, each restartable and run on Ray: [cyan]shard[/] → [cyan]teach[/] → [cyan]score[/] → "
         "[cyan]train[/] → [cyan]eval[/] / [cyan]predict[/] → [cyan]report[/]. "
         "All outputs live under one run root (local path, s3://…).")
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
zoo_app = typer.Typer(help="The offline teacher zoo of the embedded default.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(zoo_app, name="zoo")
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="run config (TOML)", exists=False)]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="override run.root (any fsspec URL)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: section.key=value (repeatable)")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray cluster: auto, host:6379, ray://host:10001")]
BreakOpt = Annotated[bool, typer.Option("--break-lock", help="take over a lock whose holder is gone")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    for noisy in ("ray", "urllib3", "filelock", "fsspec", "matplotlib", "PIL", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Path, root: str | None, sets: list[str] | None) -> DadConfig:
    _setup_logging(os.environ.get("DAD_VERBOSE") == "1")
    cfg = load_config(config, root=root, overrides=sets or [])
    _state["root"] = cfg.run.root
    return cfg


def _fail(message: str, code: int = 2) -> None:
    # one line whatever the terminal width (no wrapping), the message's brackets printed as they are
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _debug() -> bool:
    return _state["debug"] or "1" in (os.environ.get("DAD_DEBUG"), os.environ.get("DAD_VERBOSE"))


def _report(e: BaseException) -> None:
    """One line naming the file or key and the next step (pipeline.errors.describe); with --debug or
    DAD_DEBUG=1 the traceback first."""
    if _debug():
        traceback.print_exception(e, file=sys.stderr)
    _fail(describe(e, _state["root"]))


def _check_root(cfg: DadConfig) -> None:
    """A run root that cannot be one (a file; an object store that cannot be reached) fails here, naming
    run.root, before a stage trips over it somewhere inside."""
    from pipeline.storage import Root

    r = Root(cfg.run.root)
    if r.is_local and os.path.exists(r.path()) and not os.path.isdir(r.path()):
        raise ConfigError(f"run.root {cfg.run.root} is a file, not a folder: choose a folder for --root / run.root")
    r.listdir()  # reaches the store: a wrong endpoint or missing credentials fail now, as one line


def _summary(summary: dict) -> None:
    stage = summary.get("stage", "")
    parts = [f"{k}={v}" for k, v in summary.items() if k not in ("stage", "fingerprint") and not isinstance(v, (dict, list))]
    out.print(f"[bold green]✓ {stage}[/] " + " ".join(parts))


def _guarded(fn):
    """Run fn; any failure prints one clear line (`dad --debug` or DAD_DEBUG=1 adds the traceback)."""
    try:
        return fn()
    except _PASS_THROUGH:
        raise
    except Exception as e:  # noqa: BLE001 - see _report
        _report(e)


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="on failure, also print the traceback "
                                                  "(or set DAD_DEBUG=1)")] = False):
    _state.update(root=None, debug=debug)


# -- config & status ---------------------------------------------------------------------------

@config_app.command("show")
def config_show(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of TOML")] = False):
    """Print the resolved config (file + --root + --set, with every default filled in)."""
    cfg = _guarded(lambda: _load(config, root, set_))
    # Plain write, not rich: rich wraps long lines at the console width, which breaks TOML/JSON when piped.
    # Both forms are redacted: a --root or source URL's credentials are never printed.
    text = json.dumps(redact_tree(cfg.model_dump(mode="json")), indent=2) + "\n" if as_json else cfg.to_toml()
    typer.echo(text, nl=False)


@app.command()
def status(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None):
    """Per stage (and per teacher): cells done / total, and what is stale; damaged files with their repair.

    The diagnostic command never stops at the first bad file: a stage it cannot assess is a row that
    says so, and every damaged file is one line on stderr with the command that repairs it (exit code 1)."""
    cfg = _guarded(lambda: _load(config, root, set_))
    from pipeline.errors import damaged_files
    from pipeline.storage import Root

    _guarded(lambda: _check_root(cfg))
    r = Root(cfg.run.root)
    rows, problems = [], []
    from stages.teachers import lineage_for

    lineage = lineage_for(cfg)  # one per command: each teacher's weights hashed once
    for name in LINEAGE_STAGES:
        try:
            stage = importlib.import_module(f"stages.{name}")
            rows.extend(stage.status(cfg, r, lineage))
        except Exception as e:  # noqa: BLE001 - reported as a row; the other stages are still assessed
            rows.append({"stage": name, "scope": "?", "done": "?", "total": "?", "stale": "?", "note": "cannot tell"})
            problems.append(f"cannot tell {name}: {describe(e, cfg.run.root)}")
    problems.extend(f"damaged: {message}" for _, message in _guarded(lambda: damaged_files(r)))
    table = Table(title=f"dad status — {redact(cfg.run.root)}")
    for col in ("stage", "scope", "done", "total", "stale", "note"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], row["scope"], str(row["done"]), str(row["total"]), str(row["stale"]),
                      row.get("note", ""))
    out.print(table)
    for line in dict.fromkeys(problems):  # one line each, in order, no repeats
        err.print(escape(line), soft_wrap=True, highlight=False, style="yellow")
    if problems:
        raise typer.Exit(1)


# -- stages ------------------------------------------------------------------------------------

def _run_stage(module: str, cfg: DadConfig, lineage=None, **kwargs) -> dict:
    _check_root(cfg)
    stage = importlib.import_module(f"stages.{module}")
    if module in LINEAGE_STAGES:
        from stages.teachers import lineage_for

        kwargs["lineage"] = lineage or lineage_for(cfg)
    summary = stage.run(cfg, **kwargs)
    _summary(summary)
    if not summary.get("skipped"):
        from pipeline.ledger import Ledger
        from pipeline.storage import Root

        Ledger(Root(cfg.run.root)).record_run(summary)
    return summary


@app.command()
def shard(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None, address: AddressOpt = None,
          break_lock: BreakOpt = False,
          verify: Annotated[bool, typer.Option("--verify", help="sha256-check every corpus shard against its "
                                                "marker and rebuild those that differ")] = False):
    """Shard the corpus into WebDataset tars with a manifest, rejects and the crop plan."""
    cfg = _guarded(lambda: _load(config, root, set_))
    _guarded(lambda: _run_stage("shard", cfg, address=address, break_lock=break_lock, verify=verify))


@app.command()
def teach(config: ConfigOpt, teacher: Annotated[Optional[list[str]], typer.Option(
              "--teacher", help="only these teachers (repeatable; default: all configured)")] = None,
          root: RootOpt = None, set_: SetOpt = None, address: AddressOpt = None, break_lock: BreakOpt = False,
          verify: Annotated[bool, typer.Option("--verify", help="sha256-check every cached shard against its "
                                                "marker and recompute those that differ")] = False):
    """Run teachers on every shard; cache global + local predictions in Zarr (only missing cells)."""
    cfg = _guarded(lambda: _load(config, root, set_))
    _guarded(lambda: _run_stage("teach", cfg, teachers=teacher or None, address=address, break_lock=break_lock,
                                verify=verify))


@app.command()
def teachers(config: Annotated[Optional[Path], typer.Option("-c", "--config", help="run config")] = None,
             root: RootOpt = None, set_: SetOpt = None):
    """List teacher adapters and the configured teachers (output space, licence, fingerprint)."""
    from stages.teachers import describe

    cfg = _guarded(lambda: _load(config, root, set_)) if config else None
    adapters, configured = describe(cfg)
    t = Table(title="adapters (entry-point group dad.teachers)")
    t.add_column("adapter")
    t.add_column("provided by")
    for name, origin in adapters:
        t.add_row(name, origin)
    out.print(t)
    if configured:
        t = Table(title="configured teachers")
        for col in ("name", "adapter", "model", "output space", "licence", "fingerprint"):
            t.add_column(col)
        for row in configured:
            t.add_row(*[str(row[k]) for k in ("name", "adapter", "model", "output_space", "license", "fingerprint")])
        out.print(t)


@app.command()
def score(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None, address: AddressOpt = None,
          break_lock: BreakOpt = False):
    """Score every (sample, teacher) and write the per-sample teacher selection."""
    cfg = _guarded(lambda: _load(config, root, set_))
    _guarded(lambda: _run_stage("score", cfg, address=address, break_lock=break_lock))


@app.command()
def train(config: ConfigOpt, name: Annotated[Optional[str], typer.Option("--name", help="run name (train.name)")] = None,
          init_from: Annotated[Optional[str], typer.Option("--init-from", help="student checkpoint or Depth Anything model")] = None,
          workers: Annotated[Optional[int], typer.Option("--workers", help="Ray Train workers (train.workers)")] = None,
          root: RootOpt = None, set_: SetOpt = None, address: AddressOpt = None, break_lock: BreakOpt = False):
    """Train the student on cached cross-context targets (Ray Train, DDP); resumes automatically."""
    sets = list(set_ or [])
    if name:
        sets.append(f"train.name={json.dumps(name)}")
    if init_from:
        sets.append(f"train.init_from={json.dumps(init_from)}")
    if workers:
        sets.append(f"train.workers={workers}")
    cfg = _guarded(lambda: _load(config, root, sets))
    _guarded(lambda: _run_stage("train", cfg, address=address, break_lock=break_lock))


@app.command("eval")
def eval_(config: ConfigOpt,
          checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="student checkpoint")] = None,
          teacher: Annotated[Optional[str], typer.Option("--teacher", help="a configured teacher")] = None,
          dataset: Annotated[Optional[list[str]], typer.Option("--dataset", help="kind:PATH (default: eval.datasets)")] = None,
          align: Annotated[Optional[str], typer.Option("--align", help="disparity | depth | inverse_depth (default: eval.align)")] = None,
          name: Annotated[Optional[str], typer.Option("--name", help="output folder eval/<name>")] = None,
          root: RootOpt = None, set_: SetOpt = None):
    """Zero-shot evaluation of a checkpoint or a teacher (per-image LSQ alignment, AbsRel, δ1…)."""
    sets = list(set_ or [])
    if align:
        sets.append(f"eval.align={json.dumps(align)}")
    cfg = _guarded(lambda: _load(config, root, sets))
    if bool(checkpoint) == bool(teacher):
        _fail("give exactly one of --checkpoint CKPT or --teacher NAME")
    _guarded(lambda: _run_stage("evaluate", cfg, checkpoint=checkpoint, teacher=teacher,
                                datasets=dataset or None, name=name))


@app.command()
def predict(inputs: Annotated[list[str], typer.Argument(help="images, folders, globs or fsspec URLs")],
            out_dir: Annotated[str, typer.Option("--out", help="output folder (any fsspec URL)")],
            checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="student checkpoint")] = None,
            teacher: Annotated[Optional[str], typer.Option("--teacher", help="a configured teacher")] = None,
            config: Annotated[Optional[Path], typer.Option("-c", "--config", help="config (for --teacher)")] = None,
            resolution: Annotated[int, typer.Option(help="inference short side (multiple of 14)")] = 518,
            side_by_side: Annotated[bool, typer.Option("--side-by-side", help="also write image|depth PNGs")] = False,
            batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 4,
            root: RootOpt = None, set_: SetOpt = None):
    """Predict disparity for images: <name>.npy (float32, original size) and a colour-mapped <name>.png."""
    _setup_logging()
    if bool(checkpoint) == bool(teacher):
        _fail("give exactly one of --checkpoint CKPT or --teacher NAME")
    cfg = _guarded(lambda: _load(config, root, set_)) if config else None
    if teacher and cfg is None:
        _fail("--teacher needs -c/--config naming that teacher")
    from stages import predict as predict_stage

    _guarded(lambda: _summary(predict_stage.run(inputs, out_dir, checkpoint=checkpoint, teacher=teacher, cfg=cfg,
                                                resolution=resolution, side_by_side=side_by_side,
                                                batch_size=batch_size)))


@app.command()
def export(checkpoint: Annotated[str, typer.Option("--checkpoint", help="student checkpoint or train/<name> folder")],
           out_dir: Annotated[str | None, typer.Option(
               "--out", help="output folder (default: <run root>/export/<name> with -c, else export/<name>)")] = None,
           fmt: Annotated[str, typer.Option("--format", help="onnx | hf (a transformers Depth Anything folder)")] = "onnx",
           config: Annotated[Path | None, typer.Option("-c", "--config", help="run config (adds eval metrics)")] = None,
           opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 17)")] = None,
           root: RootOpt = None, set_: SetOpt = None):
    """Export a student as ONNX (or a transformers folder) with a model card: contract, teachers' licences, metrics."""
    _setup_logging()
    cfg = _guarded(lambda: _load(config, root, set_)) if config else None
    from stages import export as export_stage

    _guarded(lambda: _summary(export_stage.run(checkpoint, out_dir, fmt=fmt, cfg=cfg, opset=opset)))


@app.command()
def report(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None):
    """Build report/index.html for a run root: stages, metrics, pictures, curves, scores."""
    cfg = _guarded(lambda: _load(config, root, set_))
    _guarded(lambda: _run_stage("report", cfg))


@zoo_app.command("build")
def zoo_build(out_dir: Annotated[str, typer.Option("--out", help="where to write the zoo")] = "zoo",
              seed: Annotated[int, typer.Option(help="seed (the build is reproducible)")] = 0,
              renders: Annotated[int, typer.Option(help="rendered training views")] = 800,
              steps: Annotated[Optional[int], typer.Option(help="training steps per teacher (default: recipe)")] = None):
    """Train the two small teachers of the embedded default on rendered scenes (seeded, minutes on a CPU)."""
    _setup_logging()
    from stages import zoo

    _summary(zoo.build(out_dir, seed=seed, n_renders=renders, steps=steps))


PIPELINE = ("shard", "teach", "score", "train", "evaluate", "report")


@app.command("run")
def run_all(config: ConfigOpt, root: RootOpt = None, set_: SetOpt = None, address: AddressOpt = None,
            until: Annotated[Optional[str], typer.Option(help="stop after this stage")] = None):
    """Run every stage in order (each skips finished work) and say which ran."""
    cfg = _guarded(lambda: _load(config, root, set_))
    ran, t0 = [], time.time()
    from stages.teachers import lineage_for

    lineage = lineage_for(cfg)  # one for the whole run: each teacher's weights hashed once
    for stage in PIPELINE:
        if stage == "evaluate":
            # Every teacher, the student's starting weights (a checkpoint file: the student at step 0, at the
            # student's own input size — what distillation changed) and the trained student, on every dataset.
            for teacher in cfg.teachers:
                _guarded(lambda: _run_stage(stage, cfg, teacher=teacher))
            from stages.train import is_checkpoint_file

            start = cfg.train.init_from
            if cfg.student.arch == "tflite" and not start:  # the imported teacher, saved by the train stage
                start = f"{cfg.run.root.rstrip('/')}/{rel_path(train_run(cfg.train.name, INIT))}"
            if start and is_checkpoint_file(start):
                _guarded(lambda: _run_stage(stage, cfg, checkpoint=start, name=f"start-{cfg.train.name}"))
            ckpt = f"{cfg.run.root.rstrip('/')}/{rel_path(train_run(cfg.train.name, MODEL))}"
            _guarded(lambda: _run_stage(stage, cfg, checkpoint=ckpt, name=f"student-{cfg.train.name}"))
        else:
            kwargs = {"address": address, "lineage": lineage} if stage in LINEAGE_STAGES else {}
            _guarded(lambda: _run_stage(stage, cfg, **kwargs))
        ran.append(stage)
        if until and stage == until:
            break
    out.print(f"[bold]stages run:[/] {', '.join(ran)} in {time.time() - t0:.0f} s")


def main() -> None:  # pragma: no cover
    app()
