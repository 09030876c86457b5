"""Object storage end to end: manifest and results on a real S3 API (moto's standalone
server on 127.0.0.1), configured the way users configure pyarrow: AWS_ENDPOINT_URL and
credentials in the environment, plain s3:// URIs on the command line."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evals.fid import load_stats
from jobs import evaluate as eval_job
from jobs import generate as gen_job
from pipelines.storage.lease import LEASE_FILE, Lease, LeaseHeldError, LeaseRecord
from tests.conftest import ROOT, free_port, wait_for

BUCKET = "bucket"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free local port, with the AWS_* variables pointing at it for the
    duration of the module; the bucket is created empty. Yields a pyarrow S3 filesystem."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # offline: never ask an instance-metadata service
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3  # a dependency of moto

        boto3.client("s3").create_bucket(Bucket=BUCKET)  # boto3 reads the same AWS_* variables
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/")  # so does pyarrow (AWS_ENDPOINT_URL too)
        yield fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def s3_results(s3_env, ray_local):
    """One generation run on the bucket (embedded model, 2 prompts x 2 seeds x 2 schedulers), shared by
    the round-trip test and the evaluation test: each generation run pays for an actor and a model load."""
    fs = s3_env
    rows = [dict(prompt=p, seed=s, model="embedded", steps=4, scheduler=sch)
            for p in ["a red circle", "a blue square"] for s in [1, 2] for sch in ["ddim", "euler"]]
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), f"{BUCKET}/m.parquet", filesystem=fs)
    args = [f"s3://{BUCKET}/m.parquet", "--out", f"s3://{BUCKET}/results/", "--no-progress"]
    assert gen_job.main(args) == 0
    return args


def test_generate_round_trip_and_resume_on_s3(s3_env, s3_results):
    fs, args = s3_env, s3_results
    shards = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results"))
                    if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    assert shards
    df = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in shards]).to_pandas()
    assert len(df) == 8 and df.sample_id.is_unique, df.sample_id.tolist()
    assert (df.status == "ok").all(), df.error.dropna().unique()
    for png in df.image:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(png)).size == (64, 64)  # the embedded model's size

    assert gen_job.main(args) == 0  # the same command again: resumes with nothing to do
    again = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results"))
                   if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    assert again == shards
    with fs.open_input_stream(f"{BUCKET}/results/_run.json") as f:
        run = json.loads(f.read().decode())
    assert [r["todo"] for r in run["runs"]] == [8, 0] and run["runs"][-1]["skipped_done"] == 8
    # (the evaluation test's feature cache, results/_features/, is its own: checked there)
    left = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results", recursive=True))
                  if not i.path.startswith(f"{BUCKET}/results/_features"))
    assert left == [f"{BUCKET}/results/_run.json", *again]  # no lease or staging left behind
    total = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in again)
    assert total == 8


def listing(fs, prefix: str) -> list[str]:
    """Every object under the prefix (recursive), by path; [] when there is none."""
    if fs.get_file_info(prefix).type == pafs.FileType.NotFound:
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
                  if i.type == pafs.FileType.File)


def committed(fs, prefix: str) -> list[str]:
    """The committed shards: part-*.parquet right under the prefix."""
    return [p for p in listing(fs, prefix) if p.rsplit("/", 1)[0] == prefix
            and p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")]


def put_manifest(fs, key: str, rows) -> str:
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), f"{BUCKET}/{key}", filesystem=fs)
    return f"s3://{BUCKET}/{key}"


def test_evaluate_s3_results_and_s3_reference_into_a_local_report(s3_env, s3_results, tmp_path, capsys):
    fs = s3_env
    results = s3_results[2]  # s3://bucket/results/

    # Reference statistics written to the bucket, then read from it.
    stats = f"s3://{BUCKET}/ev/stats/domain.npz"
    assert eval_job.main(["--make-reference", stats, "embedded:32", "--features", "embedded"]) == 0
    assert load_stats(stats).n == 32

    # Feature extraction runs on a Ray of its own, whose workers read the shards from the
    # bucket with the credentials of their environment, as on a cluster.
    report = tmp_path / "report"
    # RAY_ADDRESS=local: a Ray of its own even when a `ray start` cluster (another token) runs here.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    cmd = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), results, "--reference", stats, "--out", str(report),
           "--n-boot", "2", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(8 images had features computed)" in done.stderr, done.stderr[-2000:]
    metrics = pd.read_parquet(report / "metrics.parquet")
    assert sorted(metrics.scheduler) == ["ddim", "euler"] and (metrics.n == 4).all()
    assert metrics.fid.notna().all() and (metrics.fid > 0).all(), metrics[["scheduler", "fid"]]
    assert (report / "report.html").stat().st_size > 0
    cached = listing(fs, f"{BUCKET}/results/_features")
    assert any("/part-" in p for p in cached) and any(p.rsplit("/", 1)[-1].startswith("text-") for p in cached)
    assert not any("_staging" in p or p.endswith(".tmp") for p in cached), cached

    # Again, in this process, against a results directory on the bucket as the reference:
    # every feature comes from the bucket's cache (no Ray), the reference's statistics are cached there.
    capsys.readouterr()
    again = tmp_path / "report2"
    assert eval_job.main([results, "--reference", results, "--out", str(again), "--n-boot", "2", "--no-progress"]) == 0
    assert "(0 images had features computed)" in capsys.readouterr().err
    same = pd.read_parquet(again / "metrics.parquet")
    assert (same.n == 4).all() and same.fid.notna().all()
    assert any(p.rsplit("/", 1)[-1].startswith("ref-results-") for p in listing(fs, f"{BUCKET}/results/_features"))
    top = [p for p in listing(fs, f"{BUCKET}/results") if "/_features/" not in p]
    assert top == sorted([f"{BUCKET}/results/_run.json", *committed(fs, f"{BUCKET}/results")])  # no report there


def test_evaluate_refuses_what_is_not_there_on_s3(s3_env, tmp_path, capsys):
    assert eval_job.main([f"s3://{BUCKET}/nothing/", "--out", str(tmp_path / "r")]) == 2
    assert "not a results directory (no such directory)" in capsys.readouterr().err
    assert eval_job.main([f"s3://{BUCKET}/results/", "--out", f"s3://{BUCKET}/report/"]) == 2
    assert "--out s3://bucket/report/: the report is written to a local directory" in capsys.readouterr().err


def test_driver_killed_on_s3_then_the_same_command_finishes_each_row_once(s3_env, ray_local, capsys):
    fs = s3_env
    rows = [dict(prompt=f"prompt {i}", seed=i, model="tiny-random", steps=40, height=32, width=32) for i in range(12)]
    manifest = put_manifest(fs, "kill/m.parquet", rows)
    out = f"s3://{BUCKET}/kill/results/"
    args = [manifest, "--out", out, "--batch-size", "2", "--shard-rows", "2", "--no-progress"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: committed(fs, f"{BUCKET}/kill/results") or proc.poll() is not None, 600, "the first shard")
        assert proc.poll() is None, f"the driver ended by itself: {proc.communicate()[1][-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    before = committed(fs, f"{BUCKET}/kill/results")
    n_before = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in before)
    assert 0 < n_before < 12, "the kill should land mid-run"
    assert f"{BUCKET}/kill/results/{LEASE_FILE}" in listing(fs, f"{BUCKET}/kill/results"), "the dead driver's lease"

    capsys.readouterr()
    assert gen_job.main(args) == 0  # the same command again
    assert "took over the lease of run" in capsys.readouterr().err  # its pid is gone, on this host: at once
    shards = committed(fs, f"{BUCKET}/kill/results")
    assert set(before) <= set(shards)
    df = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in shards]).to_pandas()
    assert len(df) == 12 and df.sample_id.is_unique and (df.status == "ok").all()
    assert sorted(df.seed) == list(range(12))
    left = listing(fs, f"{BUCKET}/kill/results")
    assert left == sorted([f"{BUCKET}/kill/results/_run.json", *shards]), "no lease or staging left behind"


def test_lease_on_s3_stale_after_its_ttl_held_while_it_beats(s3_env):
    """A lease on an object store, as another host's run left it: taken over once its
    heartbeat is older than its ttl, refused while it is fresh; a holder's heartbeat keeps
    it fresh."""
    fs, root = s3_env, f"{BUCKET}/leased"
    fs.create_dir(root)
    now = time.time()
    dead = LeaseRecord("20260101T000000-aaaaaa", "another-host", 4242, now - 60, now - 60, 5.0)
    with fs.open_output_stream(f"{root}/{LEASE_FILE}") as f:
        f.write(json.dumps(dead.__dict__).encode())
    mine = Lease(fs, root, "20260101T000001-bbbbbb", ttl_s=2.0, local=False)
    assert mine.acquire(f"s3://{root}") == dead
    try:
        first = json.loads(fs.open_input_stream(f"{root}/{LEASE_FILE}").read())["heartbeat_at"]
        wait_for(lambda: json.loads(fs.open_input_stream(f"{root}/{LEASE_FILE}").read())["heartbeat_at"] > first,
                 30, "a heartbeat")
        other = Lease(fs, root, "20260101T000002-cccccc", ttl_s=2.0, local=False)
        with pytest.raises(LeaseHeldError, match="in use by run 20260101T000001-bbbbbb"):
            other.acquire(f"s3://{root}")
        mine.check()
    finally:
        mine.release()
    assert listing(fs, root) == []
