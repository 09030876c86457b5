"""The throughput suite: per model and batch size, time each path on the same rows and
turn the measurements into records (images/s, MFU, peak memory, pixel verdict, ...).

Each path loads its own copy of the model and frees it before the next, so its peak
memory is its own. The Ray Data path is handed in by the job (jobs/raydata/benchmark.py's
RayJobPath: `start()`, `time(...)`), since nothing in pipelines/ imports ray.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from pipelines.benchmarking import environment
from pipelines.benchmarking.actor import time_actor
from pipelines.benchmarking.busy import busy_fields
from pipelines.benchmarking.flops import count_flops, mean_flops_per_image, peak_tflops
from pipelines.benchmarking.memory import free
from pipelines.benchmarking.models import pipe_for_flops, resolve_models
from pipelines.benchmarking.pixels import max_pixel_diff, pixels_match, reference_fields
from pipelines.benchmarking.plain import float32_reference, time_plain
from pipelines.benchmarking.rows import make_rows, row_count, schedulers_used, summary_row
from pipelines.generation.speed import SpeedOptions

PATHS = ("plain", "actor", "ray")


def run_throughput(args, ray_job=None) -> tuple[list[dict], dict]:
    """Records of every (model, batch size, path, batching) and the run's environment.
    `args`: jobs/benchmark.py's parsed flags; `ray_job`: the Ray Data path, needed if
    args.paths names "ray"."""
    _quiet_progress_bars()
    device, device_name = environment.device()
    work_dir = Path(args.work_dir) if args.work_dir else Path(args.out) / "_work"
    batches = args.batch_sizes or ([1, 4, 16] if device == "cuda" else [1, 4])
    models = resolve_models(args.model, args.models, args.dtype, work_dir, device,
                            SpeedOptions(**speed_options(args)))
    env = environment.describe(args, device, device_name, with_ray="ray" in args.paths)
    for spec, _, _ in models.values():
        make_rows(spec, args, 1)  # bad flags (scheduler, size, steps) fail here, before Ray starts
    if "ray" in args.paths:
        if ray_job is None:
            raise ValueError("the ray path needs the Ray Data job path (jobs/raydata/benchmark.py's RayJobPath)")
        ray_job.start()
    records = []
    for name, (spec, weights, arch) in models.items():
        records += time_model(args, env, name, spec, weights, arch, batches, work_dir, ray_job)
    return records, env


def _quiet_progress_bars() -> None:
    """Loading bars would bury the report."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def time_model(args, env: dict, name: str, spec, weights: str, arch: str | None, batches: list[int], work_dir: Path,
               ray_job) -> list[dict]:
    """Every batch size of one model: FLOPs counted once, then the paths timed per batch size."""
    from pipelines.registry.loading import resolve_dtype

    device = env["device"]
    dtype = resolve_dtype(spec, device, args.dtype)
    peak = peak_tflops(args.peak_tflops, device, env["device_name"], dtype)
    counts, no_cfg = model_flops(spec, arch, args, device)
    records = []
    for batch in batches:
        rows = make_rows(spec, args, row_count(spec, args, batch))
        flops = mean_flops_per_image(rows, counts, no_cfg, args.cache_interval)
        plain_flops = mean_flops_per_image(rows, counts, no_cfg, 1)  # plain diffusers never reuses features
        base = base_record(args, env, name, spec, weights, dtype, batch, rows, counts, flops, peak)
        print(f"[benchmark] {name} batch {batch}: {len(rows)} rows, {args.sweep} sweep, up to {base['steps']} steps, "
              f"{base['height']}x{base['width']}, {dtype} on {env['device_name']}", file=sys.stderr)
        got = measure_paths(args, spec, rows, batch, device, dtype, work_dir / f"{name}-b{batch}", ray_job)
        records += [path_record(base, got, path, batching, plain_flops, args) for path, batching in got]
    return records


