"""bench/repro.py: the claim and table logic on synthetic results, and tiny arms end to end.

The end-to-end test builds its own two random-weight `tiny` teachers (so it needs no zoo build),
renders a 4-view corpus at 96², and runs two arms that differ in normalisation, paradigm and teacher
selection policy through shard → teach → score → train → evaluate, then the whole `experiment()`.
"""

from __future__ import annotations

import json

import pytest

from bench import repro
from bench.repro import ARM, ARMS, CLAIMS, TABLE1, TABLE2, TABLE4, Sizes, aggregate, judge, tables, verdicts

DATASETS = ["scenes", "realeval"]


def synthetic(means: dict[str, float], spread: float = 0.0, seeds: int = 3, default: float = 0.30) -> list[dict]:
    """Runs of every arm: AbsRel = the arm's mean + spread × (−1, 0, +1, …) over seeds, on both datasets."""
    runs = []
    for arm in ARMS:
        for s in range(seeds):
            v = means.get(arm.name, default) + spread * (s - (seeds - 1) / 2)
            runs.append({"arm": arm.name, "seed": s, "metrics": {d: {"abs_rel": v, "delta1": 0.5} for d in DATASETS}})
    return runs


def claim(cid: str):
    return next(c for c in CLAIMS if c.id == cid)


def test_every_table_and_claim_names_a_defined_arm():
    named = {a for _, sc, lg in TABLE1 for a in (sc, lg)} | {r[2] for r in TABLE2} | {r[1] for r in TABLE4}
    named |= {a for c in CLAIMS for a in (c.a, c.b)}
    assert named == set(ARM), "an arm no table uses is wasted compute; a table arm without a run is a gap"
    assert len(ARMS) == 12 and len({a.name for a in ARMS}) == 12
    # the arms differ only in the setting under test: nothing but norm / terms / policy / priors
    keys = {o.split("=")[0] for a in ARMS for o in a.overrides()}
    assert keys <= {"train.norm", "train.use_sc", "train.use_lg", "score.policy", "teachers.layout.prior",
                    "teachers.detail.prior"}


def test_mean_std_over_seeds():
    agg = aggregate(synthetic({"sc-hybrid": 0.20}, spread=0.01), DATASETS)
    ms = agg["sc-hybrid"]["scenes"]
    assert ms["n"] == 3 and ms["mean"] == pytest.approx(0.20) and ms["std"] == pytest.approx(0.01)
    one = aggregate(synthetic({}, seeds=1), DATASETS)["sc-none"]["realeval"]
    assert one["n"] == 1 and one["std"] is None
    missing = aggregate([{"arm": "sc-none", "seed": 0, "metrics": {"scenes": {"abs_rel": float("nan")}}}], DATASETS)
    assert missing["sc-none"]["scenes"]["mean"] is None and missing["sc-none"]["realeval"]["n"] == 0


def test_a_claim_holds_only_with_the_paper_sign_and_beyond_the_seed_spread():
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.25}, spread=0.01), DATASETS)
    v = judge(claim("1a"), agg, "scenes")
    assert v["holds"] and v["delta"] == pytest.approx(0.05) and v["noise"] == pytest.approx(0.01) and v["seeds"] == 3
    # the right sign, but smaller than the seeds' spread: not established
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.205}, spread=0.01), DATASETS)
    assert judge(claim("1a"), agg, "scenes")["holds"] is False
    # the opposite sign
    agg = aggregate(synthetic({"sc-hybrid": 0.25, "sc-global": 0.20}), DATASETS)
    v = judge(claim("1a"), agg, "scenes")
    assert v["holds"] is False and v["delta"] < 0
    # one seed: the sign alone decides, and the verdict says so
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.2001}, seeds=1), DATASETS)
    assert judge(claim("1a"), agg, "scenes")["holds"] is True
    assert "sign only" in verdicts(agg, DATASETS, "scenes")[0]["verdict"]


def test_tie_claim_uses_the_larger_of_seed_std_and_two_percent():
    c = claim("1b")
    assert c.kind == "tie"
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.203}), DATASETS)  # 1.5 % apart, no spread
    assert judge(c, agg, "scenes")["holds"] is True
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.230}), DATASETS)  # 15 % apart
    assert judge(c, agg, "scenes")["holds"] is False
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.230}, spread=0.04), DATASETS)  # within the noise
    assert judge(c, agg, "scenes")["holds"] is True


def test_verdicts_count_the_primary_dataset_and_report_the_other():
    means = {"sc-hybrid": 0.20, "sc-global": 0.25}
    runs = synthetic(means, spread=0.001)
    for r in runs:  # on realeval the order is reversed
        if r["arm"] in means:
            r["metrics"]["realeval"]["abs_rel"] = 0.45 - r["metrics"]["scenes"]["abs_rel"]
    out = {c["id"]: c for c in verdicts(aggregate(runs, DATASETS), DATASETS, "scenes")}
    assert out["1a"]["holds"] is True and out["1a"]["verdict"] == "holds"
    assert out["1a"]["per_dataset"]["realeval"]["holds"] is False
    assert {c["id"] for c in out.values() if c["primary"]} == {"1a", "1b", "1c", "2a", "2b", "2c", "3"}
    none_run = verdicts({}, DATASETS, "scenes")
    assert all(c["holds"] is None and c["verdict"] == "not run" for c in none_run)


