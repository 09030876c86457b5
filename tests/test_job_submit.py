"""`ray job submit --working-dir . -- python jobs/generate.py ...` against a cluster
started with `ray start --head` (the job API needs the head's dashboard agent)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, free_port, write_parquet


@pytest.fixture()
def ray_head(tmp_path):
    """A head node in its own process group; `--block` ties the node to that process, so
    stopping the group stops exactly this cluster (not the session's ray.init one)."""
    ray_cli = shutil.which("ray")
    assert ray_cli, "the ray CLI comes with ray[default]"
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--port", str(port), "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2",
         "--include-dashboard", "true", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    try:
        yield ray_cli, f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # A later bare ray.init() on this machine must not try to join the stopped head.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_generate_runs_under_ray_job_submit(tmp_path, ray_head):
    ray_cli, address = ray_head
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt=f"p{i}", seed=i, steps=2, model="tiny-random")
                                                       for i in range(4)])
    out = tmp_path / "results"
    runtime_env = {"excludes": ["pipelines/embedded/model", "docs", ".git"],
                   "env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/generate.py", str(manifest), "--out", str(out), "--no-progress"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the head's job agent takes a moment to come up
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if "No available agent" not in proc.stderr and "Connection refused" not in proc.stderr and \
                "Failed to connect" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "succeeded" in proc.stdout
    df = pd.read_parquet(out)
    assert len(df) == 4 and (df.status == "ok").all()
