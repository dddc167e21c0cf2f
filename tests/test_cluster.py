"""A real multi-node Ray cluster on this machine: `ray start --head` + two `ray start --address` worker
nodes (separate processes, distinct custom resources), the teach stage submitted with `ray job submit`.

Checks: the job succeeds, its actors ran on both worker nodes (the Ray node id is recorded in every
teach marker) and never on the head (which lacks the teacher's resource), and the cached targets
equal those of a single-node run. Slow (three Ray nodes on two cores): `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from bench.kit.configs import SMALL_CROPS, raw_config, write_toml
from pipeline.cache import open_cache
from pipeline.config import load_config
from pipeline.storage import Root
from stages import shard, teach

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free 127.0.0.1 ports (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_port_args(index: int) -> list[str]:
    """`ray start` options giving a node its own ports. Two nodes on one host started together otherwise
    race for the same default ports (a worker raylet died with 'bind: Address already in use') — and
    other clusters on this shared machine hold the defaults too."""
    agent, grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(6)
    lo = 20000 + 1000 * index
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 999}"]


def start_cluster(cluster, workers: int = 2) -> None:
    """Head, then `workers` worker nodes one by one (1 CPU, a teacher slot and a `worker_<i>` resource
    each), every node with its own ports."""
    cluster.start("--head", f"--port={cluster.port}", "--num-cpus=1", f"--temp-dir={cluster.temp}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dash}",
                  "--disable-usage-stats", *node_port_args(0))
    cluster.wait_nodes(1)
    for i in range(workers):
        cluster.start(f"--address=127.0.0.1:{cluster.port}", "--num-cpus=1",
                      f"--resources={json.dumps({'teacher_slot': 1, f'worker_{i}': 1})}", *node_port_args(i + 1))
        cluster.wait_nodes(2 + i)


def write_config(tmp: Path, root: Path, corpus: Path) -> Path:
    """The job's config: small crops, shards of 2, a 2-actor pixel teacher that needs a teacher slot. Its
    cells take 3 s (two 1.5 s predict calls), so the actor that starts first cannot finish all four cells
    before the other one is up: both nodes get work however the start-up times fall."""
    px = {"adapter": "bench.kit.teach:SlowPixelTeacher", "model": "r+2g@1.5", "actors": 2, "num_cpus": 0.25,
          "resources": {"teacher_slot": 1.0}}
    raw = raw_config(root, corpus, {"px": px}, preset="bare", shard_size=2, crops=SMALL_CROPS)
    return write_toml(tmp / "cluster_test.toml", raw)


def make_corpus(path: Path, n: int = 8) -> None:
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path / f"im{i}.png")


class Cluster:
    """Head + worker nodes as separate `ray start --block` process groups (killed precisely, no `ray stop`)."""

    def __init__(self, tmp: Path):
        self.port, self.dash = free_port(), free_port()
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.procs: list[subprocess.Popen] = []
        self.log = tmp / "ray_nodes.log"

    def start(self, *args: str) -> None:
        with open(self.log, "ab") as log:
            self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                                *args], env=self.env, stdout=log, stderr=log, start_new_session=True))

    def up(self, workers: int = 2) -> None:
        """Head, then worker nodes one at a time, each with its own ports (`start_cluster`): nodes
        sharing a host and session folder collide on default ports and socket names otherwise."""
        start_cluster(self, workers)

    def nodes(self) -> list[dict]:
        out = subprocess.run([str(BIN / "python"), "-c", (
            "import ray, json; ray.init(address='127.0.0.1:%d', logging_level='ERROR');"
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'res': n['Resources']} for n in ray.nodes()]))"
        ) % self.port], env=self.env, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if sum(x["alive"] for x in self.nodes()) >= n:
                return
            time.sleep(2)
        raise TimeoutError(f"cluster did not reach {n} nodes: {self.log.read_text()[-2000:]}")

    def down(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)


def test_teach_job_on_multi_node_cluster(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    root, single = tmp_path / "run", tmp_path / "single"
    cfg_path = write_config(tmp_path, root, corpus)
    cfg = load_config(cfg_path, overrides=['run.executor="inline"'])
    shard.run(cfg)
    shutil.copytree(root, single)
    teach.run(load_config(cfg_path, root=str(single), overrides=['run.executor="inline"']))

    cluster = Cluster(tmp_path)
    try:
        cluster.up()
        workers = {n["id"] for n in cluster.nodes() if n["alive"] and "teacher_slot" in n["res"]}
        head = {n["id"] for n in cluster.nodes() if n["alive"] and "teacher_slot" not in n["res"]}
        assert len(workers) == 2 and len(head) == 1
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{cluster.dash}",
             f"--working-dir={tmp_path}", "--", "dad", "teach", "-c", cfg_path.name, "--address", "auto"],
            env=cluster.env, capture_output=True, text=True, timeout=480)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    finally:
        cluster.down()

    run_root, ref = Root(str(root)), Root(str(single))
    markers = [json.loads(p.read_text()) for p in (root / "ledger" / "teach" / "px").glob("*.json")]
    used = {m["node"] for m in markers}
    assert used == workers, f"teach actors ran on {used}, worker nodes are {workers}"
    a, b = open_cache(run_root, "px"), open_cache(ref, "px")
    for name in ("global", "local", "global_valid", "local_valid"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