def test_tables_have_the_papers_shape():
    agg = aggregate(synthetic({"sc-global": 0.25, "sclg-hybrid": 0.20}, spread=0.01), DATASETS)
    t = tables(agg, DATASETS, {"scenes": "renders", "realeval": "realeval"})
    assert [r[0] for r in t["table1"]["rows"]] == ["global", "hybrid", "local", "none"]
    assert len(t["table1"]["header"]) == len(t["table1"]["rows"][0]) == 1 + 2 * 2 + 2
    assert t["table1"]["rows"][0][1] == "0.250 ± 0.010"
    assert [r[:2] for r in t["table2"]["rows"]] == [["✗", "✗"], ["✗", "✓"], ["✓", "✗"], ["✓", "✓"]]
    assert t["table2"]["rows"][3][3] == "0.200 ± 0.010 (-20.0%)"  # change against the "neither" row
    assert len(t["table4"]["rows"]) == 4 and t["table4"]["rows"][3][1] == "sclg-hybrid"
    md = repro.markdown_table(t["table2"])
    assert md.count("\n|") == 2 + 4 and "| ✓ | ✓ |" in md  # header, rule, 4 rows


# -- end to end, tiny ---------------------------------------------------------------------------

TINY = Sizes(corpus_scenes=4, steps=2, batch=2, seeds=1, eval_scenes=2, realeval=False, warmup=1, scene_size=96)
TINY_SETS = ['corpus.sources=["scenes:n=4,seed=100000,size=96"]', "corpus.shard_size=2", "crops.min_region=84",
             "crops.patch=56", "crops.global_size=84", "crops.local_store=42", "eval.resolution=84",
             "teachers.layout.input_size=56", "teachers.detail.input_size=84"]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """Two random-weight tiny students as the teachers: the plumbing, not the numbers, is under test."""
    import logging

    import torch

    from student.checkpoint import save_checkpoint
    from student.model import build_student

    logging.getLogger("student.model").setLevel(logging.ERROR)  # "starts from random weights" is the point
    zoo = tmp_path_factory.mktemp("zoo")
    for i, name in enumerate(("layout", "detail")):
        torch.manual_seed(i)
        save_checkpoint(build_student("tiny"), zoo / f"{name}.pt")
    return zoo


@pytest.mark.timeout(900)
def test_tiny_arms_end_to_end(tiny_zoo, tmp_path):
    out = tmp_path / "repro.json"
    res = repro.experiment(quick=True, zoo=str(tiny_zoo), root=str(tmp_path / "root"), arms=["sc-hybrid", "sclg-mix"],
                           out=str(out), report=False, sizes=TINY, extra=TINY_SETS, echo=lambda s: None)
    runs = {r["arm"]: r for r in res["runs"]}
    assert set(runs) == {"sc-hybrid", "sclg-mix"} and res["seeds"] == [0]
    for r in runs.values():
        m = r["metrics"]["scenes"]
        assert m["n"] == 2 and 0 < m["abs_rel"] < 10 and not r["reused"]
    assert runs["sc-hybrid"]["final"]["loss_lg"] is None and runs["sclg-mix"]["final"]["loss_lg"] is not None
    root = tmp_path / "root"
    # each arm trained on the selection of its own policy (the mix arm re-scored the shared metrics)
    assert json.loads((root / "scores" / "selection_summary.json").read_text())["policy"] == "mix"
    assert (root / "train" / "sclg-mix-s0" / "model.pt").exists()
    saved = json.loads(out.read_text())
    assert saved["machine"]["cores"] >= 1 and saved["wall_seconds"] > 0 and saved["claims_counted"] == 0
    assert set(saved["references"]) == {"teacher layout", "teacher detail", "student at init (layout.pt, 0 steps)"}
    page = (root / "report" / "pages" / "repro.html").read_text()
    assert "Table 1" in page and "Table 4" in page and "sclg-mix" in page
    # a rerun reuses the trained arms and their cached evaluations: same numbers, no training
    again = repro.experiment(quick=True, zoo=str(tiny_zoo), root=str(root), arms=["sclg-mix", "sc-hybrid"],
                             out=str(out), report=False, sizes=TINY, extra=TINY_SETS, echo=lambda s: None)
    for r in again["runs"]:
        assert r["reused"] and r["metrics"] == runs[r["arm"]]["metrics"]


def test_train_seed_varies_training_not_the_corpus():
    from pipeline.config import load_config
    from stages.train import train_seed

    qs = repro.QUICKSTART
    base = load_config(qs, root="memory://r")
    seeded = load_config(qs, root="memory://r", overrides=["train.seed=7"])
    assert train_seed(base) == base.run.seed == 0 and train_seed(seeded) == 7
    shard_keys = ("run.seed", "corpus", "crops")  # what the corpus and its crop plan depend on
    assert seeded.section_fingerprint(*shard_keys) == base.section_fingerprint(*shard_keys)
    assert "seed" not in base.model_dump(exclude_none=True)["train"]  # unset: dad.toml as before


def test_local_global_only_gets_no_shared_context_supervision():
    import torch

    from student.trainer import StepConfig, losses

    g, k, n = 28, 2, 14
    batch = {"target": torch.rand(1, g, g) + 0.5, "valid": torch.ones(1, g, g, dtype=torch.bool),
             "locals": torch.rand(1, k, n, n) + 0.5, "local_valid": torch.ones(1, k, n, n, dtype=torch.bool),
             "boxes": torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])}
    pred = torch.rand(1, g, g) + 0.5
    assert set(losses(pred, batch, StepConfig(use_sc=False))) == {"lg", "total"}  # no L_grad on the SC pair
    assert set(losses(pred, batch, StepConfig(use_lg=False))) == {"sc", "grad", "total"}
