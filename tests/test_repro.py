"""bench/repro.py: the claim, noise and table logic on synthetic results, and a toy grid end to end.

The end-to-end test runs three arms (two on photos with different normalisation, paradigm and selection
policy, one on the high-resolution photos) through shard → teach → score → train → evaluate with the
real TFLite teachers of ../shared/models, at toy size, then reruns them to prove finished arms are reused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bench import repro
from bench.repro import (
    ARM,
    ARMS,
    CLAIMS,
    TABLE1,
    TABLE2,
    TABLE2_HIRES,
    TABLE4,
    Sizes,
    aggregate,
    headline,
    judge,
    paired_se,
    tables,
    verdicts,
)

DATASETS = ["scenes", "realeval"]
SHARED = Path(__file__).resolve().parents[2] / "shared"


def synthetic(means: dict[str, float], spread: float = 0.0, seeds: int = 3, default: float = 0.30,
              images: dict[str, list[float]] | None = None) -> list[dict]:
    """Runs of every arm: AbsRel = the arm's mean + spread × (−1, 0, +1, …) over seeds, on both datasets;
    `images` gives an arm per-image offsets (their mean is added to the arm's AbsRel, as a real mean would)."""
    runs = []
    for arm in ARMS:
        for s in range(seeds):
            v = means.get(arm.name, default) + spread * (s - (seeds - 1) / 2)
            m = {"abs_rel": v, "delta1": 0.5}
            if images and arm.name in images:
                offs = images[arm.name]
                m["per_sample"] = {f"i{k}": v + o - sum(offs) / len(offs) for k, o in enumerate(offs)}
            runs.append({"arm": arm.name, "seed": s, "metrics": {d: dict(m) for d in DATASETS}})
    return runs


def claim(cid: str):
    return next(c for c in CLAIMS if c.id == cid)


def test_every_table_and_claim_names_a_defined_arm():
    named = {a for _, sc, lg in TABLE1 for a in (sc, lg)} | {r[2] for r in TABLE2} | {r[1] for r in TABLE4}
    named |= {r[2] for r in TABLE2_HIRES} | {a for c in CLAIMS for a in (c.a, c.b)}
    assert named == set(ARM), "an arm no table uses is wasted compute; a table arm without a run is a gap"
    assert len(ARMS) == 15 and len({a.name for a in ARMS}) == 15
    # the arms differ only in the setting under test: nothing but norm / terms / policy / priors / corpus
    keys = {o.split("=")[0] for a in ARMS for o in a.overrides()}
    assert keys == {"train.norm", "train.use_sc", "train.use_lg", "score.policy", "teachers.pydnet.prior",
                    "teachers.fastdepth.prior"}
    assert {a.corpus for a in ARMS} == {"photos", "hires"}


def test_arms_configure_the_real_setting(tmp_path):
    exp = repro.Experiment(repro.SIZES["full"], tmp_path)
    cfg = exp.config(ARM["lg-none"], 2)
    assert (cfg.train.name, cfg.train.seed, cfg.train.norm, cfg.train.use_sc, cfg.train.use_lg) == \
        ("lg-none-s2", 2, "none", False, True)
    assert cfg.student.arch == "tflite" and cfg.student.init_teacher == "pydnet" and cfg.train.steps == 300
    assert {n: t.prior for n, t in cfg.teachers.items()} == {"pydnet": 0.7, "fastdepth": 0.3}
    assert cfg.train.val_dataset is None and cfg.run.root == str(tmp_path)
    alone = exp.config(ARM["sclg-fastdepth"], 0)
    assert {n: t.prior for n, t in alone.teachers.items()} == {"pydnet": 0.0, "fastdepth": 1.0}
    hires = exp.config(ARM["hires-sclg-hybrid"], 0)
    assert hires.run.root == str(tmp_path / "hires") and hires.corpus.sources[0].startswith(repro.HIRES)
    assert (hires.crops.min_region, hires.crops.patch, hires.corpus.max_region) == (768, 384, 1536)
    assert cfg.crops.min_region == 256  # the photo arms keep the setting's crops


def test_mean_std_over_seeds_and_per_image_means():
    agg = aggregate(synthetic({"sc-hybrid": 0.20}, spread=0.01, images={"sc-hybrid": [-0.1, 0.1]}), DATASETS)
    ms = agg["sc-hybrid"]["scenes"]
    assert ms["n"] == 3 and ms["mean"] == pytest.approx(0.20) and ms["std"] == pytest.approx(0.01)
    assert ms["per_sample"] == pytest.approx({"i0": 0.10, "i1": 0.30})  # averaged over the three seeds
    one = aggregate(synthetic({}, seeds=1), DATASETS)["sc-none"]["realeval"]
    assert one["n"] == 1 and one["std"] is None and "per_sample" not in one
    missing = aggregate([{"arm": "sc-none", "seed": 0, "metrics": {"scenes": {"abs_rel": float("nan")}}}], DATASETS)
    assert missing["sc-none"]["scenes"]["mean"] is None and missing["sc-none"]["realeval"]["n"] == 0


def test_paired_standard_error_by_hand():
    a = {"per_sample": {"x": 0.1, "y": 0.2, "z": 0.3}}
    b = {"per_sample": {"x": 0.2, "y": 0.2, "z": 0.6, "w": 9.0}}  # w: only in b, not paired
    se, n = paired_se(a, b)
    # differences 0.1, 0.0, 0.3: std (ddof 1) = 0.152753, / sqrt(3)
    assert n == 3 and se == pytest.approx(0.152753 / 3 ** 0.5, rel=1e-5)
    assert paired_se(a, {"per_sample": {"x": 1.0}}) == (None, 1)


def test_three_verdicts_with_the_paper_sign_and_beyond_the_noise():
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.25}, spread=0.01), DATASETS)
    v = judge(claim("1a"), agg, "scenes")
    assert v["verdict"] == "held" and v["delta"] == pytest.approx(0.05) and v["noise"] == pytest.approx(0.01)
    # the right sign, but smaller than the seeds' spread: not resolved
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.205}, spread=0.01), DATASETS)
    assert judge(claim("1a"), agg, "scenes")["verdict"] == "not resolved"
    # the opposite sign beyond the noise: not held
    agg = aggregate(synthetic({"sc-hybrid": 0.25, "sc-global": 0.20}), DATASETS)
    v = judge(claim("1a"), agg, "scenes")
    assert v["verdict"] == "not held" and v["holds"] is False and v["delta"] < 0
    # one seed, no per-image values: no noise estimate at all, so any difference decides
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.2001}, seeds=1), DATASETS)
    assert judge(claim("1a"), agg, "scenes")["verdict"] == "held"


