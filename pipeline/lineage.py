"""Lineage: the fingerprint of every cell of a run, what each stage needs done first, and why a cell is stale.

shard → teach(teacher) → metrics → selection → train. Each fingerprint hashes the settings its outputs
depend on and the fingerprint of what it reads, so a change upstream makes exactly the cells below it
stale. One object per command: a teacher's identity (which hashes its weights) is computed once, on first
use, by the `describe` function the caller passes (`stages.teachers.spec_for`); the spine imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

from pipeline.config import DadConfig, fingerprint, load_config
from pipeline.errors import DamagedFileError
from pipeline.storage import Root

# The ledger's stages, upstream first.
SHARD, TEACH, SCORE, TRAIN = "shard", "teach", "score", "train"
STAGES = (SHARD, TEACH, SCORE, TRAIN)
# The settings the corpus (and so every later cell) depends on: recorded in dad.toml, never changed in a root.
SHARD_KEYS = ("run.seed", "corpus", "crops")
# Training settings that do not change the weights a step produces: a run resumes across them.
RESUME_FREE = {"steps", "checkpoint_every", "log_every", "workers", "cpus_per_worker", "gpus_per_worker",
               "resources_per_worker", "prefetch", "name", "val_dataset", "val_every", "val_samples"}


class StaleConfigError(RuntimeError):
    pass


class Lineage:
    """Fingerprints of one config's cells. `describe(name, teacher_cfg)` gives a teacher's spec (`.fingerprint`:
    weights identity, input rule, output space; `.output_space`) without loading its weights."""

    def __init__(self, cfg: DadConfig, describe: Callable[[str, Any], Any] | None = None):
        self.cfg, self._describe, self._specs = cfg, describe, {}

    def spec(self, teacher: str):
        if teacher not in self._specs:
            if self._describe is None:
                raise TypeError("this Lineage was built without `describe`: it knows the corpus, not the teachers")
            self._specs[teacher] = self._describe(teacher, self.cfg.teachers[teacher])
        return self._specs[teacher]

    # -- fingerprints ---------------------------------------------------------------------------------

    @cached_property
    def shard(self) -> str:
        from pipeline.crops import PLAN_VERSION

        return fingerprint({"cfg": self.cfg.section_fingerprint(*SHARD_KEYS), "plan": PLAN_VERSION})

    def teach(self, teacher: str) -> str:
        from pipeline.cache import LAYOUT

        return fingerprint({"teacher": self.spec(teacher).fingerprint, "corpus": self.shard, "layout": LAYOUT})

    @cached_property
    def teachers(self) -> dict[str, str]:
        """teacher → its teach-cell fingerprint, for every configured teacher."""
        return {n: self.teach(n) for n in self.cfg.teachers}

    @cached_property
    def metrics(self) -> str:
        s = self.cfg.score
        return fingerprint({"teachers": self.teachers, "collapse": s.collapse_rel_std, "valid": s.min_valid_fraction,
                            "v": 1})

    @cached_property
    def selection(self) -> str:
        teachers = self.cfg.teachers
        policy = self.cfg.score.model_dump(exclude={"collapse_rel_std", "min_valid_fraction"})
        return fingerprint({"metrics": self.metrics, "policy": policy, "priors": {n: t.prior for n, t in teachers.items()},
                            "licenses": {n: t.license for n, t in teachers.items()}})

    @cached_property
    def train(self) -> str:
        """What the weights depend on (not the step budget or the workers' resources)."""
        cfg = self.cfg
        # train.seed unset leaves the fingerprint exactly as before the key existed (existing runs resume)
        skip = RESUME_FREE | ({"seed"} if cfg.train.seed is None else set())
        # a ViT student's fingerprint is what it was before graph students existed (existing runs resume)
        student = cfg.student.model_dump(exclude={"arch", "init_from"} if cfg.student.arch == "vit" else None)
        if cfg.student.arch == "tflite":
            from pipeline.models import graph_source

            student["init_from"] = graph_source(cfg)[0]  # the weights' identity, not where they were read
        return fingerprint({"train": cfg.train.model_dump(exclude=skip), "student": student,
                            "selection": self.selection, "seed": cfg.train_seed, "workers": cfg.train.workers})

    def output_spaces(self, teachers: list[str] | None = None) -> dict[str, str]:
        return {n: self.spec(n).output_space for n in (teachers or self.cfg.teachers)}

    # -- what a stage needs ------------------------------------------------------------------------------

    def require(self, root: Root, stage: str, teachers: list[str] | None = None) -> None:
        """Raise FileNotFoundError, naming the command to run, unless every cell `stage` reads is current:
        `shard` the finished corpus; `teach` every shard's targets of `teachers` (default: all); `score` the
        selection."""
        from pipeline.corpus import shard_ids
        from pipeline.layout import shard_name
        from pipeline.ledger import Ledger

        ledger = Ledger(root)
        if stage == SHARD and not ledger.is_done(SHARD, "_", "final", self.shard):
            raise FileNotFoundError(f"the corpus in {root.url} is not complete: run `dad shard` first")
        if stage == TEACH:
            shards = {shard_name(s) for s in shard_ids(root)}
            for n in teachers or list(self.cfg.teachers):
                missing = shards - ledger.done(TEACH, n, self.teach(n))
                if missing:
                    why = self._why(ledger, TEACH, n)
                    what = ("no cached targets" if missing == shards and not why
                            else f"no current cached targets for {len(missing)} shard(s)")
                    raise FileNotFoundError(f"{what} for teacher {n!r}{_paren(why)}: run `dad teach --teacher {n}`")
        if stage == SCORE and not ledger.is_done(SCORE, "_", "selection", self.selection):
            raise FileNotFoundError(f"no current teacher selection{_paren(self._why(ledger, SCORE, 'selection'))}: "
                                    f"run `dad score`")

    def why_stale(self, root: Root, stage: str, scope: str) -> str:
        """Why `stage`'s cells in `scope` (a teacher; `metrics`/`selection`; a training name) are not current,
        naming the nearest cause upstream; "" when nothing is stale."""
        from pipeline.ledger import Ledger

        return self._why(Ledger(root), stage, scope)

    def _why(self, ledger, stage: str, scope: str) -> str:
        """The first cause found, upstream first; "" if the cells are current or were never made."""
        def made_with_other(st: str, sc: str, fp: str, cell: str | None = None) -> bool:
            fps = [f for c, f in ledger.markers(st, sc).items() if cell in (None, c)]
            return bool(fps) and not any(fp in f for f in fps)

        if stage == TEACH:
            if made_with_other(SHARD, "_", self.shard, "final"):
                return "the corpus was made with other settings"
            return "made with other teacher settings: weights, input rule or output space" \
                if made_with_other(TEACH, scope, self.teach(scope)) else ""
        if stage == SCORE:
            stale = [n for n in self.cfg.teachers if made_with_other(TEACH, n, self.teach(n))]
            if stale:
                return f"the targets of teacher {stale[0]!r} are not current"
            if made_with_other(SCORE, "metrics", self.metrics):
                return "teachers or score.collapse_rel_std / min_valid_fraction changed"
            if made_with_other(SCORE, "_", self.selection, "selection"):
                return "the score policy, priors or teacher licences changed"
            return ""
        if stage == TRAIN:
            upstream = self._why(ledger, SCORE, "selection")
            return upstream or ("train or student settings changed"
                                if made_with_other(TRAIN, scope, self.train) else "")
        return ""


def _paren(why: str) -> str:
    return f" ({why})" if why else ""


# -- the recorded config ---------------------------------------------------------------------------------

def check_recorded(root: Root, cfg: DadConfig, stage: str) -> None:
    """Write dad.toml on first use; refuse a config whose shard settings (`SHARD_KEYS`) changed since."""
    if not root.exists("dad.toml"):
        root.write_bytes(cfg.to_toml().encode(), "dad.toml")
        return
    import tomllib

    try:
        raw = tomllib.loads(root.read_bytes("dad.toml").decode())
    except ValueError as err:  # TOMLDecodeError, UnicodeDecodeError: name the file and how to repair it
        raise DamagedFileError(root.uri("dad.toml"), "dad.toml", f"not valid TOML: {err}") from None
    old, new = load_config(raw=raw).identity(), cfg.identity()  # dad.toml holds a redacted config
    changed = [k for k in _flat_keys(SHARD_KEYS, new) if _get(old, k) != _get(new, k)]
    if changed and stage != SHARD:
        raise StaleConfigError(
            f"{', '.join(changed)} changed since `dad shard` wrote {root.url}. The cached outputs "
            f"were made with the old values: rerun `dad shard` on a new --root, or restore them.")
    if changed:
        if root.exists("ledger", SHARD):
            raise StaleConfigError(f"{', '.join(changed)} differ from the run recorded in {root.url}/dad.toml; "
                                   f"use a new --root for a different corpus or crop plan.")
        root.write_bytes(cfg.to_toml().encode(), "dad.toml")


def _flat_keys(keys: tuple[str, ...], tree: dict) -> list[str]:
    out = []
    for key in keys:
        node = _get(tree, key)
        if isinstance(node, dict):
            out.extend(_flat_keys(tuple(f"{key}.{k}" for k in node), tree))
        else:
            out.append(key)
    return out


def _get(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