def model_flops(spec, arch: str | None, args, device: str) -> tuple[dict, dict]:
    """count_flops at the benchmark's size, with and without classifier-free guidance (a
    mixed sweep has guidance-1 rows); the counts at its guidance twice for a single one."""
    from pipelines.registry.families import FLUX, max_sequence_length, pipeline_name

    r0 = make_rows(spec, args, 1).iloc[0]
    pipe = pipe_for_flops(spec, arch)
    # FLUX's guidance is distilled (an input, one forward) or ignored: its rows run no CFG pass
    guided = float(r0.guidance) > 1 and pipeline_name(spec) != FLUX
    size = dict(height=int(r0.height), width=int(r0.width), max_sequence_length=max_sequence_length(spec))
    counts = count_flops(pipe, cfg=guided, **size)
    no_cfg = count_flops(pipe, cfg=False, **size) if args.sweep == "mixed" and guided else counts
    del pipe
    free(device)
    return counts, no_cfg


def base_record(args, env: dict, name: str, spec, weights: str, dtype: str, batch: int, rows: pd.DataFrame,
                counts: dict, flops: float, peak: tuple[float | None, str]) -> dict:
    """The fields every path's record of one model and batch size shares."""
    r0 = summary_row(rows, args.sweep)
    return dict(run_id=env["run_id"], suite=args.suite, sweep=args.sweep, model=name, weights=weights,
                pipeline=spec.pipeline, device=env["device"], device_name=env["device_name"], dtype=dtype,
                batch_size=batch, rows=len(rows), repeats=args.repeats,
                steps=int(r0.steps), height=int(r0.height), width=int(r0.width),
                guidance=float(r0.guidance), scheduler=str(r0.scheduler),
                schedulers=",".join(schedulers_used(spec, args, rows)), cache_interval=args.cache_interval,
                flops_per_image=flops,
                unet_step_flops=counts["unet_step"], vae_decode_flops=counts["vae_decode"],
                text_flops=counts["text"], peak_tflops=peak[0], peak_source=peak[1],
                torch_version=env["torch_version"], diffusers_version=env["diffusers_version"],
                ray_version=env["ray_version"], host=env["host"], git_commit=env["git_commit"],
                created_at=env["created_at"])


# --------------------------------------------------------------------------- measuring the paths


def measure_paths(args, spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, work: Path,
                  ray_job) -> dict:
    """(path, batching) -> measurements, for the paths in args.paths (plain once, the
    others per --batching). Pixels are compared as they come: actor with plain, Ray job
    with actor, each with the float32 reference in half precision."""
    got, plain_px, reference = {}, None, None
    if "plain" in args.paths:
        got["plain", None], plain_px, reference = measure_plain(args, spec, rows, batch, device, dtype)
    for batching in args.batching:
        actor_px = None
        if "actor" in args.paths:
            got["actor", batching], actor_px = measure_actor(args, spec, rows, batch, device, dtype, batching,
                                                             plain_px, reference)
        if "ray" in args.paths:
            got["ray", batching] = measure_ray(args, spec, rows, batch, device, dtype, batching, work, ray_job,
                                               actor_px, reference)
    return got


def measure_plain(args, spec, rows, batch, device, dtype) -> tuple[dict, dict, dict | None]:
    """Plain diffusers' measurements, its first batch's pixels, and in half precision the
    float32 reference of that batch (None otherwise; with feature reuse too, where the
    paths' pixels differ by design)."""
    seconds, plain_px, mem, busy = time_plain(spec, rows, batch, device, dtype, args.repeats, args.profile_busy)
    free(device)
    g = dict(seconds=seconds, peak_mem_bytes=mem, **busy_fields(busy))
    reference = None
    if dtype != "float32" and args.cache_interval == 1:
        reference = float32_reference(spec, rows, plain_px, device)
        g.update(reference_fields(plain_px, reference))
    return g, plain_px, reference