def test_the_paired_image_noise_can_leave_a_claim_unresolved():
    # identical seeds (no spread), a 0.01 mean gap, but the per-image differences swing ±0.2 over 4 images
    images = {"sc-hybrid": [0.0, 0.0, 0.0, 0.0], "sc-global": [0.2, -0.2, 0.2, -0.2]}
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.21}, images=images), DATASETS)
    v = judge(claim("1a"), agg, "scenes")
    assert v["se"] == pytest.approx(0.2309401 / 2, rel=1e-5) and v["images"] == 4
    assert v["noise"] == pytest.approx(2 * v["se"]) and v["verdict"] == "not resolved"
    # the same gap with consistent per-image differences is resolved
    images = {"sc-hybrid": [0.0] * 4, "sc-global": [0.001, -0.001, 0.001, -0.001]}
    agg = aggregate(synthetic({"sc-hybrid": 0.20, "sc-global": 0.21}, images=images), DATASETS)
    assert judge(claim("1a"), agg, "scenes")["verdict"] == "held"


def test_tie_claim_uses_the_larger_of_noise_and_two_percent():
    c = claim("1b")
    assert c.kind == "tie"
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.203}), DATASETS)  # 1.5 % apart, no spread
    assert judge(c, agg, "scenes")["verdict"] == "held"
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.230}), DATASETS)  # 15 % apart
    assert judge(c, agg, "scenes")["verdict"] == "not held"
    agg = aggregate(synthetic({"sc-hybrid": 0.200, "sc-none": 0.230}, spread=0.04), DATASETS)  # within the noise
    assert judge(c, agg, "scenes")["verdict"] == "held"


