#!/usr/bin/env python
"""Generate one image per manifest row on a Ray cluster, or on a local Ray.

    python jobs/generate.py manifest.parquet --out results/
    ray job submit --working-dir . -- python jobs/generate.py manifest.parquet --out results/

manifest -> validate on the driver (nothing runs or is written if a row is bad)
-> skip sample_ids already in --out -> order by run key -> Ray Data actor pool
(each actor loads a model once, runs diffusers) -> PNG encoding on CPU tasks
-> committed Parquet shards in --out, plus _run.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import socket
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from any directory
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.generation.batch_size import AUTO_CAP, CPU_BATCH_SIZE, BatchSizes  # noqa: E402
from jobs.cli import OneLineParser, at_least  # noqa: E402
from pipelines.errors import InputError, one_line  # noqa: E402
from pipelines.storage.lease import DEFAULT_TTL_S, Lease, LeaseLostError  # noqa: E402
from pipelines.storage.manifest import read_manifest  # noqa: E402
from pipelines.registry.models import ModelRegistry, check_available  # noqa: E402
from pipelines.storage.results import ResultStore, check_out_location, new_run_id  # noqa: E402
from pipelines.generation.speed import COMPILE_MODES, SpeedOptions, apply_speed_options  # noqa: E402
from pipelines.contract import MANIFEST_COLUMNS, RESULT_SCHEMA  # noqa: E402
from pipelines.schema import manifest_digest, order_by_run_key, validate_manifest  # noqa: E402

# What travels from the actors to the driver: the id plus the result columns (raw pixels
# until the PNG stage). The driver joins it back to the manifest row, extras included.
RESULT_ONLY = [f.name for f in RESULT_SCHEMA]


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="jobs/generate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="Parquet file, directory of Parquet files, or s3:// / gs:// URI")
    p.add_argument("--out", required=True, help="results directory (local path or object-store URI)")
    p.add_argument("--model", default=None, help="model for rows without one (default: embedded)")
    p.add_argument("--models", default=None, metavar="FILE", help="YAML file of extra models (name -> source, defaults)")
    p.add_argument("--batch-size", type=_batch_size, default=8, metavar="N|auto",
                   help="images per diffusers call (default 8); auto: fitted to the GPU's free memory per model and "
                        "image size (8 on CPU). Any batch that runs out of memory is halved and retried")
    p.add_argument("--batching", default="config", choices=["config", "continuous"],
                   help="config: one diffusers call per (scheduler, steps, guidance, size) group (default); "
                        "continuous: rows of different scheduler/steps/guidance share UNet calls and a finished "
                        "row's slot goes to the next row (Stable Diffusion 1.x/2.x-type pipelines; others use config)")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout for UNet and VAE (speed only; pixels equal within float tolerance)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="fused query/key/value projections in UNet and VAE attention (speed only; pixels equal within "
                        "float tolerance)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile UNet and VAE decoder with this mode (" + ", ".join(COMPILE_MODES)
                        + "; default none); the warm-up pays the compile once per actor and model")
    p.add_argument("--pool-size", type=at_least(1, int), default=None, help="generation actors (default: one per GPU, 1 on CPU)")
    p.add_argument("--num-gpus", type=at_least(0), default=None, help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=at_least(0), default=1, help="CPUs Ray reserves per actor (default 1)")
    p.add_argument("--torch-threads", type=at_least(1, int), default=None, help="torch intra-op threads in each CPU actor (default: all cores / pool size)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights/activations dtype (auto: the model's half type on GPU, float32 on CPU)")
    p.add_argument("--shard-rows", type=at_least(1, int), default=256, help="rows per committed result shard (default 256)")
    p.add_argument("--flush-seconds", type=at_least(0, strict=True), default=60.0, help="commit a partial shard after this long (default 60)")
    p.add_argument("--max-retries", type=at_least(0, int), default=3,
                   help="retries of a batch whose actor died (killed, node lost); actors are always replaced (default 3)")
    p.add_argument("--overwrite", action="store_true", help="discard existing results in --out")
    p.add_argument("--retry-errors", action="store_true",
                   help="when resuming, generate again the rows recorded with status 'error'")
    p.add_argument("--limit", type=at_least(1, int), default=None, help="only the first N rows still to do (for a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lease-seconds", type=at_least(1), default=DEFAULT_TTL_S,
                   help="a run holds --out with a lease renewed every quarter of this; another run may take it over "
                        f"after this long without renewal (default {DEFAULT_TTL_S:.0f})")
    p.add_argument("--schedule-timeout", type=at_least(1), default=600.0,
                   help="seconds to wait for the cluster to start the generation actors before giving up (default 600)")
    args = p.parse_args(argv)
    if not args.out or not args.out.strip():
        p.error("--out: expected a results directory or object-store URI, got an empty string")
    return args


CALL_ROWS_CONTINUOUS = 4  # rows per actor call = this x --batch-size with --batching continuous


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'auto', got {n}")
    return n


def speed_options(args) -> SpeedOptions:
    return SpeedOptions(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile)


class GenerateActor:
    """Holds loaded pipelines (a small LRU cache) and turns manifest rows into pixels."""

    def __init__(self, specs: dict, dtype: str, batch_size: int | None, torch_threads: int | None, cache_size: int = 2,
                 batching: str = "config", speed: dict | None = None, attempts: str | None = None,
                 max_attempts: int | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.specs, self.dtype, self.batch_size, self.cache_size = specs, dtype, batch_size, cache_size
        self.batching = batching
        self.speed = SpeedOptions(**(speed or {}))
        self.text_caches: dict = {}  # model name -> prompt embeddings (continuous batching)
        self.batch_sizes: dict = {}  # model name -> BatchSizes (None: fitted to free memory)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else platform.processor() or "cpu"
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.models: OrderedDict = OrderedDict()
        self.load_failures: dict[str, str] = {}  # model name -> why it cannot load here (its rows become errors)
        self.attempts, self.max_attempts = attempts, max_attempts
        import diffusers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # the driver draws the one progress bar
        transformers_logging.disable_progress_bar()
        self.versions = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__}

    def _model(self, name: str):
        from pipelines.registry.models import load_model

        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        while len(self.models) >= self.cache_size:
            evicted, _ = self.models.popitem(last=False)
            self.text_caches.pop(evicted, None)
            self.batch_sizes.pop(evicted, None)
        from pipelines.generation.grouped import warm_up

        model = load_model(self.specs[name], self.device, self.dtype)
        apply_speed_options(model.pipe, self.speed)
        warm_up(model)  # also pays torch.compile, if on
        self.models[name] = model
        self.batch_sizes[name] = BatchSizes(model, self.batch_size)
        return model

    def _generate(self, name: str, model, rows: list[dict]):
        if self.batching == "continuous":
            from pipelines.generation.continuous import TextCache, generate_mixed

            return generate_mixed(model, rows, self.batch_sizes[name], self.text_caches.setdefault(name, TextCache()))
        from pipelines.generation.grouped import generate

        return generate(model, rows, self.batch_sizes[name])

    def _row(self, created_at, **fields) -> dict:
        """One result row: `fields` (sample_id, pixels, status, ...) plus where and how it ran."""
        return {**fields, "worker": self.worker, "device": f"{self.device}:{self.device_name}",
                "created_at": created_at, **self.versions}

    def _failed_rows(self, part: pd.DataFrame, message: str) -> list[dict]:
        now = dt.datetime.now(dt.timezone.utc)
        return [self._row(now, sample_id=sid, pixels=None, status="error", error=message, prompt_truncated=False,
                          gen_seconds=0.0, batch_size=0, dtype=None, model_digest=None)
                for sid in part["sample_id"]]

    def _attempt(self, batch: pd.DataFrame) -> int:
        """Which attempt at this batch this is (1 = first), counted across actor restarts by the
        run's BatchAttempts actor; 0 when not counted (in-process use, e.g. the benchmark)."""
        if not self.attempts:
            return 0
        import ray

        return ray.get(ray.get_actor(self.attempts).start.remote(batch_key(batch["sample_id"])))

    def _model_rows(self, name: str, part: pd.DataFrame) -> list[dict]:
        """The result rows of one model's part of a batch; error rows if the model cannot load here."""
        if name not in self.load_failures:
            try:
                model = self._model(name)
            except Exception as e:  # noqa: BLE001 - a model that cannot load here: its rows end as error rows
                self.load_failures[name] = f"model {name!r} could not be loaded on {self.worker}: {innermost_cause(e)}"
        if name in self.load_failures:
            return self._failed_rows(part, self.load_failures[name])
        now = dt.datetime.now(dt.timezone.utc)  # batch start: jobs/benchmark.py measures start-up from it
        return [self._row(now, sample_id=res.sample_id, pixels=None if res.pixels is None else res.pixels.tobytes(),
                          status=res.status, error=res.error, prompt_truncated=res.prompt_truncated,
                          gen_seconds=res.gen_seconds, batch_size=res.batch_size, dtype=model.dtype,
                          model_digest=model.digest)
                for res in self._generate(name, model, part.to_dict("records"))]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        attempt = self._attempt(batch)
        if self.max_attempts and attempt > self.max_attempts:  # the previous attempts killed their actors
            out = self._failed_rows(batch, f"the worker died {attempt - 1} times running this batch of {len(batch)} "
                                           f"row(s) (killed, out of host memory, or crashed); --max-retries "
                                           f"{self.max_attempts - 1} exhausted")
        else:
            out = [row for name, part in batch.groupby("model", sort=False) for row in self._model_rows(name, part)]
        sizes = batch.set_index("sample_id")[["height", "width"]]
        return pd.DataFrame(out).join(sizes, on="sample_id")


