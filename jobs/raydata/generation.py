"""The generation run on Ray Data: manifest rows -> an actor pool of generation workers ->
CPU tasks that PNG-encode and write staged shards -> shards committed by the driver, with
one progress bar on the driver. Image bytes stay on the workers (pipelines/generation/output.py).

The plan (pipelines/generation/plan.py) has already validated everything and leased the
results directory; this module only starts the cluster work and commits what comes back.
A failure or Ctrl-C keeps every finished row; a run whose lease was taken over writes
nothing more.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sys
from dataclasses import dataclass, field, replace

from jobs.raydata.session import AttemptCounter, batch_attempts, check_schedulable, init_ray
from pipelines.contract import MANIFEST_COLUMNS
from pipelines.errors import exception_chain, innermost_cause
from pipelines.generation.batch_size import AUTO_CAP, CPU_BATCH_SIZE
from pipelines.generation.blocks import call_blocks
from pipelines.generation.plan import Plan
from pipelines.generation.speed import SpeedOptions
from pipelines.generation.output import ShardCommitter, stage_shard
from pipelines.generation.worker import CALL_ROWS_CONTINUOUS, GenerateActor
from pipelines.storage.lease import LeaseLostError
from pipelines.storage.manifest import object_store_env
from pipelines.validation import check_device


@dataclass
class RunOptions:
    """How to run (speed and cluster knobs: none of them changes pixels)."""

    dtype: str = "auto"
    batch_size: int | str = 8  # or "auto"
    batching: str = "config"
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    pool_size: int | None = None
    num_gpus: float | None = None
    cpus_per_actor: float = 1
    torch_threads: int | None = None
    shard_rows: int = 256
    max_retries: int = 3
    schedule_timeout: float = 600.0
    progress: bool = True


def run_generation(p: Plan, o: RunOptions, record: dict, this_run: dict, out: str) -> int:
    """Generate `p.todo` into `p.store`; returns the job's exit code (0, 1 failed, 130 interrupted)."""
    ray = init_ray(schedule_timeout_s=o.schedule_timeout)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = o.num_gpus if o.num_gpus is not None else (1.0 if gpus else 0.0)
    check_schedulable(ray, num_gpus=num_gpus, num_cpus=o.cpus_per_actor)
    check_device(p.manifest, "cuda" if num_gpus else "cpu", source=f"manifest {record['manifest']}")  # e.g. nf4 on CPU actors
    p.store.write_run(record)
    pool = o.pool_size or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    this_run.update(pool_size=pool, num_gpus_per_actor=num_gpus, ray_version=ray.__version__)
    attempts_name = f"diffsweep-attempts-{p.run_id}"
    attempts = batch_attempts(ray, attempts_name)
    commit = ShardCommitter(p.store, p.lease, p.run_id, p.todo, o.progress)
    try:
        for resubmit in range(o.max_retries + 1):  # a new pass over the rows still to do after a lost node
            rest = replace(p, todo=commit.rest())
            if not rest.todo.num_rows or _drain(ray, _dataset(ray, rest, o, pool, num_gpus, attempts_name), commit,
                                                retry=resubmit < o.max_retries):
                break
            this_run["resubmitted"] = resubmit + 1
    except (Exception, KeyboardInterrupt) as e:  # unrecoverable failure or Ctrl-C: keep what is done
        ray.kill(attempts)
        return _stopped(e, ray, p, o, commit, record, this_run, out, num_gpus)
    commit.progress.close()
    ray.kill(attempts)
    p.store.drop_staging_dir()  # every staged shard is committed (or was a duplicate)
    restarts = _actor_restarts()
    counts = commit.counts
    this_run.update(finished_at=now(), ok=counts["ok"], error=counts["error"], shards=commit.seq,
                    prompts_truncated=counts["truncated"], actor_restarts=restarts, loads=commit.load_records(),
                    mean_batch_size=commit.calls.mean(), driver_bytes_received=commit.received_bytes)
    p.store.write_run(record)
    print(f"done: {counts['ok']} ok, {counts['error']} error, {p.n_done} already in {out} (skipped)"
          + (f", mean batch size {commit.calls.mean():g} (images per diffusers call)" if commit.calls.mean() else "")
          + (f", {restarts} actor restart(s) (their batches were retried)" if restarts else "")
          + (f"; {counts['truncated']} prompt(s) longer than the text encoder reads were truncated"
             if counts["truncated"] else ""), file=sys.stderr)
    return 0


