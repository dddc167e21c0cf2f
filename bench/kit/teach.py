"""Teaching helpers: a plugin teacher that takes its time, and what a teacher's cache holds.

* `SlowPixelTeacher` — `adapter = "bench.kit.teach:SlowPixelTeacher"`, `model = "r+2g@0.5"`: the r+2g
  pixel teacher plus a sleep per `predict` call, so a kill lands mid-stage.
* `ExplodingTeacher` — `adapter = "bench.kit.teach:ExplodingTeacher"`: a plugin whose predict raises.
* `cache_arrays` — every cache array of one teacher: what "identical" targets are checked against.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import TeacherCfg, fingerprint
from stages.teachers import TeacherSpec
from stages.teachers.pixel import FUNCTIONS, PixelTeacher


class SlowPixelTeacher(PixelTeacher):
    """`model = "r+2g@0.5"`: the r+2g pixel function, sleeping 0.5 s per predict call."""

    def __init__(self, name: str, tcfg: TeacherCfg):
        fn, _, delay = tcfg.model.partition("@")
        self.fn = FUNCTIONS[fn]
        self.delay = float(delay or 0)
        self.spec = self.describe(name, tcfg)

    @classmethod
    def describe(cls, name: str, tcfg: TeacherCfg) -> TeacherSpec:
        fn = tcfg.model.partition("@")[0]
        return TeacherSpec(name, "slow-pixel", fn, tcfg.output_space, "native", tcfg.license, fingerprint(fn))

    def predict(self, rgb):
        time.sleep(self.delay)
        return super().predict(rgb)


class ExplodingTeacher(PixelTeacher):
    """A plugin teacher whose predict raises: what a bug inside a teacher looks like to the stage."""

    def predict(self, rgb):
        raise ZeroDivisionError("the teacher's own bug")


def cache_arrays(root, teacher: str) -> dict[str, np.ndarray]:
    """name → the whole array, for every cache array of `teacher` under `root` (a Root or a path)."""
    from pipeline.cache import ARRAYS, open_cache
    from pipeline.storage import Root

    group = open_cache(root if isinstance(root, Root) else Root(str(root)), teacher)
    return {name: group[name][...] for name in ARRAYS}