def measure_actor(args, spec, rows, batch, device, dtype, batching, plain_px, reference) -> tuple[dict, dict]:
    seconds, actor_px, errors, mem, warmup_s, busy = time_actor(
        spec, rows, batch, device, dtype, args.repeats, batching, speed_options(args), args.profile_busy)
    free(device)
    g = dict(seconds=seconds, peak_mem_bytes=mem, errors=len(errors), warmup_s=warmup_s, **busy_fields(busy))
    if errors:
        print(f"[benchmark] actor errors: {errors[:3]}", file=sys.stderr)
    if plain_px is not None and args.cache_interval == 1:  # feature reuse changes pixels
        g["pixels_max_diff"] = max_pixel_diff(plain_px, actor_px)
        g["pixels_compared"] = len(plain_px)
    if reference:
        g.update(reference_fields(actor_px, reference))
    return g, actor_px


def measure_ray(args, spec, rows, batch, device, dtype, batching, work, ray_job, actor_px, reference) -> dict:
    """The median of --repeats runs of the whole job."""
    runs = [ray_job.time(spec, rows, batch, device, dtype, work, args.models, batching, speed_flags(args))
            for _ in range(args.repeats)]
    ray = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    g = dict(seconds=ray["seconds"], peak_mem_bytes=ray["peak"], errors=len(ray["errors"]),
             startup_s=ray["startup_s"], steady_images_per_s=len(rows) / ray["steady_seconds"],
             actor_busy=ray["actor_busy"])
    if actor_px is not None:
        g["pixels_max_diff"] = max_pixel_diff(actor_px, ray["pixels"])
        g["pixels_compared"] = len(ray["pixels"])
    if reference:
        g.update(reference_fields(ray["pixels"], reference))
    return g


def speed_options(args) -> dict:
    """The speed options of the actor and Ray paths, as GenerateActor takes them."""
    return dict(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile)


def speed_flags(args) -> tuple:
    """The same options as jobs/generate.py flags."""
    return ((("--channels-last",) if args.channels_last else ()) + (("--fuse-qkv",) if args.fuse_qkv else ())
            + ("--compile", args.compile))


# --------------------------------------------------------------------------- records


def path_record(base: dict, got: dict, path: str, batching: str | None, plain_flops: float, args) -> dict:
    """One path's record: throughput, MFU on the FLOPs the path ran, its ratios to plain
    diffusers and (Ray job) to the actor, and the pixel verdict."""
    g, n, peak = got[path, batching], base["rows"], base["peak_tflops"]
    ips = n / g["seconds"]
    flops = plain_flops if path == "plain" else base["flops_per_image"]
    rec = dict(base, path=path, batching=batching, seconds=g["seconds"], images_per_s=ips,
               s_per_image=g["seconds"] / n, achieved_tflops=ips * flops / 1e12,
               mfu=(ips * flops / 1e12 / peak) if peak else None,
               peak_mem_bytes=g.get("peak_mem_bytes"), errors=g.get("errors", 0),
               pixels_max_diff=g.get("pixels_max_diff"), pixels_compared=g.get("pixels_compared"),
               fp32_mean_diff=g.get("fp32_mean_diff"), reference_images=g.get("reference_images"),
               startup_s=g.get("startup_s"), steady_images_per_s=g.get("steady_images_per_s"),
               warmup_s=g.get("warmup_s"), device_busy=g.get("device_busy"),
               profiled_s=g.get("profiled_s"), actor_busy=g.get("actor_busy"),
               **(speed_options(args) if path != "plain" else dict(cache_interval=1, flops_per_image=plain_flops)))
    if ("plain", None) in got:
        rec["vs_plain"] = ips / (n / got["plain", None]["seconds"])
    if path == "ray" and ("actor", batching) in got:
        actor_ips = n / got["actor", batching]["seconds"]
        rec["ray_overhead_ratio"] = ips / actor_ips
        rec["ray_steady_ratio"] = g["steady_images_per_s"] / actor_ips
    plain_fp32_diff = got.get(("plain", None), {}).get("fp32_mean_diff")
    rec["pixels_match"] = pixels_match(rec, plain_fp32_diff, base["dtype"] != "float32", args.pixel_tolerance,
                                       args.half_tolerance)
    return rec
