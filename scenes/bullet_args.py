"""Leak-safe arguments for ``pybullet.createVisualShape`` meshes.

pybullet 3.2.7's binding keeps a reference to every vertex row and coordinate object it is given and
never releases it: fresh ``ndarray.tolist()`` output leaked ~5 MB per rendered scene. Reusing the *same*
Python objects turns the leak into refcount bumps: row lists come from a pool and are overwritten in
place, and numbers are interned after quantisation to 1e-4 of a unit (0.1 mm), so memory stays bounded.
"""

from __future__ import annotations

import threading
from collections import deque
from itertools import repeat
from operator import itemgetter, setitem

import numpy as np

QUANTUM = 1e-4
_MAX_INTERNED = 4_000_000  # past this many distinct numbers the cache restarts (bounded growth)


class ArgPool:
    def __init__(self) -> None:
        self._rows: dict[str, list[list]] = {}
        self._numbers: dict[int, float] = {}
        self._ints: list[int] = []

    def _interned(self, keys: np.ndarray) -> tuple[float, ...]:
        cache = self._numbers
        if len(cache) > _MAX_INTERNED:
            cache.clear()
        uniq, inverse = np.unique(keys, return_inverse=True)
        objs = [cache.setdefault(k, k * QUANTUM) for k in uniq.tolist()]
        if len(inverse) == 1:
            return (objs[inverse[0]],)
        return itemgetter(*inverse.tolist())(objs)

    def rows(self, name: str, values: np.ndarray) -> list[list[float]]:
        """Rows of ``values`` as pooled lists of interned floats (valid until the next call with ``name``)."""
        n, width = values.shape
        pool = self._rows.setdefault(name, [])
        while len(pool) < n:
            pool.append([0.0] * width)
        flat = self._interned(np.round(np.asarray(values, np.float64) / QUANTUM).astype(np.int64).ravel())
        rows = pool[:n]
        deque(map(setitem, rows, repeat(slice(None)), zip(*[iter(flat)] * width)), maxlen=0)  # in-place, in C
        return rows

    def ints(self, values: np.ndarray) -> list[int]:
        top = int(values.max(initial=0)) + 1
        if len(self._ints) < top:
            self._ints.extend(range(len(self._ints), top))
        table = self._ints
        return [table[i] for i in values.tolist()]

    def mesh_kwargs(self, vertices: np.ndarray, normals: np.ndarray, uvs: np.ndarray, indices: np.ndarray) -> dict:
        return {
            "vertices": self.rows("vertices", vertices),
            "normals": self.rows("normals", normals),
            "uvs": self.rows("uvs", uvs),
            "indices": self.ints(indices),
        }


_local = threading.local()


def arg_pool() -> ArgPool:
    """This thread's pool (rows are overwritten between calls, so threads must not share one)."""
    if not hasattr(_local, "pool"):
        _local.pool = ArgPool()
    return _local.pool
