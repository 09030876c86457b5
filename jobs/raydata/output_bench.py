"""The output stage's ceiling on Ray (see pipelines/benchmarking/output.py): pre-made actor
results -> the job's output stage -> committed shards, timed on the driver.

Driver CPU seconds are the driver process's CPU time (all its threads: Ray Data's
streaming executor runs there too) from the first block to the last commit, so they are
what one driver pays per image however many GPUs feed it.
"""

from __future__ import annotations

import time

from jobs.raydata.generation import RunOptions, ShardCommitter
from jobs.raydata.session import init_ray
from pipelines.benchmarking.output import actor_blocks, summary
from pipelines.generation.plan import Plan
from pipelines.generation.worker import encode_pngs


def run_output_stage(p: Plan, o: RunOptions, size: int, block_rows: int) -> dict:
    """Push every row of `p.todo` through the output stage as fast as it goes."""
    import ray

    init_ray()  # without RAY_ADDRESS a local Ray of its own, as the jobs
    blocks = actor_blocks(p.todo.column("sample_id").to_pylist(), size, block_rows)
    ds = ray.data.from_pandas(blocks).map_batches(encode_pngs, batch_format="pandas", num_cpus=0.5)
    commit = ShardCommitter(p, o.shard_rows, o.flush_seconds, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        commit.add(batch)
    commit.flush()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    commit.progress.close()
    png_bytes = sum(pq_bytes(p.store.fs, path) for path in p.store.shard_paths())
    return summary(p.todo.num_rows, wall, cpu, png_bytes)


def pq_bytes(fs, path: str) -> int:
    import pyarrow.parquet as pq

    image = pq.read_table(path, columns=["image"], filesystem=fs).column(0)
    return sum(len(b) for b in image.to_pylist() if b)
