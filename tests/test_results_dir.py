"""The results directory under stress: concurrent runs, live readers, damaged and foreign
files, bad --out places and flags. Each bad input: exit 2, one line, nothing written."""

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import generate as gen_job
from pipelines.storage.lease import LEASE_FILE
from pipelines.storage.results import QUARANTINE_DIR, ResultStore
from tests.conftest import ROOT, JobThread, wait_for, write_parquet


def manifest(path, n, steps=2, seed0=0):
    return write_parquet(path, [dict(prompt=f"shape {i}", seed=seed0 + i, steps=steps, model="tiny-random")
                                for i in range(n)])


def shards(out):
    return sorted(out.glob("part-*.parquet"))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def main_rc(argv) -> int:
    """jobs/generate.py's exit code, also when argparse exits."""
    try:
        return gen_job.main(argv)
    except SystemExit as e:
        return e.code


def subprocess_env(ray_local):
    return {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------- bad --out and flags


@pytest.mark.parametrize("out_kind", ["regular_file", "unwritable", "empty", "blank", "manifest_dir", "parent_of_manifest",
                                      "inside_manifest_dir"])
def test_bad_out_is_refused_before_anything_is_written(tmp_path, capsys, out_kind):
    data = tmp_path / "data"
    data.mkdir()
    path = manifest(data / "sweep.parquet", 2)
    out = {
        "regular_file": str(tmp_path / "results.txt"),
        "unwritable": "/proc/self/diffsweep-results",
        "empty": "",
        "blank": "   ",
        "manifest_dir": str(data),
        "parent_of_manifest": str(tmp_path),
        "inside_manifest_dir": str(data / "results"),
    }[out_kind]
    manifest_arg = str(data) if out_kind == "inside_manifest_dir" else str(path)
    if out_kind == "regular_file":
        (tmp_path / "results.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main_rc([manifest_arg, "--out", out, "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--out" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if out_kind == "regular_file":
        assert (tmp_path / "results.txt").read_text() == "keep me"


@pytest.mark.parametrize("flag,value,named", [
    ("--max-retries", "-2", "--max-retries"), ("--cpus-per-actor", "-0.5", "--cpus-per-actor"),
    ("--shard-rows", "nan", "--shard-rows"),
    ("--num-gpus", "-1", "--num-gpus"), ("--shard-rows", "0", "--shard-rows"), ("--pool-size", "two", "--pool-size"),
    ("--lease-seconds", "0.2", "--lease-seconds"), ("--torch-threads", "-4", "--torch-threads"),
    ("--batch-size", "0", "--batch-size"), ("--schedule-timeout", "-5", "--schedule-timeout"),
])
def test_bad_job_flags_exit_2_with_one_line_and_no_directory(tmp_path, flag, value, named):
    path = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), str(path), "--out", str(out), f"{flag}={value}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert named in line and value.strip() in line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_gpus_the_cluster_does_not_have_fail_fast_naming_its_resources(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--num-gpus", "2", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--num-gpus" in line and "0 GPU" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- one writer


def test_two_concurrent_runs_on_one_out_give_each_sample_id_once(tmp_path, ray_local):
    path = manifest(tmp_path / "m.parquet", 12, steps=3)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "jobs" / "generate.py"), str(path), "--out", str(out),
           "--batch-size", "2", "--shard-rows", "2", "--no-progress"]
    env = subprocess_env(ray_local)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errs = [p.communicate(timeout=600)[1] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], errs
    refused = errs[[first.returncode, second.returncode].index(2)]
    line = one_error_line(refused)
    assert "in use by run" in line and socket.gethostname() in line
    df = pd.read_parquet(out)
    assert len(df) == 12 and df.sample_id.is_unique
    runs = json.loads((out / "_run.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["ok"] == 12 and runs[0]["finished_at"]
    assert not (out / LEASE_FILE).exists()


def test_a_lease_held_elsewhere_is_respected_and_a_stale_one_taken_over(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 3)
    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    live = dict(run_id="20261130T101010-abcdef", host="gpu-node-7", pid=4242, started_at=now - 3600,
                heartbeat_at=now - 5, ttl_s=120.0)
    (out / LEASE_FILE).write_text(json.dumps(live))
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "20261130T101010-abcdef" in line and "gpu-node-7" in line and "4242" in line
    assert json.loads((out / LEASE_FILE).read_text()) == live and not shards(out)

    # the same holder, silent for longer than its ttl: a dead run; this one takes over
    (out / LEASE_FILE).write_text(json.dumps({**live, "heartbeat_at": now - 600}))
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "took over the lease" in err and "gpu-node-7" in err
    assert len(pd.read_parquet(out)) == 3 and not (out / LEASE_FILE).exists()


def test_a_dead_process_on_this_host_frees_its_lease_at_once(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    (out / LEASE_FILE).write_text(json.dumps(dict(run_id="20261201T000000-123456", host=socket.gethostname(),
                                                  pid=dead.pid, started_at=now, heartbeat_at=now, ttl_s=3600.0)))
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    assert "took over the lease" in capsys.readouterr().err


def test_a_run_that_loses_its_lease_commits_nothing_more(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 30, steps=30)
    out = tmp_path / "out"
    args = [str(path), "--out", str(out), "--batch-size", "1", "--shard-rows", "1", "--no-progress"]
    with JobThread(args) as job:
        wait_for(lambda: len(shards(out)) >= 1 or not job.alive(), 600, "a first committed shard")
        now = time.time()
        intruder = dict(run_id="20261201T000000-fedcba", host="other-host", pid=1, started_at=now,
                        heartbeat_at=now + 3600, ttl_s=120.0)
        (out / LEASE_FILE).write_text(json.dumps(intruder))
        n_at_takeover = len(shards(out))
    assert job.result.get("rc") == 1
    assert "lost its lease" in capsys.readouterr().err
    assert len(shards(out)) <= n_at_takeover + 1  # at most the commit that was already past its check
    assert json.loads((out / LEASE_FILE).read_text()) == intruder  # the new holder's lease is left alone
    assert len(pd.read_parquet(out)) < 30


# ----------------------------------------------------------------------------- readers during a live run


def test_pandas_polars_and_duckdb_read_the_directory_during_and_after_a_live_run(tmp_path, ray_local):
    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    path = manifest(tmp_path / "m.parquet", 16, steps=6)
    out = tmp_path / "out"
    args = [str(path), "--out", str(out), "--batch-size", "1", "--shard-rows", "1", "--no-progress"]
    with JobThread(args) as job:
        wait_for(lambda: len(shards(out)) >= 1 or not job.alive(), 600, "a first committed shard")
        reads = 0
        while job.alive() or reads == 0:
            n_pd = len(pd.read_parquet(out))
            n_pl = polars.read_parquet(f"{out}/*.parquet").height
            n_db = duckdb.sql(f"SELECT count(*) FROM '{out}/*.parquet'").fetchall()[0][0]
            assert min(n_pd, n_pl, n_db) >= 1
            reads += 1
    assert job.result["rc"] == 0
    assert len(pd.read_parquet(out)) == polars.read_parquet(f"{out}/*.parquet").height == 16
    assert duckdb.sql(f"SELECT count(DISTINCT sample_id) FROM '{out}/*.parquet'").fetchall()[0][0] == 16
    assert not list(out.glob("*.parquet.*")) and not list(out.glob(".*"))


def test_a_half_written_staging_file_is_invisible_to_globs_and_removed_on_resume(tmp_path):
    store = ResultStore(str(tmp_path / "out"))
    store.create()
    table = pa.table({"sample_id": ["a"], "status": ["ok"], "image": pa.array([b"x"], pa.binary())})
    store.commit_shard(table, "20261201T000000-abcdef", 0)
    staging = tmp_path / "out" / "_staging"
    (staging / "deadbeef-part-x.parquet").write_bytes(b"PAR1 half a shard")
    assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == ["part-20261201T000000-abcdef-00000.parquet"]
    store.remove_staging()
    assert not list(staging.iterdir())


# ----------------------------------------------------------------------------- damaged and foreign files


def test_resume_sets_damaged_and_foreign_files_aside_and_finishes(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 8)
    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--shard-rows", "2", "--batch-size", "2", "--no-progress"]) == 0
    capsys.readouterr()
    first, second, third = shards(out)[:3]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # truncated by a full disk
    truncated = first.read_bytes()
    pq.write_table(pa.table({"sample_id": ["x"], "loss": [0.5]}), second)  # another program's part-*
    foreign = out / "notes.parquet"
    pd.DataFrame({"note": ["mine"]}).to_parquet(foreign)
    third.write_bytes(third.read_bytes()[:100] + b"\0" * 200 + third.read_bytes()[300:])  # corrupt pages, footer intact

    assert gen_job.main([str(path), "--out", str(out), "--shard-rows", "2", "--batch-size", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[:3000]
    for f in (first, second, foreign):
        assert f"set aside {f.name}" in err
        assert not f.exists()
    quarantined = {p.name: p for p in (out / QUARANTINE_DIR).iterdir()}
    assert quarantined[first.name].read_bytes() == truncated
    assert pd.read_parquet(quarantined["notes.parquet"]).note.tolist() == ["mine"]
    df = pd.read_parquet(out)
    assert len(df) == 8 and df.sample_id.is_unique and (df.status == "ok").all()
    run = json.loads((out / "_run.json").read_text())["runs"][-1]
    assert len(run["set_aside"]) >= 3 and run["todo"] >= 4


def test_overwrite_deletes_only_what_diffsweep_wrote(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 2)
    foreign_dir = tmp_path / "theirs"
    foreign_dir.mkdir()
    theirs = foreign_dir / "part-00000.parquet"
    pd.DataFrame({"sample_id": ["s"], "status": ["ok"], "image": [b"png"]}).to_parquet(theirs)
    assert gen_job.main([str(path), "--out", str(foreign_dir), "--overwrite", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "part-00000.parquet" in line
    assert theirs.exists() and sorted(p.name for p in foreign_dir.iterdir()) == ["part-00000.parquet"]

    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    ours = shards(out)
    keep = out / "part-keep.parquet"  # a user's file under our prefix, in a directory we wrote
    pd.read_parquet(ours[0]).to_parquet(keep)
    assert gen_job.main([str(path), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not any(p.exists() for p in ours)
    assert not keep.exists() and (out / QUARANTINE_DIR / "part-keep.parquet").exists()  # set aside, not deleted
    assert pd.read_parquet(out).sample_id.is_unique


def test_a_damaged_run_record_is_named(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    (out / "_run.json").write_text('{"manifest_digest": ')
    capsys.readouterr()
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "_run.json" in line and "JSON" in line
    assert not (out / LEASE_FILE).exists()


def test_the_no_op_resume_is_recorded_as_finished(tmp_path, ray_local, capsys):
    path = manifest(tmp_path / "m.parquet", 2)
    out = tmp_path / "out"
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    assert gen_job.main([str(path), "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    last = json.loads((out / "_run.json").read_text())["runs"][-1]
    assert last["finished_at"] and last["todo"] == 0 and last["ok"] == 0 and last["skipped_done"] == 2


# ----------------------------------------------------------------------------- failures inside actors


def test_a_model_that_fails_to_load_in_the_actor_ends_as_error_rows_with_its_cause(tmp_path, ray_local, capsys):
    import yaml

    from pipelines.registry.tiny import build_tiny_sd_pipeline

    model_dir = tmp_path / "broken"
    build_tiny_sd_pipeline().save_pretrained(model_dir, safe_serialization=True)
    weights = next((model_dir / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")  # present, but not safetensors
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {"broken": {"base": "tiny-random", "source": str(model_dir),
                                                            "pipeline": "StableDiffusionPipeline"}}}))
    rows = [dict(prompt=f"p{i}", seed=i, steps=2, model="broken" if i % 2 else "tiny-random") for i in range(4)]
    path = write_parquet(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    rc = gen_job.main([str(path), "--out", str(out), "--models", str(models), "--no-progress"])
    err = capsys.readouterr().err
    if rc == 2:  # found on the driver already: one line naming the model
        assert "broken" in one_error_line(err) and not out.exists()
        return
    assert rc == 0, err
    df = pd.read_parquet(out).sort_values("seed")
    assert list(df.status) == ["ok", "error", "ok", "error"]
    assert df[df.status == "error"].error.str.contains("model 'broken' could not be loaded").all()
    assert "UDF failed" not in " ".join(df.error.dropna())


def test_a_batch_is_given_up_as_error_rows_after_max_retries_attempts(ray_local):
    from jobs.raydata.session import AttemptCounter
    from pipelines.generation.worker import GenerateActor
    from jobs.raydata.session import batch_attempts
    from pipelines.registry.models import ModelRegistry

    counter = batch_attempts(ray_local, "diffsweep-attempts-test")
    spec = ModelRegistry().get("tiny-random")
    actor = GenerateActor(specs={"tiny-random": spec}, dtype="float32", batch_size=2, torch_threads=1,
                          attempts=AttemptCounter("diffsweep-attempts-test"), max_attempts=2)
    batch = pd.DataFrame([dict(sample_id=f"s{i}", prompt="a red circle", negative_prompt="", seed=i, model="tiny-random",
                               scheduler="ddim", steps=2, guidance=1.0, height=32, width=32, cache_interval=1)
                          for i in range(2)])
    assert (actor(batch).status == "ok").all()  # attempt 1
    assert (actor(batch).status == "ok").all()  # attempt 2: as if the first one's actor had died
    given_up = actor(batch)  # attempt 3 > 1 + --max-retries 1
    assert (given_up.status == "error").all() and given_up.error.str.contains("--max-retries 1 exhausted").all()
    ray_local.kill(counter)
