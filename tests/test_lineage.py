"""The lineage: fingerprints pinned (a run root made by an earlier version stays current), each one moving
exactly the cells downstream of a change, `require` naming the command, `why_stale` naming the cause."""

import copy

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.ledger import Ledger
from pipeline.lineage import SCORE, SHARD, TEACH, TRAIN, Lineage
from pipeline.storage import Root
from stages.teachers import lineage_for

RAW = {"run": {"root": "/tmp/fp-root", "seed": 7},
       "corpus": {"sources": ["/data/photos/*.jpg"], "shard_size": 4},
       "crops": {"global_size": 56, "patch": 28, "local_count": 2, "local_store": 28},
       "teachers": {"luma": {"adapter": "pixel", "model": "luma"},
                    "ramp": {"adapter": "pixel", "model": "ramp", "prior": 0.5}},
       "score": {"policy": "best"},
       "train": {"steps": 10, "batch_size": 2, "seed": 3}}


def _lineage(**changes) -> Lineage:
    raw = copy.deepcopy(RAW)
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    return lineage_for(load_config(raw=raw))


def _all(lin: Lineage) -> dict:
    return {"shard": lin.shard, **{f"teach:{n}": fp for n, fp in lin.teachers.items()}, "metrics": lin.metrics,
            "selection": lin.selection, "train": lin.train}


def test_fingerprints_are_those_of_the_version_before_the_lineage_existed():
    # computed with stages.shard.shard_fingerprint, stages.teach.cell_fingerprint, stages.score.*_fingerprint
    # and stages.train.train_fingerprint (commit 272e79b): the same config must give the same cells
    assert _all(_lineage()) == {"shard": "f974973ac540", "teach:luma": "0c476becd6fd", "teach:ramp": "bffa1612c7a0",
                                "metrics": "f69beebc3731", "selection": "c38864c80dee", "train": "79af8261d51d"}
    assert _lineage(train__seed=None).train == "60ad687e65c1"  # train.seed unset: as before the key existed


@pytest.mark.parametrize("change, moved", [
    ({"crops__local_count": 3}, {"shard", "teach:luma", "teach:ramp", "metrics", "selection", "train"}),
    ({"teachers__ramp__model": "constant"}, {"teach:ramp", "metrics", "selection", "train"}),
    ({"score__collapse_rel_std": 0.02}, {"metrics", "selection", "train"}),
    ({"score__policy": "mix"}, {"selection", "train"}),
    ({"teachers__luma__prior": 2.0}, {"selection", "train"}),
    ({"train__lr_decoder": 1e-4}, {"train"}),
    ({"train__steps": 99, "train__workers": 1, "train__log_every": 3}, set()),  # resume-free settings
])
def test_a_change_moves_exactly_the_cells_below_it(change, moved):
    before, after = _all(_lineage()), _all(_lineage(**change))
    assert {k for k in before if before[k] != after[k]} == moved


def test_require_names_the_command_and_why_stale_names_the_cause(tmp_path):
    cfg = load_config(raw={**RAW, "run": {"root": str(tmp_path / "run"), "seed": 7}})
    root, lin = Root(cfg.run.root), lineage_for(cfg)
    with pytest.raises(FileNotFoundError, match=r"the corpus in .* is not complete: run `dad shard` first"):
        lin.require(root, SHARD)
    ledger = Ledger(root)
    ledger.mark(SHARD, "_", "final", lin.shard)
    root.write_table(pa.table({"shard": [0, 0, 1]}), "corpus", "manifest.parquet")
    lin.require(root, SHARD)
    with pytest.raises(FileNotFoundError, match=r"no cached targets for teacher 'luma': run `dad teach --teacher luma`"):
        lin.require(root, TEACH)
    for n in cfg.teachers:
        for cell in ("000000", "000001"):
            ledger.mark(TEACH, n, cell, lin.teach(n))
    lin.require(root, TEACH)
    with pytest.raises(FileNotFoundError, match=r"^no current teacher selection: run `dad score`$"):
        lin.require(root, SCORE)
    ledger.mark(SCORE, "_", "selection", lin.selection)
    lin.require(root, SCORE)
    assert [lin.why_stale(root, s, sc) for s, sc in ((TEACH, "luma"), (SCORE, "selection"), (TRAIN, "x"))] == [""] * 3

    # another teacher model: its cells (and only its) are stale, and everything below says which teacher
    changed = lineage_for(load_config(raw={**RAW, "run": {"root": str(tmp_path / "run"), "seed": 7},
                                           "teachers": {**RAW["teachers"], "ramp": {"adapter": "pixel",
                                                                                    "model": "constant"}}}))
    assert changed.why_stale(root, TEACH, "luma") == ""
    assert changed.why_stale(root, TEACH, "ramp") == "made with other teacher settings: weights, input rule or output space"
    with pytest.raises(FileNotFoundError, match=r"no current cached targets for 2 shard\(s\) for teacher 'ramp' "
                                                r"\(made with other teacher settings.*\): run `dad teach --teacher ramp`"):
        changed.require(root, TEACH)
    assert changed.why_stale(root, SCORE, "selection") == "the targets of teacher 'ramp' are not current"
    assert changed.why_stale(root, TRAIN, "student") == "the targets of teacher 'ramp' are not current"

    # another policy: the selection is stale for that reason, the teachers' cells are not
    policy = lineage_for(load_config(raw={**RAW, "run": {"root": str(tmp_path / "run"), "seed": 7},
                                          "score": {"policy": "mix"}}))
    with pytest.raises(FileNotFoundError, match=r"no current teacher selection \(the score policy, priors or "
                                                r"teacher licences changed\): run `dad score`"):
        policy.require(root, SCORE)
    assert policy.why_stale(root, TEACH, "luma") == ""


def test_a_lineage_without_teachers_knows_the_corpus_only():
    lin = Lineage(load_config(raw=RAW))
    assert lin.shard == "f974973ac540"
    with pytest.raises(TypeError, match="without `describe`"):
        lin.teach("luma")
