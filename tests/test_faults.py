"""Faults injected for real on a local Ray: killed actors, killed drivers, rows that
always fail, weights that must not load."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
import yaml

from jobs import generate as gen_job
from tests.conftest import ROOT, JobThread, wait_for, write_parquet


def manifest(tmp_path, n, steps=4, name="m.parquet", model="tiny-random"):
    rows = [dict(prompt=f"prompt {i}", seed=i, steps=steps, model=model) for i in range(n)]
    return write_parquet(tmp_path / name, rows), rows


def shards(out):
    return sorted(out.glob("part-*.parquet")) if out.exists() else []


def actor_pids():
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "MapBatches(GenerateActor)" in line]


def test_actor_killed_mid_job_is_replaced_and_every_row_finishes(tmp_path, ray_local):
    # 16 rows of 40 steps: the kill lands after the first of 16 one-row shards, and the
    # replacement actor still has most of them to do.
    path, rows = manifest(tmp_path, 16, steps=40)
    out = tmp_path / "out"
    args = [str(path), "--out", str(out), "--batch-size", "1", "--shard-rows", "1", "--no-progress"]
    with JobThread(args) as job:
        wait_for(lambda: len(shards(out)) >= 1 and actor_pids() or not job.alive(), 600,
                 "a first committed shard and a live generation actor")
        killed = actor_pids()
        assert killed and len(shards(out)) < 16, "the job should still have rows to do when its actor is killed"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
    assert job.result.get("rc") == 0
    df = pd.read_parquet(out)
    assert len(df) == 16 and df.sample_id.is_unique and (df.status == "ok").all()
    workers_after = {int(w.split(":")[1]) for w in df.worker}
    assert workers_after - set(killed), "a replacement actor should have produced rows"


def test_driver_killed_three_times_then_resumed_gives_each_row_once(tmp_path, ray_local):
    # Each attempt is killed as soon as it has committed a shard of its own (plus up to 0.3 s,
    # so some kills land mid-write): 3 attempts commit a few of the 12 shards, never all.
    path, rows = manifest(tmp_path, 24, steps=40)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), str(path), "--out", str(out),
           "--batch-size", "2", "--shard-rows", "2", "--no-progress"]
    rng = random.Random(0)
    for attempt in range(3):
        before = len(shards(out))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(shards(out)) > before or proc.poll() is not None, 600, f"attempt {attempt}'s first shard")
        assert proc.poll() is None, f"attempt {attempt} ended by itself: {proc.communicate()[1][-2000:]}"
        time.sleep(rng.uniform(0, 0.3))  # somewhere in the middle of the next shard
        proc.kill()
        proc.communicate()
    done_before_final = len(pd.read_parquet(out))
    assert 0 < done_before_final < 24, "kills should land mid-run"
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-2000:]
    df = pd.read_parquet(out)
    expected = pd.read_parquet(path)
    assert len(df) == 24 and df.sample_id.is_unique
    assert sorted(df.seed) == sorted(expected.seed)
    assert (df.status == "ok").all()
    assert not list(out.glob(".staging-*")) and not list((out / "_staging").glob("*"))
    assert not (out / "_lease.json").exists()


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """A NaN-producing model (safetensors) and a pickled-only model, registered in a YAML."""
    from pipelines.registry.tiny import build_tiny_sd_pipeline

    tmp = tmp_path_factory.mktemp("models")
    pipe = build_tiny_sd_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(tmp / "nan-model", safe_serialization=True)
    build_tiny_sd_pipeline().save_pretrained(tmp / "pickled", safe_serialization=False)
    spec = {"models": {
        "nan-model": {"base": "tiny-random", "source": str(tmp / "nan-model"), "pipeline": "StableDiffusionPipeline"},
        "pickled": {"base": "tiny-random", "source": str(tmp / "pickled"), "pipeline": "StableDiffusionPipeline"},
    }}
    (tmp / "models.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "models.yaml"


def test_rows_that_always_fail_end_as_errors_and_the_job_finishes(tmp_path, ray_local, broken_models, capsys):
    rows = [dict(prompt=f"p{i}", seed=i, steps=2, model="nan-model" if i % 2 else "tiny-random") for i in range(6)]
    path = write_parquet(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--models", str(broken_models), "--no-progress"]) == 0
    df = pd.read_parquet(out).sort_values("seed")
    assert list(df.status) == ["ok", "error"] * 3
    assert df[df.status == "error"].error.str.contains("non-finite").all()
    assert df[df.status == "error"].image.isna().all()
    assert "3 ok, 3 error" in capsys.readouterr().err

    # a re-run skips recorded errors; --retry-errors regenerates exactly those rows
    assert gen_job.main([str(path), "--out", str(out), "--models", str(broken_models), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    args = [str(path), "--out", str(out), "--models", str(broken_models), "--no-progress", "--retry-errors"]
    assert gen_job.main(args) == 0
    assert "3 error, 3 already in" in capsys.readouterr().err
    again = pd.read_parquet(out)
    assert len(again) == 6 and again.sample_id.is_unique and (again.status == "error").sum() == 3


def test_pickled_weights_are_refused_before_any_worker_starts(tmp_path, broken_models, capsys):
    path = write_parquet(tmp_path / "m.parquet", [dict(prompt="a", model="pickled")])
    assert gen_job.main([str(path), "--out", str(tmp_path / "out"), "--models", str(broken_models)]) == 2
    err = capsys.readouterr().err
    assert "only pickled weights" in err and "safetensors" in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_keeps_committed_shards_and_says_how_to_resume(tmp_path, ray_local):
    path, rows = manifest(tmp_path, 40, steps=40)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), str(path), "--out", str(out),
           "--batch-size", "2", "--shard-rows", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: err_chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()

    def images_done() -> int:  # from the progress bar: "generate:  10%|...| 4/40"
        counts = re.findall(rb"(\d+)/40", b"".join(err_chunks))
        return int(counts[-1]) if counts else 0

    # the bar counts committed rows: some shards are in, the job is still running
    wait_for(lambda: images_done() >= 4 or proc.poll() is not None, 600, "4 committed images")
    assert proc.poll() is None and shards(out)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=60)
    err = b"".join(err_chunks).decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert "re-run the same command to resume" in err
    finished = int(re.search(r"stopped after (\d+) of 40 rows", err).group(1))
    done = pd.read_parquet(out) if shards(out) else pd.DataFrame({"sample_id": []})
    assert len(done) == finished < 40 and finished >= 4 and done.sample_id.is_unique
