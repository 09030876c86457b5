"""Multi-node correctness without a cluster: a local 3-node Ray (ray.cluster_utils.Cluster:
a head without CPUs, so every actor and task lands on one of two 1-CPU worker nodes) gives
the results one node gives: the same sample_ids, pixels within 1/255."""

import io
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from jobs import generate as gen_job
from tests.conftest import ROOT, write_parquet


def pixels(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {s: np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16) for s, b in zip(df.sample_id, df.image)}


def test_three_nodes_give_the_results_of_one(tmp_path, ray_local, monkeypatch):
    from ray.cluster_utils import Cluster

    rows = [dict(prompt=f"prompt {i % 3}", seed=i, model="tiny-random", steps=3, height=32, width=32,
                 scheduler=["ddim", "euler"][i % 2]) for i in range(12)]
    manifest = write_parquet(tmp_path / "m.parquet", rows)
    one, three = tmp_path / "one", tmp_path / "three"
    assert gen_job.main([str(manifest), "--out", str(one), "--batch-size", "2", "--no-progress"]) == 0

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the nodes' workers import this checkout
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), str(manifest), "--out", str(three),
                               "--batch-size", "2", "--no-progress"], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        cluster.shutdown()

    a, b = pd.read_parquet(one), pd.read_parquet(three)
    assert sorted(a.sample_id) == sorted(b.sample_id) and b.sample_id.is_unique and len(b) == 12
    assert (b.status == "ok").all(), b.error.dropna().unique()
    pa_, pb = pixels(a), pixels(b)
    worst = max(int(np.abs(pa_[s] - pb[s]).max()) for s in pa_)
    assert worst <= 1, f"pixels differ by up to {worst}/255 between one node and three"
