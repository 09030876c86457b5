"""Multi-node correctness without a cluster: a local 3-node Ray (ray.cluster_utils.Cluster:
a head without CPUs, so every actor and task lands on one of two 1-CPU worker nodes) gives
the results one node gives (the same sample_ids, pixels within 1/255), and a run that loses
the worker node hosting its generation actor still finishes with each sample_id once."""

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from jobs import generate as gen_job
from tests.conftest import ROOT, wait_for, write_parquet


def pixels(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {s: np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16) for s, b in zip(df.sample_id, df.image)}


@pytest.fixture(scope="module")
def three_nodes():
    """The 3-node cluster for this module (started once: each start costs seconds)."""
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(ROOT))  # the nodes' workers import this checkout
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        mp.undo()


def generate_cmd(manifest, out, *flags):
    return [sys.executable, str(ROOT / "jobs" / "generate.py"), str(manifest), "--out", str(out), "--no-progress",
            *flags]


def test_three_nodes_give_the_results_of_one(tmp_path, ray_local, three_nodes):
    rows = [dict(prompt=f"prompt {i % 3}", seed=i, model="tiny-random", steps=3, height=32, width=32,
                 scheduler=["ddim", "euler"][i % 2]) for i in range(12)]
    manifest = write_parquet(tmp_path / "m.parquet", rows)
    one, three = tmp_path / "one", tmp_path / "three"
    assert gen_job.main([str(manifest), "--out", str(one), "--batch-size", "2", "--no-progress"]) == 0

    env = {**os.environ, "RAY_ADDRESS": three_nodes.address}
    done = subprocess.run(generate_cmd(manifest, three, "--batch-size", "2"), env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = pd.read_parquet(one), pd.read_parquet(three)
    assert sorted(a.sample_id) == sorted(b.sample_id) and b.sample_id.is_unique and len(b) == 12
    assert (b.status == "ok").all(), b.error.dropna().unique()
    pa_, pb = pixels(a), pixels(b)
    worst = max(int(np.abs(pa_[s] - pb[s]).max()) for s in pa_)
    assert worst <= 1, f"pixels differ by up to {worst}/255 between one node and three"


def node_of(cluster, pid: int):
    """The worker node whose raylet started process `pid` (a Ray worker is its raylet's child)."""
    from ray._private import ray_constants

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in cluster.worker_nodes:
        if node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid in ancestors:
            return node
    raise AssertionError(f"process {pid} runs on no worker node of the cluster")


def test_worker_node_lost_mid_run_finishes_with_each_sample_id_once(tmp_path, three_nodes):
    # Runs last in this module: it leaves the cluster with one worker node.
    n = 16
    rows = [dict(prompt=f"prompt {i}", seed=i, model="tiny-random", steps=20, height=32, width=32) for i in range(n)]
    manifest = write_parquet(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": three_nodes.address}
    # Half a CPU per actor: after the loss, the one 1-CPU node left must host the actor and the
    # PNG-encoding tasks (0.5 CPU) together, or the pipeline waits for a CPU that never comes.
    flags = ("--batch-size", "2", "--shard-rows", "2", "--cpus-per-actor", "0.5")
    proc = subprocess.Popen(generate_cmd(manifest, out, *flags), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: list(out.glob("part-*.parquet")) or proc.poll() is not None, 600, "a first committed shard")
        first = sorted(out.glob("part-*.parquet"))
        assert first and proc.poll() is None, f"the job ended before its first shard: {proc.communicate()[1][-3000:]}"
        pid = int(pd.read_parquet(first[0]).worker.iloc[0].rsplit(":", 1)[1])
        lost = node_of(three_nodes, pid)
        three_nodes.remove_node(lost)
        done_at_loss = sum(len(pd.read_parquet(f)) for f in out.glob("part-*.parquet"))
        assert done_at_loss < n and proc.poll() is None, "the node should be lost mid-run"
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == n and df.sample_id.is_unique and sorted(df.seed) == list(range(n))
    assert (df.status == "ok").all(), df.error.dropna().unique()
    assert {int(w.rsplit(":", 1)[1]) for w in df.worker} - {pid}, "a replacement actor should have made rows"