def _drain(ray, ds, commit: ShardCommitter, retry: bool) -> bool:
    """Feed one pass of the pipeline to the committer; True once it is through. Ray Data replaces
    a dead actor and retries its batch by itself, but not always an actor lost with its node
    (ActorUnavailableError), nor blocks whose only copy was on that node: then, if `retry`, the
    shards that arrived stay committed and this returns False, so the caller starts a new pass
    (a new pool on the remaining nodes) over the rest. Other failures are raised."""
    batches = ds.iter_batches(batch_size=None, batch_format="pandas")
    try:
        for batch in batches:
            commit.add(batch)
        return True
    except BaseException as e:
        _close_quietly(batches)  # stop the pipeline now, not whenever the iterator is collected
        if not (retry and isinstance(e, Exception) and _worker_lost(ray, e)):
            raise
        why = innermost_cause(e)
    print(f"warning: a generation worker was lost ({why}); resubmitting the {commit.rest().num_rows} unfinished "
          "rows to a new pool", file=sys.stderr)
    return False


def _worker_lost(ray, e: BaseException) -> bool:
    """Whether `e` (or what it wraps) says a worker, its node or the blocks it held went away:
    a fault of the cluster that a new pass recovers from, not one of the rows or the job. An
    actor that failed in its constructor is not lost but broken (Ray Data already replaced it)."""
    x = ray.exceptions
    return any(isinstance(c, x.RayActorError) and not getattr(c, "actor_init_failed", False)
               or isinstance(c, (x.ObjectLostError, x.NodeDiedError, x.WorkerCrashedError)) for c in exception_chain(e))


