"""Object storage end to end: manifest and results on a real S3 API (moto's standalone
server on 127.0.0.1), configured the way users configure pyarrow: AWS_ENDPOINT_URL and
credentials in the environment, plain s3:// URIs on the command line."""

import io
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import generate as gen_job
from tests.conftest import free_port

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


def test_generate_round_trip_and_resume_on_s3(s3_env, ray_local):
    fs = s3_env
    rows = [dict(prompt=p, seed=s, model="tiny-random", steps=2, height=32, width=32)
            for p in ["a red circle", "a blue square"] for s in [1, 2, 3]]
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), f"{BUCKET}/m.parquet", filesystem=fs)
    args = [f"s3://{BUCKET}/m.parquet", "--out", f"s3://{BUCKET}/results/", "--no-progress"]

    assert gen_job.main(args) == 0
    shards = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results"))
                    if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    assert shards
    df = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in shards]).to_pandas()
    assert len(df) == 6 and df.sample_id.is_unique, df.sample_id.tolist()
    assert (df.status == "ok").all(), df.error.dropna().unique()
    for png in df.image:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(png)).size == (32, 32)

    assert gen_job.main(args) == 0  # the same command again: resumes with nothing to do
    again = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results"))
                   if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    assert again == shards
    with fs.open_input_stream(f"{BUCKET}/results/_run.json") as f:
        run = json.loads(f.read().decode())
    assert [r["todo"] for r in run["runs"]] == [6, 0] and run["runs"][-1]["skipped_done"] == 6
    left = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/results", recursive=True)))
    assert left == [f"{BUCKET}/results/_run.json", *again]  # no lease or staging left behind
    total = sum(pq.read_metadata(p, filesystem=fs).num_rows for p in again)
    assert total == 6
