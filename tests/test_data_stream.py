"""The training data stream (student/data.py): exact flips, per-rank shards, the epoch plan, the joins.

Everything runs on a tiny cached run (15 colour-ramp images in 3 shards of 5, two `pixel` teachers),
built once for the module; no training and no Ray here.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from train_fixtures import batches_of, copy_run, restrict_selection, train_config

from bench.kit.train import build_cached_run, stream_for
from pipeline import corpus as corpus_mod
from pipeline.cache import CacheReader, as_disparity, open_cache, read_rows
from pipeline.storage import Root
from student import data as data_mod
from student.data import EpochPlan, draw_teacher, prefetch, shard_plan, steps_per_epoch
from student.losses import crop_resample

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_torch_thread")]



@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return build_cached_run(tmp_path_factory.mktemp("stream"))


@pytest.fixture
def uneven(cached, tmp_path):
    """A copy of the run whose selection keeps 5, 2 and 3 samples of the three shards."""
    cfg = copy_run(cached, tmp_path / "root")
    assert restrict_selection(cfg.run.root, {0: 5, 1: 2, 2: 3}) == {0: 5, 1: 2, 2: 3}
    return cfg


def mirror(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - boxes[..., 2], boxes[..., 1], 1 - boxes[..., 0], boxes[..., 3]], -1)


# -- flips ----------------------------------------------------------------------------------------

def test_crop_of_flipped_map_at_mirrored_boxes_is_flipped_crop():
    """The identity a flip relies on: Crop(flip(M), mirror(b)) = flip(Crop(M, b)), for any map and box."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 56, 56, generator=gen)
    lo = torch.rand(3, 4, 2, generator=gen) * 0.6
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(3, 4, 2, generator=gen) * 0.3], -1)
    direct = crop_resample(maps.flip(-1), mirror(boxes), (28, 28))
    expected = crop_resample(maps, boxes, (28, 28)).flip(-1)
    assert torch.allclose(direct, expected, atol=1e-5)
    # …and it is not true without mirroring the boxes (the check has teeth).
    assert not torch.allclose(crop_resample(maps.flip(-1), boxes, (28, 28)), expected, atol=1e-3)


def test_flip_keeps_image_targets_and_boxes_consistent(cached):
    plain = {int(s["row"]): s for s in stream_for(cached, flip=False, jitter=0.0).samples(0, 0, 1)}
    flipped = list(stream_for(cached, flip=True, jitter=0.0).samples(0, 0, 1))
    assert sorted(plain) == sorted(int(s["row"]) for s in flipped)
    n_flipped = 0
    for f in flipped:
        p = plain[int(f["row"])]
        assert int(f["teacher"]) == int(p["teacher"])
        if torch.equal(f["image"], p["image"]):
            assert torch.equal(f["target"], p["target"]) and torch.equal(f["boxes"], p["boxes"])
            continue
        n_flipped += 1
        assert torch.equal(f["image"], p["image"].flip(-1))
        for key in ("target", "valid", "locals", "local_valid"):
            assert torch.equal(f[key], p[key].flip(-1)), key
        assert torch.allclose(f["boxes"], mirror(p["boxes"]), atol=1e-7)
        # The student map cut at the mirrored boxes is the flipped cut: what L_lg sees is unchanged.
        k = f["locals"].shape[-1]
        cut_f = crop_resample(f["target"][None], f["boxes"][None], (k, k))[0]
        cut_p = crop_resample(p["target"][None], p["boxes"][None], (k, k))[0]
        assert torch.allclose(cut_f, cut_p.flip(-1), atol=1e-5)
        # The pixel teacher is pointwise: its local predictions are its global map cut at the boxes,
        # so after the flip the locals still line up with the flipped global target at the new boxes.
        err_f = (cut_f - f["locals"]).abs()[f["local_valid"]].mean()
        assert err_f < 0.05 * f["locals"].abs().mean()
    assert 0 < n_flipped < len(flipped)  # both cases occurred


