"""Streaming training data: corpus shards + cached cross-context targets, per rank, deterministic.

Each epoch the shard order is a seeded permutation and rank r takes shards r, r+W, …; every rank runs
the smallest rank's number of full batches, so DDP never waits. A sample's teacher is drawn from its
selection row by an RNG seeded with (seed, epoch, row), so a resumed run sees exactly the batches of an
uninterrupted one. Only needed bytes are read: a tar streams once, only the drawn teachers' rows are read
from Zarr (dense rows in one slice), and `batches(…, workers=N)` prepares batches in threads, in order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import CacheReader, as_disparity, open_cache
from pipeline.corpus import Sample, iter_shard
from pipeline.storage import Root
from pipeline.targets import mix_targets


@dataclass(frozen=True)
class StreamSpec:
    root: Root
    teachers: tuple[str, ...]
    global_size: int
    batch_size: int
    seed: int
    flip: bool = True
    jitter: float = 0.0
    mix: bool = False


def shard_plan(shards: list[int], seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """The shards rank `rank` reads in `epoch`, in reading order (ranks get disjoint sets)."""
    order = np.random.default_rng([seed, epoch, 7919]).permutation(len(shards))
    return [shards[i] for i in order[rank::world]]


def steps_per_epoch(counts: dict[int, int], seed: int, world: int, batch_size: int, epoch: int = 0) -> int:
    """Full batches the smallest rank can make in `epoch` (shard → sample count in `counts`)."""
    shards = sorted(counts)
    per_rank = [sum(counts[s] for s in shard_plan(shards, seed, epoch, r, world)) for r in range(world)]
    return min(per_rank) // batch_size


class EpochPlan:
    """Steps per epoch (they vary with the epoch's shard assignment) and step → (epoch, skip)."""

    MAX_EMPTY_EPOCHS = 64

    def __init__(self, counts: dict[int, int], seed: int, world: int, batch_size: int):
        self.counts, self.seed, self.world, self.batch_size = dict(counts), seed, world, batch_size
        if len(self.counts) < world:
            raise ValueError(f"{len(self.counts)} corpus shard(s) hold selected samples but train.workers = {world}: "
                             f"every worker reads whole shards, so use at most {len(self.counts)} workers "
                             f"(or re-shard with a smaller corpus.shard_size)")
        self._steps: list[int] = []
        self._empty = 0

    def steps(self, epoch: int) -> int:
        while len(self._steps) <= epoch:
            n = steps_per_epoch(self.counts, self.seed, self.world, self.batch_size, len(self._steps))
            self._empty = 0 if n else self._empty + 1
            if self._empty >= self.MAX_EMPTY_EPOCHS:
                total = sum(self.counts.values())
                raise ValueError(
                    f"too few samples per worker: the selection keeps {total} samples in {len(self.counts)} "
                    f"shard(s); with {self.world} worker(s) the smallest worker's shards do not fill one batch "
                    f"of train.batch_size = {self.batch_size}. Lower train.batch_size or train.workers")
            self._steps.append(n)
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """The global step `step` (0-based, = steps already done) as (epoch, batches done in that epoch)."""
        epoch = 0
        while step >= self.steps(epoch):
            step -= self.steps(epoch)
            epoch += 1
        return epoch, step


def draw_teacher(probs: np.ndarray, seed: int, epoch: int, row: int) -> int:
    """The teacher index used for `row` in `epoch`, drawn with probabilities `probs` (need not sum to 1)."""
    u = np.random.default_rng([seed, epoch, int(row), 31]).random()
    return int(min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1))


class ShardTargets:
    """One teacher's targets for the rows of one corpus shard that an epoch draws from it.

    When those rows fill at least `DENSE` of their span they are read in one slice, once, by the
    first batch that needs them (and freed with the shard's last batch); otherwise each batch reads
    its own rows. Same values either way: only the number of Zarr calls changes.
    """

    DENSE = 1 / 3  # slice cost ≈ 0.3 × a single-row read, per row (see CacheReader.span)

    def __init__(self, reader: CacheReader, rows: list[int]):
        self.reader = reader
        self.lo, self.hi = (min(rows), max(rows) + 1) if rows else (0, 0)
        self.dense = bool(rows) and len(rows) >= self.DENSE * (self.hi - self.lo)
        self._span: dict | None = None
        self._lock = threading.Lock()

    def read(self, rows: list[int]) -> dict[str, np.ndarray]:
        if not self.dense:
            return self.reader.rows(rows)
        with self._lock:  # loader threads prepare batches of one shard concurrently: one read between them
            if self._span is None:
                self._span = self.reader.span(self.lo, self.hi)
        at = np.asarray(rows, dtype=np.int64) - self.lo
        return {name: values[at] for name, values in self._span.items()}