def _dataset(ray, p: Plan, o: RunOptions, pool: int, num_gpus: float, attempts_name: str):
    """The Ray Data pipeline. One block per actor call (batch_size=None: a block is one batch,
    never bundled with the next), cut along configurations so that a configuration's rows
    fill whole batches (pipelines/generation/blocks.py); small blocks spread work evenly over
    the pool. Continuous batching gets CALL_ROWS_CONTINUOUS batches' worth per call, so its
    slots stay full (they drain only at the end of each call). Ray Data replaces dead actors
    and retries their batches (its defaults); the run's attempt counter makes a batch that
    keeps killing its actor end as error rows after --max-retries instead of looping forever."""
    rows = p.todo.select(MANIFEST_COLUMNS)
    batch_size = CPU_BATCH_SIZE if o.batch_size == "auto" and not num_gpus else o.batch_size  # no device memory to fit
    actor_batch = None if batch_size == "auto" else batch_size  # None: each actor fits it per model and size
    call_rows = (actor_batch or AUTO_CAP) * (CALL_ROWS_CONTINUOUS if o.batching == "continuous" else 1)
    blocks = call_blocks(rows.to_pandas(), actor_batch or AUTO_CAP, call_rows, by_config=o.batching != "continuous")
    # A CPU actor's torch threads: the node's cores but one (the driver, the raylet and the
    # object store share it) over the pool. One thread more than the free cores makes every
    # intra-op barrier wait for a starved thread: a tiny-random 40-step row on the 2-core VM at
    # load 1.2-2.2 took 1.9-4.7 s with 2 threads and 0.5-0.7 s with 1.
    threads = o.torch_threads or (None if num_gpus else max(1, ((os.cpu_count() or 1) - 1) // pool))
    specs = p.registry.with_refiners(set(p.todo.column("model").to_pylist()))  # refiners load with their base
    return (
        ray.data.from_pandas(blocks)
        .map_batches_internal(  # map_batches refuses batch_size=None with GPUs; Ray's map_groups calls this too
            GenerateActor,
            fn_constructor_kwargs=dict(specs=specs, dtype=o.dtype, batch_size=actor_batch, torch_threads=threads,
                                       batching=o.batching, speed=o.speed.as_dict(), loras=p.registry.loras,
                                       attempts=AttemptCounter(attempts_name), max_attempts=o.max_retries + 1),
            batch_size=None,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=num_gpus,
            num_cpus=o.cpus_per_actor,
        )
        # PNG encoding and the shard write run where the pixels are; the driver gets a row per shard.
        .map_batches(stage_shard, batch_size=o.shard_rows, batch_format="pandas", num_cpus=0.5,
                     fn_kwargs=dict(out=p.store.address, todo=p.todo), **stage_remote_args(p.store.uri))
    )


def stage_remote_args(out: str) -> dict:
    """Ray options of the shard-writing tasks: on an object store, the driver's S3 settings
    (merged into the job's runtime_env), so a job run by hand on a cluster writes there too."""
    env = object_store_env(out)
    return {"runtime_env": {"env_vars": env}} if env else {}


def _stopped(e: BaseException, ray, p: Plan, o: RunOptions, commit: ShardCommitter, record: dict, this_run: dict,
             out: str, num_gpus: float) -> int:
    """After a failure or Ctrl-C: what arrived is committed already; record why (unless the lease
    is lost), say how to resume."""
    lost = isinstance(e, LeaseLostError)
    commit.progress.close()
    reason = "interrupted" if isinstance(e, KeyboardInterrupt) else innermost_cause(e)
    if isinstance(e, ray.exceptions.GetTimeoutError):
        total = ray.cluster_resources()
        reason = (f"the cluster did not start the generation actors within --schedule-timeout "
                  f"{o.schedule_timeout:g} s (each needs {num_gpus:g} GPU, {o.cpus_per_actor:g} CPU; cluster: "
                  + ", ".join(f"{k} {total.get(k, 0):g}" for k in ("CPU", "GPU")) + ")")
    this_run.update(failed_at=now(), ok=commit.counts["ok"], error=commit.counts["error"], shards=commit.seq,
                    failure=reason, loads=commit.load_records(), mean_batch_size=commit.calls.mean())
    if lost:  # the directory is another run's now: write nothing more there
        print(f"error: generation stopped: {reason}; this run's {commit.seq} committed shard(s) stay", file=sys.stderr)
        return 1
    p.store.write_run(record)
    done = len(commit.written)
    print(f"error: generation stopped after {done} of {p.todo.num_rows} rows: {reason}\n"
          f"The {done} finished rows are saved in {out}; re-run the same command to resume.", file=sys.stderr)
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def _close_quietly(iterator) -> None:
    try:
        iterator.close()
    except Exception:  # noqa: BLE001 - shutting down a pipeline that already failed
        pass


def _actor_restarts() -> int | None:
    """How many generation actors Ray had to replace (None if the state API is unavailable)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(GenerateActor))")], detail=True,
                             timeout=5, raise_on_missing_output=False)
        return int(sum(getattr(a, "num_restarts", 0) or 0 for a in actors))
    except Exception:
        return None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_record(p: Plan, manifest_path: str, options: dict, versions: dict) -> tuple[dict, dict]:
    """The results directory's `_run.json` record with this run appended, and this run's entry."""
    record = {"manifest": manifest_path, "manifest_digest": p.digest, "manifest_rows": p.manifest.num_rows,
              "options": options, "versions": versions, "runs": (p.previous or {}).get("runs", [])}
    this_run = {"run_id": p.run_id, "started_at": now(), "host": socket.gethostname(),
                "python": sys.version.split()[0], "todo": p.todo.num_rows, "skipped_done": p.n_done}
    if p.set_aside:
        this_run["set_aside"] = p.set_aside
    record["runs"].append(this_run)
    return record, this_run
