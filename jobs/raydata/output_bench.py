"""The output stage's ceiling on Ray (see pipelines/benchmarking/output.py): pre-made actor
results -> the job's output stage (CPU workers PNG-encode and stage shards, the driver
commits them) -> committed shards, timed on the driver.

Driver CPU seconds are the driver process's CPU time (all its threads: Ray Data's
streaming executor runs there too) from the first block to the last commit, so they are
what one driver pays per image however many GPUs feed it.
"""

from __future__ import annotations

import time

from jobs.raydata.generation import RunOptions, stage_remote_args
from jobs.raydata.session import init_ray
from pipelines.benchmarking.output import actor_blocks, summary
from pipelines.generation.output import ShardCommitter, stage_shard
from pipelines.generation.plan import Plan


def run_output_stage(p: Plan, o: RunOptions, size: int, block_rows: int) -> dict:
    """Push every row of `p.todo` through the output stage as fast as it goes."""
    import ray

    init_ray()  # without RAY_ADDRESS a local Ray of its own, as the jobs
    blocks = actor_blocks(p.todo.column("sample_id").to_pylist(), size, block_rows)
    ds = ray.data.from_pandas(blocks).map_batches(stage_shard, batch_size=o.shard_rows, batch_format="pandas",
                                                  num_cpus=0.5, fn_kwargs=dict(out=p.store.address, todo=p.todo),
                                                  **stage_remote_args(p.store.uri))
    commit = ShardCommitter(p.store, p.lease, p.run_id, p.todo, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        commit.add(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    commit.progress.close()
    p.store.drop_staging_dir()
    return {**summary(p.todo.num_rows, wall, cpu, commit.image_bytes),
            "driver_bytes_received_per_image": round(commit.received_bytes / p.todo.num_rows)}
