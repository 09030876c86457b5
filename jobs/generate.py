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
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from any directory
    sys.path.insert(0, str(ROOT))

from jobs.cli import OneLineParser, at_least  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.generation.plan import plan  # noqa: E402
from pipelines.generation.speed import COMPILE_MODES, SpeedOptions, check_fused_loras, check_speed_options  # noqa: E402
from pipelines.storage.lease import DEFAULT_TTL_S  # noqa: E402


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
                   help="NHWC memory layout for UNet and VAE (SD3/FLUX: the VAE; speed only; pixels equal within float "
                        "tolerance)")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="fused query/key/value projections in the UNet or transformer and VAE attention (refused for "
                        "SD 3.5-type transformers; speed only; pixels equal within float tolerance)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the UNet or transformer and the VAE decoder with this mode ("
                        + ", ".join(COMPILE_MODES) + "; default none); the warm-up pays the compile once per actor and model")
    p.add_argument("--pool-size", type=at_least(1, int), default=None, help="generation actors (default: one per GPU, 1 on CPU)")
    p.add_argument("--num-gpus", type=at_least(0), default=None, help="GPUs per actor (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=at_least(0), default=1, help="CPUs Ray reserves per actor (default 1)")
    p.add_argument("--torch-threads", type=at_least(1, int), default=None, help="torch intra-op threads in each CPU actor (default: all cores but one / pool size)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights/activations dtype (auto: the model's half type on GPU, float32 on CPU)")
    p.add_argument("--shard-rows", type=at_least(1, int), default=256,
                   help="rows per result shard, written by a CPU worker once that many images are done (default 256)")
    p.add_argument("--max-retries", type=at_least(0, int), default=3,
                   help="retries of a batch whose actor died (killed, node lost), and new passes over the rest after a "
                        "lost node; actors are always replaced (default 3)")
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


def run_options(args):
    """The flags that change only how the run goes (never pixels)."""
    from jobs.raydata.generation import RunOptions
    return RunOptions(dtype=args.dtype, batch_size=args.batch_size, batching=args.batching, speed=speed_options(args),
                      pool_size=args.pool_size, num_gpus=args.num_gpus, cpus_per_actor=args.cpus_per_actor,
                      torch_threads=args.torch_threads, shard_rows=args.shard_rows,
                      max_retries=args.max_retries, schedule_timeout=args.schedule_timeout,
                      progress=not args.no_progress)


def speed_options(args) -> SpeedOptions:
    return SpeedOptions(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile)


def run(args) -> int:
    from jobs.raydata.generation import new_record, now, run_generation

    p = plan(args.manifest, args.out, model=args.model, models_file=args.models, lease_seconds=args.lease_seconds,
             overwrite=args.overwrite, retry_errors=args.retry_errors, limit=args.limit)
    try:
        models = sorted(set(p.manifest.column("model").to_pylist()))
        speed = speed_options(args)
        check_speed_options(speed, p.registry.with_refiners(models).values())
        check_fused_loras(speed, p.manifest.column("lora").to_pylist())
        record, this_run = new_record(p, args.manifest, dict(vars(args)), _versions())
        if p.todo.num_rows == 0:
            this_run.update(finished_at=now(), ok=0, error=0, shards=0)
            p.store.write_run(record)
            print(f"nothing to do: all {p.manifest.num_rows} rows are already in {args.out}", file=sys.stderr)
            return 0
        return run_generation(p, run_options(args), record, this_run, args.out)
    except InputError:  # found once Ray is up (e.g. the cluster cannot host an actor): nothing was written
        p.abandon()
        raise
    finally:
        p.lease.release()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("diffsweep", "diffusers", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


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
    sys.exit(main())
