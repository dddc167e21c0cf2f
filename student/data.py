"""Streaming training data: corpus shards + cached cross-context targets, per rank, deterministic.

Every rank computes the same plan from (seed, epoch): the shard order is a seeded permutation and
rank r takes shards r, r+W, …; every rank runs the same number of steps per epoch (the smallest
rank's full batches), so DDP never waits on a rank that ran out of data. A sample's teacher is
drawn from its row of `scores/selection.parquet` with an RNG seeded by (seed, epoch, row), so a
resumed run draws exactly what the uninterrupted run would have drawn.

Only needed bytes are read: the shard's tar is streamed once, and for each teacher only the rows
it was drawn for are read from its Zarr cache (one inner chunk per sample). A background thread
prepares batches ahead of the training step (`prefetch`).

A batch is a dict of tensors: image (B,3,G,G) in [0,1], target (B,G,G) disparity, valid (B,G,G),
locals (B,K,L,L), local_valid (B,K,L,L), boxes (B,K,4) fractions of the region, teacher (B,) index.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import as_disparity, open_cache, read_rows
from pipeline.corpus import iter_shard
from pipeline.images import resize
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
    order = np.random.default_rng([seed, epoch, 7919]).permutation(len(shards))
    return [shards[i] for i in order[rank::world]]


def steps_per_epoch(counts: dict[int, int], seed: int, world: int, batch_size: int) -> int:
    """Full batches the smallest rank can make (epoch 0's assignment; shard counts don't change)."""
    shards = sorted(counts)
    per_rank = [sum(counts[s] for s in shard_plan(shards, seed, 0, r, world)) for r in range(world)]
    return min(per_rank) // batch_size


def draw_teacher(probs: np.ndarray, seed: int, epoch: int, row: int) -> int:
    u = np.random.default_rng([seed, epoch, int(row), 31]).random()
    return int(min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1))


class TargetStream:
    """Iterates batches for one rank and one epoch, starting after `skip_batches` (resume)."""

    def __init__(self, spec: StreamSpec, selection: dict[int, np.ndarray], shard_rows: dict[int, list[int]]):
        self.spec = spec
        self.selection = selection          # row → probabilities over spec.teachers
        self.shard_rows = shard_rows        # shard → rows kept by the selection, in shard order
        self.groups = {t: open_cache(spec.root, t) for t in spec.teachers}
        self.spaces = {t: g.attrs["output_space"] for t, g in self.groups.items()}

    def samples(self, epoch: int, rank: int, world: int) -> Iterator[dict]:
        s = self.spec
        for shard in shard_plan(sorted(self.shard_rows), s.seed, epoch, rank, world):
            keep = set(self.shard_rows[shard])
            rows = [r for r in self.shard_rows[shard]]
            order = np.random.default_rng([s.seed, epoch, shard, 17]).permutation(len(rows))
            wanted = {rows[i]: k for k, i in enumerate(order)}
            chosen = {r: draw_teacher(self.selection[r], s.seed, epoch, r) for r in rows}
            targets = self._targets(rows, chosen)
            buffer = []
            for record, region in iter_shard(s.root, shard):
                if record["row"] in keep:
                    buffer.append((wanted[record["row"]], record, region))
            for _, record, region in sorted(buffer, key=lambda x: x[0]):
                yield self._sample(record, region, targets[record["row"]], chosen[record["row"]], epoch)

    def _targets(self, rows: list[int], chosen: dict[int, int]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        if self.spec.mix:
            per_t = {t: read_rows(self.groups[t], rows) for t in self.spec.teachers}
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
            data = read_rows(self.groups[t], mine)
            for i, r in enumerate(mine):
                out[r] = {"global": as_disparity(data["global"][i], self.spaces[t]),
                          "global_valid": data["global_valid"][i],
                          "local": as_disparity(data["local"][i], self.spaces[t]),
                          "local_valid": data["local_valid"][i]}
        return out

    def _sample(self, record: dict, region: np.ndarray, tgt: dict, teacher: int, epoch: int) -> dict:
        s = self.spec
        rng = np.random.default_rng([s.seed, epoch, record["row"], 101])
        image = resize(region, (s.global_size, s.global_size)).astype(np.float32) / 255.0
        g, gv = tgt["global"], tgt["global_valid"] & np.isfinite(tgt["global"])
        loc, lv = tgt["local"], tgt["local_valid"] & np.isfinite(tgt["local"])
        boxes = np.asarray(record["boxes"], dtype=np.float32)
        if s.flip and rng.random() < 0.5:  # a flip keeps targets exact: flip them and the boxes too
            image, g, gv = image[:, ::-1], g[:, ::-1], gv[:, ::-1]
            loc, lv = loc[..., ::-1], lv[..., ::-1]
            boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
        if s.jitter > 0:  # photometric only: brightness, contrast, saturation
            b, c, sat = 1 + s.jitter * rng.uniform(-1, 1, 3)
            gray = image.mean(axis=2, keepdims=True)
            image = np.clip(((image - gray) * sat + gray - image.mean()) * c + image.mean() * b, 0, 1)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
                "target": torch.from_numpy(np.nan_to_num(np.ascontiguousarray(g, dtype=np.float32))),
                "valid": torch.from_numpy(np.ascontiguousarray(gv)),
                "locals": torch.from_numpy(np.nan_to_num(np.ascontiguousarray(loc, dtype=np.float32))),
                "local_valid": torch.from_numpy(np.ascontiguousarray(lv)),
                "boxes": torch.from_numpy(boxes), "teacher": torch.tensor(teacher), "row": torch.tensor(record["row"])}

    def batches(self, epoch: int, rank: int, world: int, n_steps: int, skip: int = 0) -> Iterator[dict]:
        """Exactly n_steps − skip batches of this rank's epoch (after skipping `skip` batches)."""
        it = self.samples(epoch, rank, world)
        for _ in range(skip * self.spec.batch_size):
            next(it)
        for _ in range(n_steps - skip):
            items = [next(it) for _ in range(self.spec.batch_size)]
            yield {k: torch.stack([x[k] for x in items]) for k in items[0]}


def prefetch(it: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead (reading overlaps compute)."""
    if depth <= 0:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    err: list[BaseException] = []

    def work():
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            err.append(e)
        finally:
            q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if err:
        raise err[0]