class TargetStream:
    """Iterates samples and batches of one rank and one epoch (optionally skipping a prefix: resume)."""

    def __init__(self, spec: StreamSpec, selection: dict[int, np.ndarray], shard_rows: dict[int, list[int]]):
        self.spec = spec
        self.selection = selection          # row → probabilities over spec.teachers
        self.shard_rows = shard_rows        # shard → rows kept by the selection, in shard order
        self.groups = {t: CacheReader(open_cache(spec.root, t)) for t in spec.teachers}
        self.spaces = {t: g.attrs["output_space"] for t, g in self.groups.items()}

    def shards(self, epoch: int, rank: int, world: int) -> list[int]:
        """The shards this rank reads in `epoch`, in reading order."""
        return shard_plan(sorted(self.shard_rows), self.spec.seed, epoch, rank, world)

    def order(self, shard: int, epoch: int) -> list[int]:
        """The rows of `shard` in the order they are yielded in `epoch`."""
        rows = self.shard_rows[shard]
        perm = np.random.default_rng([self.spec.seed, epoch, shard, 17]).permutation(len(rows))
        return [rows[i] for i in perm]

    def samples(self, epoch: int, rank: int, world: int, skip: int = 0) -> Iterator[dict]:
        """This rank's samples of `epoch`, after skipping the first `skip` (neither read nor decoded)."""
        for job in self._jobs(epoch, rank, world, skip, max(1, self.spec.batch_size)):
            yield from self._prepare(job, epoch)

    def _jobs(self, epoch: int, rank: int, world: int, skip: int, size: int) -> Iterator[list[tuple]]:
        """Groups of `size` samples (the last of a shard may be smaller), each [(stored sample, teacher,
        readers)]: everything a worker thread needs to produce them. Tars are read here (cheap, in order)."""
        s = self.spec
        for shard in self.shards(epoch, rank, world):
            ordered = self.order(shard, epoch)
            if skip >= len(ordered):
                skip -= len(ordered)
                continue
            ordered, skip = ordered[skip:], 0
            wanted = set(ordered)
            stored = {smp.record["row"]: smp for smp in iter_shard(s.root, shard) if smp.record["row"] in wanted}
            missing = wanted - set(stored)
            if missing:
                raise ValueError(f"corpus shard {shard} lacks rows {sorted(missing)[:5]} that the selection "
                                 f"keeps: the corpus changed after `dad score`; rerun `dad score`")
            drawn = {r: draw_teacher(self.selection[r], s.seed, epoch, r) for r in ordered}
            readers = {t: ShardTargets(self.groups[t], ordered if s.mix else [r for r in ordered if drawn[r] == ti])
                       for ti, t in enumerate(s.teachers)}
            for i in range(0, len(ordered), size):
                yield [(stored.pop(r), drawn[r], readers) for r in ordered[i:i + size]]

    def _prepare(self, job: list[tuple], epoch: int) -> list[dict]:
        """Read the drawn teachers' targets of a group of samples, decode the global views, augment."""
        targets: dict[int, dict] = {}
        by_shard: dict[int, tuple[dict, dict]] = {}  # a batch may span two shards: each has its readers
        for smp, t, readers in job:
            by_shard.setdefault(id(readers), (readers, {}))[1][smp.record["row"]] = t
        for readers, chosen in by_shard.values():
            targets.update(self._targets(list(chosen), chosen, readers))
        return [self._sample(smp, targets[smp.record["row"]], t, epoch) for smp, t, _ in job]

    def _targets(self, rows: list[int], chosen: dict[int, int], readers: dict[str, ShardTargets]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        if self.spec.mix:
            per_t = {t: readers[t].read(rows) for t in self.spec.teachers}
            for i, r in enumerate(rows):
                w = list(self.selection[r])
                maps = [as_disparity(per_t[t]["global"][i], self.spaces[t]) for t in self.spec.teachers]
                valids = [per_t[t]["global_valid"][i] for t in self.spec.teachers]
                g, gv = mix_targets(maps, valids, w)
                locs, lvs = zip(*[mix_targets([as_disparity(per_t[t]["local"][i, k], self.spaces[t])
                                               for t in self.spec.teachers],
                                              [per_t[t]["local_valid"][i, k] for t in self.spec.teachers], w)
                                  for k in range(per_t[self.spec.teachers[0]]["local"].shape[1])])
                out[r] = {"global": g, "global_valid": gv, "local": np.stack(locs), "local_valid": np.stack(lvs)}
            return out
        for ti, t in enumerate(self.spec.teachers):
            mine = [r for r in rows if chosen[r] == ti]
            if not mine:
                continue
            data = readers[t].read(mine)
            for i, r in enumerate(mine):
                out[r] = {"global": as_disparity(data["global"][i], self.spaces[t]),
                          "global_valid": data["global_valid"][i],
                          "local": as_disparity(data["local"][i], self.spaces[t]),
                          "local_valid": data["local_valid"][i]}
        return out

    def _sample(self, smp: Sample, tgt: dict, teacher: int, epoch: int) -> dict:
        s, record = self.spec, smp.record
        rng = np.random.default_rng([s.seed, epoch, record["row"], 101])
        g, gv = tgt["global"], tgt["global_valid"] & np.isfinite(tgt["global"])
        loc, lv = tgt["local"], tgt["local_valid"] & np.isfinite(tgt["local"])
        boxes = np.asarray(record["boxes"], dtype=np.float32)
        flip = s.flip and rng.random() < 0.5
        if flip:  # a flip keeps targets exact: flip them and the boxes too
            g, gv = g[:, ::-1], gv[:, ::-1]
            loc, lv = loc[..., ::-1], lv[..., ::-1]
            boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
        photometric = tuple(1 + s.jitter * rng.uniform(-1, 1, 3)) if s.jitter > 0 else None
        image = model_input(smp.view(s.global_size), flip, photometric)
        return {"image": torch.from_numpy(image),
                "target": torch.from_numpy(_finite(g)),
                "valid": torch.from_numpy(np.ascontiguousarray(gv)),
                "locals": torch.from_numpy(_finite(loc)),
                "local_valid": torch.from_numpy(np.ascontiguousarray(lv)),
                "boxes": torch.from_numpy(boxes), "teacher": torch.tensor(teacher), "row": torch.tensor(record["row"])}

    def batches(self, epoch: int, rank: int, world: int, n_steps: int, skip: int = 0,
                workers: int = 0) -> Iterator[dict]:
        """Exactly n_steps − skip batches of this rank's epoch (after skipping `skip` batches).

        workers > 0: that many threads prepare batches concurrently, up to `workers` ahead of the
        consumer (decoding, Zarr reads and resizing release the GIL), in order; 0: in this thread.
        The batches are the same either way.
        """
        jobs = self._batch_jobs(epoch, rank, world, n_steps, skip)
        make = lambda job: collate(self._prepare(job, epoch))
        if workers <= 0:
            yield from map(make, jobs)
        else:  # shard tars are read a few batches ahead in their own thread, never in the training loop
            yield from ordered_map(make, prefetch(jobs, 2), workers)

    def _batch_jobs(self, epoch: int, rank: int, world: int, n_steps: int, skip: int) -> Iterator[list[tuple]]:
        bs = self.spec.batch_size
        items = (x for job in self._jobs(epoch, rank, world, skip * bs, bs) for x in job)
        for step in range(skip, n_steps):
            job = [x for _, x in zip(range(bs), items)]
            if len(job) < bs:
                raise RuntimeError(f"rank {rank} ran out of samples at batch {step} of epoch {epoch} "
                                   f"(planned {n_steps}): the epoch plan and the shards disagree")
            yield job


def _finite(a: np.ndarray) -> np.ndarray:
    """A sample's own target map (a fresh array, or a flipped view of one) as C-contiguous float32 with
    NaN → 0 and ±inf → the largest finite values (the masks already exclude them), in place: no copy but
    the flip's."""
    return np.nan_to_num(np.ascontiguousarray(a, dtype=np.float32), copy=False)


def model_input(view: np.ndarray, flip: bool, jitter: tuple[float, float, float] | None) -> np.ndarray:
    """The (H, W, 3) uint8 view → the student's input, (3, H, W) float32 in [0, 1], mirrored if `flip`.

    `jitter` = (brightness b, contrast c, saturation s): clip(((x − gray)·s + gray − mean)·c + mean·b, 0, 1)
    per pixel, gray the pixel's channel mean and mean the image's. That is affine per pixel,
    (c·s/255)·v + (c·(1 − s)/765)·Σ_channels v + mean·(b − c) on the 8-bit values v, so it is one float32
    pass per channel straight into the output layout: a tenth of the cost of the float64 expression it
    replaced, and within 2·10⁻⁷ of it (the 8-bit input's own step is 4·10⁻³). Without jitter: v / 255,
    exactly."""
    v = view[:, ::-1] if flip else view
    out = np.empty((3, *v.shape[:2]), np.float32)
    if jitter is None:
        for k in range(3):
            np.divide(v[..., k], np.float32(255), out=out[k], dtype=np.float32)
        return out
    b, c, s = (float(p) for p in jitter)
    mean = float(view.sum(dtype=np.int64)) / (view.size * 255)
    shift = np.add(v[..., 0], v[..., 1], dtype=np.float32)
    shift += v[..., 2]
    shift *= np.float32(c * (1 - s) / 765)
    shift += np.float32(mean * (b - c))
    for k in range(3):
        np.multiply(v[..., k], np.float32(c * s / 255), out=out[k], dtype=np.float32)
        out[k] += shift
    return np.clip(out, 0, 1, out=out)


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([x[k] for x in items]) for k in items[0]}


def ordered_map(fn, jobs: Iterator, workers: int) -> Iterator:
    """fn over jobs in `workers` threads, results in job order, at most `workers` jobs ahead.

    Jobs are pulled from `jobs` in the consumer's thread; errors re-raise in the consumer; closing the
    consumer cancels what is queued.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="dad-loader")
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead (reading overlaps compute).

    Errors in the producer are re-raised in the consumer; closing the consumer early (an exception
    in the training step, `break`) stops the producer instead of leaving it blocked forever.
    """
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()
    err: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            err.append(e)
        finally:
            put(done)

    thread = threading.Thread(target=work, daemon=True, name="dad-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
        if err:
            raise err[0]
    finally:
        stop.set()