def encode_pngs(batch: pd.DataFrame) -> pd.DataFrame:
    """Raw pixels -> PNG bytes; runs in CPU tasks, off the GPU actors' critical path."""
    import io

    from PIL import Image

    images = []
    for raw, h, w in zip(batch["pixels"], batch["height"], batch["width"]):
        if not isinstance(raw, (bytes, bytearray, memoryview)):  # an error row (None, or NaN after pandas)
            images.append(None)
            continue
        arr = np.frombuffer(raw, dtype=np.uint8).reshape(int(h), int(w), 3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
        images.append(buf.getvalue())
    batch = batch.drop(columns=["pixels", "height", "width"])
    batch.insert(1, "image", images)
    return batch


@dataclass
class Plan:
    """A validated manifest, and the results directory it will go to (leased to this run)."""

    manifest: pa.Table
    registry: ModelRegistry
    store: ResultStore
    lease: Lease
    run_id: str
    previous: dict | None
    n_done: int
    digest: str
    todo: pa.Table
    set_aside: list[str]
    created: bool  # --out did not exist before this run


def plan(args) -> Plan:
    """Everything that can fail on bad input, done before Ray starts or anything is written;
    then the lease on --out, and what is already there."""
    registry = ModelRegistry.with_user_file(args.models)
    if args.model is not None and args.model not in registry:
        raise InputError(f"--model {args.model!r}: not a registered model; registered: {', '.join(registry.names())}")
    manifest = validate_manifest(read_manifest(args.manifest), registry, args.model, source=f"manifest {args.manifest}")
    for name in sorted(set(manifest.column("model").to_pylist())):
        check_available(registry.get(name))
    digest = manifest_digest(manifest)
    store = ResultStore(args.out)
    check_out_location(store, args.manifest)
    created = store.create()
    run_id = new_run_id()
    lease = Lease(store.fs, store.root, run_id, ttl_s=args.lease_seconds, local=store.local)
    taken_over = lease.acquire(args.out)
    try:
        if taken_over is not None:
            print(f"warning: --out {args.out}: took over the lease of {taken_over.describe(time.time())} "
                  "(that run is gone)", file=sys.stderr)
        previous = store.prepare(digest, args.overwrite)
        scan = store.scan()
        if previous is not None:
            done, bad = store.read_committed(scan)
        else:  # a fresh start (--overwrite kept what diffsweep did not write): nothing there is this manifest's
            done, bad = set(), scan.bad + [(path, "left by --overwrite: not written by diffsweep") for path in scan.good]
        moved = store.quarantine([p for p, _ in bad] + scan.foreign)
        why = dict(bad)
        for src, dst in zip([p for p, _ in bad] + scan.foreign, moved):
            print(f"warning: --out {args.out}: set aside {src.rsplit('/', 1)[-1]} "
                  f"({why.get(src, 'not a results shard: readers of the directory would fail on it')}) -> {dst}",
                  file=sys.stderr)
        if previous is not None and args.retry_errors:
            store.drop_errors()
            done, _ = store.read_committed()
    except BaseException:
        _abandon(lease, store, created)
        raise
    ids = manifest.column("sample_id").to_pylist()
    todo = order_by_run_key(manifest.filter(pa.array([sid not in done for sid in ids])))
    if args.limit is not None:
        todo = todo.slice(0, args.limit)
    n_done = sum(1 for sid in ids if sid in done)
    return Plan(manifest, registry, store, lease, run_id, previous, n_done, digest, todo, moved, created)


def run(args) -> int:
    p = plan(args)
    try:
        return _run(args, p)
    except InputError:  # found once Ray is up (e.g. the cluster cannot host an actor): nothing was written
        _abandon(p.lease, p.store, p.created)
        raise
    finally:
        p.lease.release()


def _abandon(lease: Lease, store: ResultStore, created: bool) -> None:
    """Give --out back as it was found: the lease released and, if this run created the
    directory, the directory removed (it holds nothing but what the lease left)."""
    lease.release()
    if created:
        store.remove_if_empty()


def _run(args, p: Plan) -> int:
    manifest, store, todo, run_id = p.manifest, p.store, p.todo, p.run_id
    record = {
        "manifest": args.manifest,
        "manifest_digest": p.digest,
        "manifest_rows": manifest.num_rows,
        "options": {k: v for k, v in vars(args).items()},
        "versions": _versions(),
        "runs": (p.previous or {}).get("runs", []),
    }
    this_run = {"run_id": run_id, "started_at": _now(), "host": socket.gethostname(), "python": sys.version.split()[0],
                "todo": todo.num_rows, "skipped_done": p.n_done}
    if p.set_aside:
        this_run["set_aside"] = p.set_aside
    record["runs"].append(this_run)
    if todo.num_rows == 0:
        this_run.update(finished_at=_now(), ok=0, error=0, shards=0)
        store.write_run(record)
        print(f"nothing to do: all {manifest.num_rows} rows are already in {args.out}", file=sys.stderr)
        return 0

    from jobs.raydata.session import batch_attempts, check_schedulable, init_ray

    ray = init_ray(schedule_timeout_s=args.schedule_timeout)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus else 0.0)
    check_schedulable(ray, num_gpus=num_gpus, num_cpus=args.cpus_per_actor)
    store.write_run(record)
    pool = args.pool_size or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    threads = args.torch_threads or (None if num_gpus else max(1, (os.cpu_count() or 1) // pool))
    specs = {name: p.registry.get(name) for name in set(todo.column("model").to_pylist())}
    this_run.update(pool_size=pool, num_gpus_per_actor=num_gpus, ray_version=ray.__version__)

    # One block per actor call: small blocks spread work evenly over the pool. Continuous
    # batching gets CALL_ROWS_CONTINUOUS batches' worth per call, so its slots stay full
    # (they drain only at the end of each call).
    rows = todo.select(MANIFEST_COLUMNS)
    batch_size = args.batch_size
    if batch_size == "auto" and not num_gpus:
        batch_size = CPU_BATCH_SIZE  # no device memory to fit to
    actor_batch = None if batch_size == "auto" else batch_size  # None: each actor fits it per model and size
    call_rows = (actor_batch or AUTO_CAP) * (CALL_ROWS_CONTINUOUS if args.batching == "continuous" else 1)
    blocks = [rows.slice(i, call_rows).to_pandas() for i in range(0, rows.num_rows, call_rows)]
    # Ray Data replaces dead actors and retries their batches (its defaults); the run's
    # BatchAttempts actor counts attempts per batch, so a batch that keeps killing its actor
    # ends as error rows after --max-retries instead of looping forever.
    attempts_name = f"diffsweep-attempts-{run_id}"
    attempts = batch_attempts(ray, attempts_name)
    ds = (
        ray.data.from_pandas(blocks)
        .map_batches(
            GenerateActor,
            fn_constructor_kwargs=dict(specs=specs, dtype=args.dtype, batch_size=actor_batch, torch_threads=threads,
                                       batching=args.batching, speed=speed_options(args).as_dict(),
                                       attempts=attempts_name, max_attempts=args.max_retries + 1),
            batch_size=call_rows,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=num_gpus,
            num_cpus=args.cpus_per_actor,
        )
        .map_batches(encode_pngs, batch_format="pandas", num_cpus=0.5)
    )
    counts = {"ok": 0, "error": 0, "truncated": 0}
    position = {sid: i for i, sid in enumerate(manifest.column("sample_id").to_pylist())}
    written: set[str] = set()  # a row reaches the output once, even if Ray hands it over twice
    progress = _progress(todo.num_rows, args.no_progress)
    pending: list[pa.Table] = []
    seq, last_flush = 0, time.monotonic()

    def flush():
        nonlocal seq, last_flush
        if pending:
            p.lease.check()  # never commit after another run took the directory over
            store.commit_shard(pa.concat_tables(pending), run_id, seq)
            seq += 1
            pending.clear()
        last_flush = time.monotonic()

    batches = ds.iter_batches(batch_size=None, batch_format="pandas")
    try:
        for batch in batches:
            batch = batch[~batch["sample_id"].isin(written)]
            written.update(batch["sample_id"])
            pending.append(_result_table(manifest, position, batch))
            for status in batch["status"]:
                counts[status] = counts.get(status, 0) + 1
            counts["truncated"] += int(batch["prompt_truncated"].sum())
            progress.update(len(batch))
            progress.set_postfix(errors=counts["error"], refresh=False)
            if sum(t.num_rows for t in pending) >= args.shard_rows or time.monotonic() - last_flush > args.flush_seconds:
                flush()
        flush()
    except (Exception, KeyboardInterrupt) as e:  # unrecoverable failure or Ctrl-C: keep what is done
        _close_quietly(batches)  # stop the pipeline now, not whenever the iterator is collected
        ray.kill(attempts)
        lost = isinstance(e, LeaseLostError)
        if not lost:
            try:
                flush()
            except LeaseLostError as le:
                e, lost = le, True
        progress.close()
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else innermost_cause(e)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            reason = (f"the cluster did not start the generation actors within --schedule-timeout "
                      f"{args.schedule_timeout:g} s (each needs {num_gpus:g} GPU, {args.cpus_per_actor:g} CPU; "
                      f"cluster: {_resources(ray)})")
        this_run.update(failed_at=_now(), ok=counts["ok"], error=counts["error"], shards=seq, failure=reason)
        if lost:  # the directory is another run's now: write nothing more there
            print(f"error: generation stopped: {reason}; this run's {seq} committed shard(s) stay", file=sys.stderr)
            return 1
        store.write_run(record)
        print(f"error: generation stopped after {len(written)} of {todo.num_rows} rows: {reason}\n"
              f"The {len(written)} finished rows are saved in {args.out}; re-run the same command to resume.",
              file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    progress.close()
    ray.kill(attempts)
    restarts = _actor_restarts()
    this_run.update(finished_at=_now(), ok=counts["ok"], error=counts["error"], shards=seq,
                    prompts_truncated=counts["truncated"], actor_restarts=restarts)
    store.write_run(record)
    print(f"done: {counts['ok']} ok, {counts['error']} error, {p.n_done} already in {args.out} (skipped)"
          + (f", {restarts} actor restart(s) (their batches were retried)" if restarts else "")
          + (f"; {counts['truncated']} prompt(s) longer than the text encoder reads were truncated" if counts["truncated"] else ""),
          file=sys.stderr)
    return 0


def _close_quietly(iterator) -> None:
    try:
        iterator.close()
    except Exception:  # noqa: BLE001 - shutting down a pipeline that already failed
        pass


def _resources(ray) -> str:
    total = ray.cluster_resources()
    return ", ".join(f"{k} {total.get(k, 0):g}" for k in ("CPU", "GPU"))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("diffsweep", "diffusers", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def innermost_cause(e: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) exception, on one line."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    text = f"{type(e).__name__}: {e}"
    if "RayTaskError" in type(e).__name__ or "UserCodeException" in type(e).__name__:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]  # the traceback's last line is the cause
        text = lines[-1] if lines else text
    return one_line(text, 500)


def batch_key(sample_ids) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()[:16]


def _actor_restarts() -> int | None:
    """How many generation actors Ray had to replace (None if the state API is unavailable)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("class_name", "=", "MapWorker(MapBatches(GenerateActor))")], detail=True, timeout=5,
                             raise_on_missing_output=False)
        return int(sum(getattr(a, "num_restarts", 0) or 0 for a in actors))
    except Exception:
        return None


def _result_table(manifest: pa.Table, position: dict, batch: pd.DataFrame) -> pa.Table:
    rows = manifest.take(pa.array([position[sid] for sid in batch["sample_id"]], type=pa.int64()))
    results = pa.Table.from_pandas(batch[RESULT_ONLY], schema=RESULT_SCHEMA, preserve_index=False)
    for field in RESULT_SCHEMA:
        rows = rows.append_column(field, results.column(field.name))
    return rows.replace_schema_metadata(None)


def _progress(total: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="generate", disable=disabled, dynamic_ncols=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def main(argv=None) -> int:
    args = parse_args(argv)
    # The driver imports pipeline classes to check models; their import-time notes (e.g.
    # "requires torchvision, falling back") are not the user's business.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from jobs.generate import main as _main  # importable name, so Ray workers can load GenerateActor

    sys.exit(_main())
