"""The driver stays off the data path (issue 18 item 4): CPU workers PNG-encode and write
staged shards, the driver commits them by path and sample_ids, each sample_id once."""

import io
import json
import os

import pandas as pd
import pytest
import pyarrow.parquet as pq
from PIL import Image

from jobs import benchmark_output
from pipelines.benchmarking.output import actor_blocks, manifest_rows
from pipelines.generation.output import STAGED_COLUMNS, ShardCommitter, stage_shard
from pipelines.generation.plan import plan
from pipelines.storage.results import STAGING_DIR


def test_the_driver_receives_shard_paths_and_ids_not_images(tmp_path, ray_local, capsys):
    out = tmp_path / "results"
    assert benchmark_output.main(["--images", "48", "--size", "128", "--block-rows", "4", "--shard-rows", "16",
                                  "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    png_bytes_per_image = result["mean_png_mb"] * 1e6
    assert png_bytes_per_image > 20_000  # the images are real-sized for 128x128 (they compress to ~50 KB)
    # what reached the driver per image: its share of a shard's path, ids and counts
    assert result["driver_bytes_received_per_image"] < png_bytes_per_image / 50, result
    done = pd.read_parquet(out)
    assert len(done) == 48 and done.sample_id.is_unique and len(list(out.glob("part-*.parquet"))) == 3
    assert Image.open(io.BytesIO(done.image.iloc[0])).size == (128, 128)
    assert done.prompt.iloc[0].startswith("output benchmark")  # joined to its manifest row on the worker
    assert not (out / STAGING_DIR).exists()  # every staged shard was committed


def test_a_shard_staged_twice_is_committed_once(tmp_path):
    """Ray may run a block again (a retried task): a staged shard whose rows are all committed
    is dropped, one that is partly committed is committed with the new rows only."""
    manifest = tmp_path / "m.parquet"
    pd.DataFrame(manifest_rows(12, 16)).to_parquet(manifest)
    p = plan(str(manifest), str(tmp_path / "out"), lease_seconds=60)
    try:
        first, second, _ = actor_blocks(p.todo.column("sample_id").to_pylist(), 16, 4)
        stage = lambda batch: stage_shard(batch, out=p.store.address, todo=p.todo)  # noqa: E731
        staged = [stage(first), stage(first), stage(pd.concat([first.iloc[:2], second]))]
        assert list(staged[0].columns) == list(STAGED_COLUMNS)
        commit = ShardCommitter(p.store, p.lease, p.run_id, p.todo, progress=False)
        for s in staged:
            commit.add(s)
    finally:
        p.lease.release()
    shards = p.store.shard_paths()
    assert len(shards) == 2
    ids = [pq.read_table(s, columns=["sample_id"]).column(0).to_pylist() for s in shards]
    assert sorted(map(len, ids)) == [4, 4] and len(set(ids[0]) | set(ids[1])) == 8
    assert commit.counts["ok"] == 8 and commit.rest().num_rows == 4 and commit.calls.mean() == 4
    assert not os.listdir(tmp_path / "out" / STAGING_DIR)  # the duplicate and the rewritten one are gone


def test_a_staged_shard_the_driver_cannot_see_is_named(tmp_path):
    """A local --out that is not shared storage: a worker on another node staged the shard on
    its own disk, and the driver says what --out must be instead of losing the rows silently."""
    from pipelines.errors import InputError
    from pipelines.storage.results import ResultStore

    store = ResultStore(str(tmp_path / "out"))
    store.create()
    with pytest.raises(InputError, match=r"--out .*not there for the driver.*NFS.*s3://"):
        store.commit_staged(str(tmp_path / "out" / STAGING_DIR / "elsewhere.parquet"), "20261202T000000-abcdef", 0)
    assert not store.shard_paths()