def test_verdicts_per_dataset():
    means = {"sc-hybrid": 0.20, "sc-global": 0.25}
    runs = synthetic(means, spread=0.001)
    for r in runs:  # on realeval the order is reversed
        if r["arm"] in means:
            r["metrics"]["realeval"]["abs_rel"] = 0.45 - r["metrics"]["scenes"]["abs_rel"]
    out = {c["id"]: c for c in verdicts(aggregate(runs, DATASETS), DATASETS)}
    assert out["1a"]["per_dataset"]["scenes"]["verdict"] == "held"
    assert out["1a"]["per_dataset"]["realeval"]["verdict"] == "not held"
    assert {c["id"] for c in out.values() if c["primary"]} == {"1a", "1b", "1c", "2a", "2b", "2c", "3", "H1", "H2"}
    assert all(j["verdict"] == "not run" for c in verdicts({}, DATASETS) for j in c["per_dataset"].values())


def test_tables_have_the_papers_shape():
    agg = aggregate(synthetic({"sc-global": 0.25, "sclg-hybrid": 0.20, "hires-sc-hybrid": 0.3,
                               "hires-sclg-hybrid": 0.27}, spread=0.01), DATASETS)
    t = tables(agg, DATASETS, {"scenes": "renders", "realeval": "realeval"})
    assert [r[0] for r in t["table1"]["rows"]] == ["global", "hybrid", "local", "none"]
    assert len(t["table1"]["header"]) == len(t["table1"]["rows"][0]) == 1 + 2 * 2 + 2
    assert t["table1"]["rows"][0][1] == "0.2500 ± 0.0100"
    assert [r[:2] for r in t["table2"]["rows"]] == [["✗", "✗"], ["✗", "✓"], ["✓", "✗"], ["✓", "✓"]]
    assert t["table2"]["rows"][3][3] == "0.2000 ± 0.0100 (-20.0%)"  # change against the "neither" row
    assert t["table2_hires"]["rows"][2][3] == "0.2700 ± 0.0100 (-10.0%)"  # against hi-res shared-context only
    assert len(t["table4"]["rows"]) == 4 and t["table4"]["rows"][3][1] == "sclg-hybrid"
    md = repro.markdown_table(t["table2"])
    assert md.count("\n|") == 2 + 4 and "| ✓ | ✓ |" in md  # header, rule, 4 rows


def test_headline_per_family_by_hand():
    agg = {"sclg-hybrid": {"realeval": {"per_sample": {"a": 0.1, "b": 0.3, "c": 0.2}}}}
    refs = {"teacher pydnet": {"realeval": {"per_sample": {"a": 0.2, "b": 0.2, "c": 0.4}}},
            "teacher fastdepth": {"realeval": {"per_sample": {"a": 0.5, "b": 0.5}}}}
    h = headline(agg, refs, {"a": "nyu", "b": "nyu", "c": "kitti"})
    assert h["families"]["nyu"] == pytest.approx({"n": 2, "student": 0.2, "teacher pydnet": 0.2,
                                                  "teacher fastdepth": 0.5})
    assert h["families"]["kitti"]["teacher fastdepth"] is None  # it did not score image c
    assert h["families"]["all"]["n"] == 3 and h["families"]["all"]["student"] == pytest.approx(0.2)


# -- end to end, toy size, real teachers --------------------------------------------------------

TOY = Sizes(corpus=repro.PHOTOS + "kodak_0000[0-3].jpg", hires=repro.HIRES + "exs_0000[0-1].jpg", steps=2, batch=2,
            seeds=1, eval_scenes=2, realeval=False, warmup=1,
            extra=("corpus.shard_size=2", "student.input_size=[128, 192]", "eval.resolution=126"))


