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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from any directory
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.batch_size import AUTO_CAP, CPU_BATCH_SIZE, BatchSizes  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.manifest import read_manifest  # noqa: E402
from pipelines.models import ModelRegistry, check_available  # noqa: E402
from pipelines.results import ResultStore, new_run_id  # noqa: E402
from pipelines.speed import COMPILE_MODES, SpeedOptions, apply_speed_options  # noqa: E402
from pipelines.schema import MANIFEST_COLUMNS, RESULT_SCHEMA, manifest_digest, order_by_run_key, validate_manifest  # noqa: E402

# What travels from the actors to the driver: the id plus the result columns (raw pixels
# until the PNG stage). The driver joins it back to the manifest row, extras included.
RESULT_ONLY = [f.name for f in RESULT_SCHEMA]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/generate.py", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--pool-size", type=int, default=None, help="generation actors (default: one per GPU, 1 on CPU)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs Ray reserves per actor (default 1)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads in each CPU actor (default: all cores / pool size)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights/activations dtype (auto: the model's half type on GPU, float32 on CPU)")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per committed result shard (default 256)")
    p.add_argument("--flush-seconds", type=float, default=60.0, help="commit a partial shard after this long (default 60)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="retries of a batch whose actor died (killed, node lost); actors are always replaced (default 3)")
    p.add_argument("--overwrite", action="store_true", help="discard existing results in --out")
    p.add_argument("--retry-errors", action="store_true",
                   help="when resuming, generate again the rows recorded with status 'error'")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows still to do (for a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag in ("shard_rows", "pool_size", "limit", "torch_threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
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
                 batching: str = "config", speed: dict | None = None):
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
        import diffusers

        self.versions = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__}

    def _model(self, name: str):
        from pipelines.models import load_model

        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        while len(self.models) >= self.cache_size:
            evicted, _ = self.models.popitem(last=False)
            self.text_caches.pop(evicted, None)
            self.batch_sizes.pop(evicted, None)
        from pipelines.generate import warm_up

        model = load_model(self.specs[name], self.device, self.dtype)
        apply_speed_options(model.pipe, self.speed)
        warm_up(model)  # also pays torch.compile, if on
        self.models[name] = model
        self.batch_sizes[name] = BatchSizes(model, self.batch_size)
        return model

    def _generate(self, name: str, model, rows: list[dict]):
        if self.batching == "continuous":
            from pipelines.continuous import TextCache, generate_mixed

            return generate_mixed(model, rows, self.batch_sizes[name], self.text_caches.setdefault(name, TextCache()))
        from pipelines.generate import generate

        return generate(model, rows, self.batch_sizes[name])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for name, part in batch.groupby("model", sort=False):
            model = self._model(name)
            rows = part.to_dict("records")
            now = dt.datetime.now(dt.timezone.utc)  # batch start: jobs/benchmark.py measures start-up from it
            for res in self._generate(name, model, rows):
                out.append({
                    "sample_id": res.sample_id,
                    "pixels": None if res.pixels is None else res.pixels.tobytes(),
                    "status": res.status,
                    "error": res.error,
                    "prompt_truncated": res.prompt_truncated,
                    "gen_seconds": res.gen_seconds,
                    "batch_size": res.batch_size,
                    "worker": self.worker,
                    "device": f"{self.device}:{self.device_name}",
                    "dtype": model.dtype,
                    "model_digest": model.digest,
                    "created_at": now,
                    **self.versions,
                })
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


def plan(args) -> tuple:
    """Everything that can fail on bad input, done before Ray starts or anything is written."""
    registry = ModelRegistry.with_user_file(args.models)
    if args.model is not None and args.model not in registry:
        raise InputError(f"--model {args.model!r}: not a registered model; registered: {', '.join(registry.names())}")
    manifest = validate_manifest(read_manifest(args.manifest), registry, args.model, source=f"manifest {args.manifest}")
    for name in set(manifest.column("model").to_pylist()):
        check_available(registry.get(name))
    digest = manifest_digest(manifest)
    store = ResultStore(args.out)
    previous = store.prepare(digest, args.overwrite)
    if previous is not None and args.retry_errors:
        store.drop_errors()
    done = store.done_ids() if previous is not None else set()
    ids = manifest.column("sample_id").to_pylist()
    todo_mask = pa.array([sid not in done for sid in ids])
    todo = order_by_run_key(manifest.filter(todo_mask))
    if args.limit is not None:
        todo = todo.slice(0, args.limit)
    return manifest, registry, store, previous, len(done), digest, todo


def run(args) -> int:
    manifest, registry, store, previous, n_done, digest, todo = plan(args)
    run_id = new_run_id()
    record = {
        "manifest": args.manifest,
        "manifest_digest": digest,
        "manifest_rows": manifest.num_rows,
        "options": {k: v for k, v in vars(args).items()},
        "versions": _versions(),
        "runs": (previous or {}).get("runs", []),
    }
    this_run = {"run_id": run_id, "started_at": _now(), "host": socket.gethostname(), "python": sys.version.split()[0],
                "todo": todo.num_rows, "skipped_done": n_done}
    record["runs"].append(this_run)
    store.write_run(record)
    if todo.num_rows == 0:
        print(f"nothing to do: all {manifest.num_rows} rows are already in {args.out}", file=sys.stderr)
        return 0

    from jobs.ray_session import init_ray

    ray = init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if gpus else 0.0)
    pool = args.pool_size or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    threads = args.torch_threads or (None if num_gpus else max(1, (os.cpu_count() or 1) // pool))
    specs = {name: registry.get(name) for name in set(todo.column("model").to_pylist())}
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
    ds = (
        ray.data.from_pandas(blocks)
        .map_batches(
            GenerateActor,
            fn_constructor_kwargs=dict(specs=specs, dtype=args.dtype, batch_size=actor_batch, torch_threads=threads,
                                       batching=args.batching, speed=speed_options(args).as_dict()),
            batch_size=call_rows,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_gpus=num_gpus,
            num_cpus=args.cpus_per_actor,
            # Dead actors are always replaced; a batch is retried a bounded number of times.
            # (Passed as ray_remote_args, which Ray 2.60 marks deprecated without a named
            # replacement for these two yet.)
            max_restarts=-1,
            max_task_retries=args.max_retries,
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
            store.commit_shard(pa.concat_tables(pending), run_id, seq)
            seq += 1
            pending.clear()
        last_flush = time.monotonic()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
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
    except (Exception, KeyboardInterrupt) as e:  # unrecoverable worker failure or Ctrl-C: keep what is done
        flush()
        progress.close()
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else _one_line(e)
        this_run.update(failed_at=_now(), ok=counts["ok"], error=counts["error"], shards=seq, failure=reason)
        store.write_run(record)
        print(f"error: generation stopped after {len(written)} of {todo.num_rows} rows: {reason}\n"
              f"The {len(written)} finished rows are saved in {args.out}; re-run the same command to resume.",
              file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    flush()
    progress.close()
    restarts = _actor_restarts()
    this_run.update(finished_at=_now(), ok=counts["ok"], error=counts["error"], shards=seq,
                    prompts_truncated=counts["truncated"], actor_restarts=restarts)
    store.write_run(record)
    print(f"done: {counts['ok']} ok, {counts['error']} error, {n_done} already in {args.out} (skipped)"
          + (f", {restarts} actor restart(s) (their batches were retried)" if restarts else "")
          + (f"; {counts['truncated']} prompt(s) longer than the text encoder reads were truncated" if counts["truncated"] else ""),
          file=sys.stderr)
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("diffsweep", "diffusers", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _one_line(e: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) exception, on one line."""
    cause = getattr(e, "cause", None) or e.__cause__ or e
    text = f"{type(cause).__name__}: {cause}"
    return " ".join(text.split())[:500]


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
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from jobs.generate import main as _main  # importable name, so Ray workers can load GenerateActor

    sys.exit(_main())