# -- shards per rank and the epoch plan -----------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_disjoint_shards_covering_all(world):
    shards = list(range(7))
    for epoch in range(6):
        parts = [shard_plan(shards, 3, epoch, r, world) for r in range(world)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == shards and len(set(flat)) == len(flat)
    # the order changes with the epoch
    assert len({tuple(shard_plan(shards, 3, e, 0, world)) for e in range(6)}) > 1


def test_streamed_rows_of_ranks_are_disjoint_and_from_their_shards(uneven):
    stream = stream_for(uneven, flip=False, batch_size=1)
    row_shard = {r: s for s, rows in stream.shard_rows.items() for r in rows}
    for epoch in range(4):
        seen = []
        for rank in range(2):
            rows = [int(x["row"]) for x in stream.samples(epoch, rank, 2)]
            assert {row_shard[r] for r in rows} == set(stream.shards(epoch, rank, 2))
            seen.append(set(rows))
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(row_shard)


def brute_steps(counts, seed, world, bs, epoch):
    shards = sorted(counts)
    order = np.random.default_rng([seed, epoch, 7919]).permutation(len(shards))
    per_rank = [sum(counts[shards[i]] for i in order[r::world]) for r in range(world)]
    return min(per_rank) // bs


def test_steps_per_epoch_is_the_smallest_ranks_full_batches():
    rng = np.random.default_rng(1)
    for _ in range(50):
        counts = {s: int(rng.integers(1, 9)) for s in range(int(rng.integers(2, 9)))}
        world = int(rng.integers(1, len(counts) + 1))
        bs = int(rng.integers(1, 4))
        for epoch in range(3):
            assert steps_per_epoch(counts, 5, world, bs, epoch) == brute_steps(counts, 5, world, bs, epoch)


def test_epoch_plan_follows_the_per_epoch_assignment(uneven):
    counts = {0: 5, 1: 2, 2: 3}
    plan = EpochPlan(counts, uneven.run.seed, 2, 1)
    per_epoch = [plan.steps(e) for e in range(6)]
    assert per_epoch == [brute_steps(counts, uneven.run.seed, 2, 1, e) for e in range(6)]
    # With 5/2/3-sample shards the smallest rank's share changes between epochs: a plan fixed from
    # epoch 0 would run a rank out of data (or waste it). Every rank can fill every epoch it is given.
    assert len(set(per_epoch)) > 1
    stream = stream_for(uneven, flip=False, batch_size=1)
    for epoch in range(6):
        lens = [len(list(stream.batches(epoch, r, 2, plan.steps(epoch)))) for r in range(2)]
        assert lens == [plan.steps(epoch)] * 2
    # step -> (epoch, skip) walks the cumulative plan
    step = 0
    for epoch, n in enumerate(per_epoch):
        for k in range(n):
            assert plan.locate(step) == (epoch, k)
            step += 1


def test_epoch_plan_refuses_impossible_layouts():
    with pytest.raises(ValueError, match="at most 2 workers"):
        EpochPlan({0: 5, 1: 5}, 0, 3, 1)
    with pytest.raises(ValueError, match="too few samples per worker"):
        EpochPlan({0: 1, 1: 1}, 0, 2, 2).locate(0)


# -- resume, reading only what is needed -----------------------------------------------------------

def test_skipping_batches_yields_the_tail_without_decoding_the_skipped(cached, monkeypatch):
    stream = stream_for(cached, flip=True, jitter=0.1)
    full = list(stream.batches(1, 0, 1, 7))
    decoded = []
    real = corpus_mod.decode_trusted
    monkeypatch.setattr(corpus_mod, "decode_trusted", lambda b: decoded.append(1) or real(b))
    tail = list(stream.batches(1, 0, 1, 7, skip=4))
    assert len(tail) == 3 and len(decoded) == 3 * cached.train.batch_size  # one stored view each, no region
    for a, b in zip(full[4:], tail):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_teacher_reads_its_drawn_rows_in_a_slice_when_dense_and_alone_when_sparse(cached, monkeypatch):
    """A teacher whose drawn rows fill a third of their span in a shard reads that span once (one slice);
    a sparser one reads exactly its drawn rows; nothing else is read."""
    stream = stream_for(cached)
    names = {id(g): t for t, g in stream.groups.items()}
    rows_read: dict[str, list[int]] = {t: [] for t in stream.groups}
    spans: dict[str, list[tuple[int, int]]] = {t: [] for t in stream.groups}
    real_rows, real_span = CacheReader.rows, CacheReader.span
    monkeypatch.setattr(CacheReader, "rows", lambda g, rows: rows_read[names[id(g)]].extend(rows) or real_rows(g, rows))
    monkeypatch.setattr(CacheReader, "span",
                        lambda g, lo, hi: spans[names[id(g)]].append((lo, hi)) or real_span(g, lo, hi))
    samples = list(stream.samples(2, 0, 1))
    teachers = list(cached.teachers)
    size = cached.corpus.shard_size
    for t in teachers:
        drawn = sorted(int(s["row"]) for s in samples if teachers[int(s["teacher"])] == t)
        for shard in sorted({r // size for r in drawn}):
            mine = [r for r in drawn if r // size == shard]
            lo, hi = min(mine), max(mine) + 1
            if len(mine) >= (hi - lo) / 3:  # dense: its span, once
                assert spans[t].count((lo, hi)) == 1 and not set(mine) & set(rows_read[t]), (t, shard)
            else:
                assert sorted(r for r in rows_read[t] if r // size == shard) == mine, (t, shard)
        assert sum(hi - lo for lo, hi in spans[t]) + len(rows_read[t]) >= len(drawn)
    assert any(spans.values()), "no teacher was dense: the slice path went untested"


def test_a_slice_and_single_rows_read_the_same_values(cached):
    root = Root(cached.run.root)
    group = CacheReader(open_cache(root, next(iter(cached.teachers))))
    rows = [1, 3, 4]
    dense, sparse = data_mod.ShardTargets(group, [0, 1, 2, 3, 4]), data_mod.ShardTargets(group, [0, 14])
    assert dense.dense and not sparse.dense
    stored = read_rows(group, rows)
    for got in (dense.read(rows), sparse.read(rows), group.span(1, 5)):
        picked = got if len(got["global"]) == 3 else {k: v[[0, 2, 3]] for k, v in got.items()}
        for k in stored:
            assert np.array_equal(picked[k], stored[k], equal_nan=k in ("global", "local")), k


def test_every_view_format_gives_the_same_targets_and_batches(cached, tmp_path):
    """corpus.view only changes how the G×G view is stored (WebP, raw PPM, or not at all and computed):
    the same fingerprints, the same cached targets, the same batches."""
    from pipeline.config import load_config
    from pipeline.lineage import Lineage

    ref = list(stream_for(cached, flip=True, jitter=0.1).batches(0, 0, 1, 3))
    ref_cache = {t: read_rows(open_cache(Root(cached.run.root), t), list(range(15))) for t in cached.teachers}
    for view, member in (("ppm", ".global.ppm"), ("none", None)):
        cfg = build_cached_run(tmp_path / view, corpus={"view": view})
        same_but_view = load_config(raw={**cached.model_dump(mode="json"),
                                         "corpus": {**cached.model_dump(mode="json")["corpus"], "view": view}})
        assert Lineage(same_but_view).shard == Lineage(cached).shard  # so every later fingerprint too
        tar = Root(cfg.run.root).read_bytes("corpus", "shards", "000000.tar")
        assert (b".global.ppm" in tar) == (member is not None) and b".global.webp" not in tar
        for t in cfg.teachers:
            got = read_rows(open_cache(Root(cfg.run.root), t), list(range(15)))
            assert all(np.array_equal(got[k], ref_cache[t][k], equal_nan=True) for k in got), (view, t)
        for a, b in zip(ref, stream_for(cfg, flip=True, jitter=0.1).batches(0, 0, 1, 3), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), view


def test_model_input_is_the_plain_float64_jitter_within_two_float32_ulps():
    """The single-pass float32 input against the plain expression (float64, on x/255, then flipped and
    transposed); without jitter it is x/255 to the bit."""
    rng = np.random.default_rng(3)
    for h, w in ((37, 53), (392, 392)):
        view = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        view[0, 0], view[-1, -1] = 0, 255  # the clip is reached at both ends
        kept = view.copy()
        for flip in (False, True):
            image = view.astype(np.float32) / 255.0
            image = image[:, ::-1] if flip else image
            b, c, sat = 1 + 0.3 * rng.uniform(-1, 1, 3)
            gray = image.mean(axis=2, keepdims=True)
            plain = np.clip(((image - gray) * sat + gray - image.mean()) * c + image.mean() * b, 0, 1)
            got = data_mod.model_input(view, flip, (b, c, sat))
            assert got.dtype == np.float32 and got.shape == (3, h, w) and got.flags.c_contiguous
            assert np.abs(got - plain.transpose(2, 0, 1)).max() <= 2.4e-7
            assert np.array_equal(data_mod.model_input(view, flip, None), image.transpose(2, 0, 1))
            assert np.array_equal(view, kept)  # input untouched


def test_masks_derived_from_values_equal_the_stored_masks(tmp_path):
    """CacheReader.rows reads only the value arrays; the masks it derives are the stored ones, also for
    NaN/inf predictions and float16 overflow (which write_shard marks invalid)."""
    from pipeline.cache import ensure_cache, write_shard

    root = Root(str(tmp_path))
    group = ensure_cache(root, "t", 2, 3, 8, 2, 4, attrs={"output_space": "disparity"})
    rng = np.random.default_rng(0)
    g, loc = rng.uniform(0.5, 2, (3, 8, 8)), rng.uniform(0.5, 2, (3, 2, 4, 4))
    g[0, 1, 2], g[1, 3, :], g[2, 0, 0], loc[1, 0, 2, 2], loc[2, 1, 0, :] = np.nan, np.inf, 1e6, -np.inf, 7e4
    write_shard(group, 1, 3, g.astype(np.float32), loc.astype(np.float32))
    opened = CacheReader(open_cache(root, "t"))
    rows = [3, 4, 5, 0]  # the written shard, and a slot never written (all fill values)
    derived, stored = opened.rows(rows), read_rows(opened, rows)
    assert derived.keys() == stored.keys()
    assert 0 < stored["global_valid"].sum() < stored["global_valid"].size and not stored["local_valid"][3].any()
    for k in stored:
        assert np.array_equal(derived[k], stored[k], equal_nan=k in ("global", "local")), k


def test_batch_targets_are_the_drawn_teachers_cache(cached):
    """The join: each sample's target and locals are exactly its drawn teacher's cached maps."""
    root = Root(cached.run.root)
    teachers = list(cached.teachers)
    groups = {t: open_cache(root, t) for t in teachers}
    batches = batches_of(cached, epoch=0)
    probs = stream_for(cached).selection
    for b in batches:
        for i, row in enumerate(b["row"].tolist()):
            t = teachers[int(b["teacher"][i])]
            assert int(b["teacher"][i]) == draw_teacher(probs[row], cached.run.seed, 0, row)
            cached_maps = read_rows(groups[t], [row])
            g = as_disparity(cached_maps["global"][0], groups[t].attrs["output_space"])
            loc = as_disparity(cached_maps["local"][0], groups[t].attrs["output_space"])
            assert np.array_equal(b["target"][i].numpy(), np.nan_to_num(g))
            assert np.array_equal(b["locals"][i].numpy(), np.nan_to_num(loc))
            other = next(o for o in teachers if o != t)
            g_other = as_disparity(read_rows(groups[other], [row])["global"][0], "disparity")
            assert not np.array_equal(b["target"][i].numpy(), np.nan_to_num(g_other))


# -- teacher draws -------------------------------------------------------------------------------

def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # a zero-probability teacher is never drawn
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


# chi-square critical values at p = 0.001 for 1, 2 and 3 degrees of freedom
CRIT = {1: 10.83, 2: 13.82, 3: 16.27}


@pytest.mark.parametrize("probs", [[0.7, 0.3], [0.5, 0.3, 0.2], [2.0, 1.0, 1.0, 0.0], [0.0, 1.0]])
def test_draw_teacher_frequencies_match_probabilities(probs):
    p = np.array(probs, dtype=float)
    draws = np.array([draw_teacher(p, 11, e, r) for e in range(10) for r in range(500)])
    counts = np.bincount(draws, minlength=len(p))
    df = int((p > 0).sum()) - 1
    if df == 0:
        assert counts[p == 0].sum() == 0
        return
    assert chi2(counts, p) < CRIT[df]
    # the bound has power: the same draws are far from a distribution a few points off
    q = p / p.sum()
    shifted = q + np.where(np.arange(len(q)) == 0, -0.05, 0.05 / df) * (q > 0)
    assert chi2(counts, shifted) > CRIT[df]


def test_draws_change_with_the_epoch_and_repeat_with_it():
    p = np.array([0.5, 0.5])
    a = [draw_teacher(p, 0, 0, r) for r in range(200)]
    assert a == [draw_teacher(p, 0, 0, r) for r in range(200)]
    assert a != [draw_teacher(p, 0, 1, r) for r in range(200)]


# -- prefetch and parallel loading ------------------------------------------------------------------

def test_threaded_loading_gives_the_same_batches_in_order(uneven):
    stream = stream_for(train_config(uneven, jitter=0.1, batch_size=2))
    for epoch in range(2):
        n = EpochPlan({0: 5, 1: 2, 2: 3}, uneven.run.seed, 1, 2).steps(epoch)
        plain = list(stream.batches(epoch, 0, 1, n))
        for workers in (1, 3):
            threaded = list(stream.batches(epoch, 0, 1, n, workers=workers))
            assert len(threaded) == len(plain) == n
            for a, b in zip(plain, threaded):
                assert all(torch.equal(a[k], b[k]) for k in a)


def test_ordered_map_keeps_order_bounds_lookahead_and_reraises():
    pulled = []

    def jobs():
        for i in range(30):
            pulled.append(i)
            yield i

    out = data_mod.ordered_map(lambda x: (time.sleep(0.01 * (x % 3)), x * x)[1], jobs(), 3)
    assert next(out) == 0 and len(pulled) <= 5
    assert list(out) == [i * i for i in range(1, 30)]
    with pytest.raises(ZeroDivisionError):
        list(data_mod.ordered_map(lambda x: 1 / (x - 3), iter(range(6)), 2))


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(50)), 3)) == list(range(50))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield 1
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        list(prefetch(failing(), 2))


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 2)
    assert next(it) == 0
    it.close()
    time.sleep(0.5)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5
    assert not any(t.name == "dad-prefetch" and t.is_alive() for t in threading.enumerate())


def test_train_config_helper_keeps_the_run(cached, tmp_path):
    """Guard for the fixtures themselves: a copied run trains on the same selection."""
    cfg = copy_run(cached, tmp_path / "copy")
    other = train_config(cfg, steps=9)
    assert other.train.steps == 9 and stream_for(other).shard_rows == stream_for(cached).shard_rows