@pytest.mark.timeout(900)
@pytest.mark.skipif(not (SHARED / "models").is_dir() or not (SHARED / "data" / "unlabeled_hires").is_dir(),
                    reason="../shared models and photos not found")
def test_toy_grid_end_to_end(tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter")
    out, root = tmp_path / "repro.json", tmp_path / "root"
    arms = ["sc-hybrid", "sclg-mix", "hires-sclg-hybrid"]
    res = repro.experiment(quick=True, root=str(root), arms=arms, out=str(out), report=False, sizes=TOY,
                           echo=lambda s: None)
    runs = {r["arm"]: r for r in res["runs"]}
    assert set(runs) == set(arms) and res["seeds"] == [0]
    for r in runs.values():
        m = r["metrics"]["scenes"]
        assert m["n"] == 2 and 0 < m["abs_rel"] < 10 and not r["reused"] and len(m["per_sample"]) == 2
    assert runs["sc-hybrid"]["final"]["loss_lg"] is None and runs["sclg-mix"]["final"]["loss_lg"] is not None
    # each arm trained on the selection of its own policy (the mix arm re-scored the shared metrics)
    assert json.loads((root / "scores" / "selection_summary.json").read_text())["policy"] == "mix"
    assert (root / "hires" / "train" / "hires-sclg-hybrid-s0" / "model.pt").exists()
    recorded = tomllib.loads((root / "hires" / "dad.toml").read_text())
    assert recorded["crops"]["min_region"] == 768 and recorded["corpus"]["max_region"] == 1536
    saved = json.loads(out.read_text())
    assert saved["machine"]["cores"] >= 1 and saved["wall_seconds"] > 0 and saved["claims_counted"] == 0
    assert set(saved["references"]) == {"teacher pydnet", "teacher fastdepth", "student at step 0 (PyDNet v2 weights)"}
    assert "per_sample" not in saved["aggregate"]["sc-hybrid"]["scenes"]  # kept once per run, not twice
    page = (root / "report" / "pages" / "repro.html").read_text()
    assert "Table 1" in page and "Table 4" in page and "high resolution" in page and "sclg-mix" in page
    # a rerun reuses the trained arms and their cached evaluations: same numbers, no training
    again = repro.experiment(quick=True, root=str(root), arms=list(reversed(arms)), out=str(out), report=False,
                             sizes=TOY, echo=lambda s: None)
    for r in again["runs"]:
        assert r["reused"] and r["metrics"] == runs[r["arm"]]["metrics"]


def test_pooled_seed_std_stands_in_for_an_arm_run_once():
    runs = synthetic({"sclg-hybrid": 0.20}, spread=0.01)  # std 0.01 over three seeds, every arm
    runs = [r for r in runs if r["arm"] in ("sclg-hybrid", "sc-hybrid") and (r["arm"] == "sclg-hybrid" or r["seed"] == 0)]
    runs += [{"arm": "sc-global", "seed": s, "metrics": {d: {"abs_rel": v} for d in DATASETS}}
             for s, v in enumerate((0.30, 0.34))]  # std 0.028284 over two seeds
    agg = aggregate(runs, DATASETS)
    # pooled over (3 − 1) + (2 − 1) degrees of freedom: sqrt((2·0.0001 + 1·0.0008) / 3)
    assert repro.pooled_seed_std(agg, "scenes") == pytest.approx((0.001 / 3) ** 0.5)
    assert agg["sc-hybrid"]["scenes"]["std"] is None  # run once
    v = judge(claim("2a"), agg, "scenes", pooled=repro.pooled_seed_std(agg, "scenes"))
    assert v["noise"] == pytest.approx((0.001 / 3) ** 0.5) and v["delta"] == pytest.approx(0.30 - 0.20 - 0.01)
    assert judge(claim("2a"), agg, "scenes")["noise"] == pytest.approx(0.01)  # without it: the other arm's std
    assert repro.pooled_seed_std(aggregate(runs[:1], DATASETS), "scenes") is None
