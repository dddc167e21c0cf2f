"""How fast the embedded scene renderer makes 256² training images (RGB + exact depth) on this machine.

Why it matters: the embedded default trains on fresh renders (tens of thousands of images), so the
renderer must not be the bottleneck: the goal is >= 20 images/s. Reported: the steady-state
wall-clock rate with 2 worker processes (the headline value), 1 process, and 2x supersampling; the
same rates per CPU-second (independent of other jobs sharing the machine); where one process spends
its CPU time; and the load average while measuring.
"""

from __future__ import annotations

import json
import os
import time
from multiprocessing import get_context

from scenes import layouts, render


def _jobs(seeds, size, supersample=1):
    return list(render._groups(seeds, size, None, False, supersample))


def _rate_in_process(seeds, size, supersample=1) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second) rendering in this process."""
    render.render_view(10_000, size=size, supersample=supersample)  # warm-up: imports, texture files
    wall, cpu = time.perf_counter(), time.process_time()
    n = sum(len(render._render_group(job)) for job in _jobs(seeds, size, supersample))
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def _rate_pool(seeds, size, processes: int) -> tuple[float, float, float]:
    """(steady-state images/s with warm workers, end-to-end images/s including pool start-up,
    images per CPU second of the workers including their start-up)."""
    t0, children0 = time.perf_counter(), os.times()
    pool = get_context("spawn").Pool(processes)
    pool.map(render._render_group, _jobs(range(20_000, 20_000 + 4 * processes, 4), 64), chunksize=1)
    t1 = time.perf_counter()
    n = sum(len(v) for v in pool.imap(render._render_group, _jobs(seeds, size)))
    t2 = time.perf_counter()
    pool.close()
    pool.join()  # reaped workers' CPU time shows up in os.times().children_*
    children1 = os.times()
    cpu = (children1.children_user + children1.children_system) - (children0.children_user + children0.children_system)
    return n / (t2 - t1), n / (t2 - t0), n / max(cpu, 1e-9)


def _breakdown(scene_seeds, size) -> dict:
    """CPU milliseconds per view spent building layouts, building pybullet scenes, rendering + finishing."""
    t = {"layout": 0.0, "scene_build": 0.0, "render_and_finish": 0.0}
    views = 0
    clock = time.process_time
    for s in scene_seeds:
        a = clock()
        scene = layouts.build_scene(s)
        b = clock()
        with render._Client(scene) as client:
            c = clock()
            for cam in range(len(scene.cameras)):
                render._view(client, s * layouts.VIEWS_PER_SCENE + cam, size, False, 1)
            d = clock()
        t["layout"] += b - a
        t["scene_build"] += c - b
        t["render_and_finish"] += d - c
        views += len(scene.cameras)
    return {k: round(1000 * v / views, 1) for k, v in t.items()}


def run(quick: bool = False) -> dict:
    size = 256
    n = 32 if quick else 160
    seeds = range(1000, 1000 + n)
    load_before = os.getloadavg()[0]
    one_wall, one_cpu = _rate_in_process(seeds, size)
    two_steady, two_end_to_end, two_cpu = _rate_pool(seeds, size, 2)
    detail = {
        "size": size,
        "views_timed": n,
        "views_per_scene": layouts.VIEWS_PER_SCENE,
        "one_process_images_per_s": round(one_wall, 2),
        "one_process_images_per_cpu_s": round(one_cpu, 2),
        "two_processes_steady_images_per_s": round(two_steady, 2),
        "two_processes_end_to_end_images_per_s": round(two_end_to_end, 2),
        "two_processes_images_per_cpu_s_incl_startup": round(two_cpu, 2),
        "cpu_ms_per_view_one_process": _breakdown(range(3000, 3002 if quick else 3008), size),
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "note": "wall-clock rates fall when other jobs share the CPUs; per-CPU-second rates do not",
    }
    if not quick:
        ss_wall, ss_cpu = _rate_in_process(range(1000, 1016), size, 2)
        detail["supersample2_one_process_images_per_s"] = round(ss_wall, 2)
        detail["supersample2_one_process_images_per_cpu_s"] = round(ss_cpu, 2)
    return {
        "scenes_images_per_s": {
            "value": round(float(two_steady), 2),
            "unit": "images/s",
            "goal": ">= 20",
            "detail": detail,
        }
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
