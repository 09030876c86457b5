#!/usr/bin/env python
"""Throughput benchmark: plain diffusers vs diffsweep's actor vs the full Ray Data job.

    python jobs/benchmark.py --suite throughput --model sd15 --batch-sizes 1,4,16 --out bench/
    python jobs/benchmark.py --suite throughput --model tiny-random --rows 8 --steps 4 --out /tmp/b   # CPU smoke
    python jobs/benchmark.py --sweep mixed --batching config,continuous --model sd15 --batch-sizes 16 --out bench/

`--sweep mixed` times a sweep of 4 schedulers x 3 step counts x 3 guidance scales instead of
one configuration: plain diffusers loops over the configurations as a user would, and the
actor and the Ray job run it with each `--batching` (config: a diffusers call per
configuration; continuous: rows of all configurations share UNet calls).

For each model and batch size, on the same machine and the same rows:
  plain   StableDiffusion(XL)Pipeline called the way a user calls it (after one warm-up);
  actor   jobs.generate.GenerateActor called in-process on pandas batches (after one warm-up):
          the generate step with nothing of Ray around it;
  ray     jobs.generate.main(...), timed from submit to last row committed (Ray already up).
It reports images/s, s/image, model FLOPs utilisation (FLOPs counted once per model and
size with FlopCounterMode), peak memory, Ray overhead (Ray job images/s / actor images/s)
and whether the actor's pixels equal plain diffusers' (and the Ray job's equal the
actor's). `sd15` and `sdxl` are built from their real configs with random weights (timing
does not depend on weights; nothing is downloaded); other names come from the registry.

Outputs in --out: throughput.json, throughput.parquet, throughput.md. With --history
FILE.parquet the records are appended there, and each is compared with the median
images/s of the previous --window runs of the same (suite, model, device, batch, path,
dtype, steps, size).

Exit codes: 0 ok; 2 bad input (unknown model, missing weights, bad flag);
3 throughput regression (some path below (1 - --tolerance) x its history median);
4 pixel check failed (see below).

Pixel check. In float32 the actor's pixels must equal plain diffusers' (and the Ray job's the
actor's) within --pixel-tolerance levels. In half precision that is not a property any path
has: batch composition alone moves some images by tens of levels (docs/performance.md). So
there the first batch is also run in float32 (TF32 off) as a reference, and a path passes if
its mean |difference| to that reference is at most --half-tolerance x plain diffusers' own
(+ 0.5 level): an optimisation may not make the images less accurate than the precision does.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterator, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from any directory
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.errors import InputError  # noqa: E402

EXIT_REGRESSION = 3
EXIT_PIXELS = 4
PATHS = ("plain", "actor", "ray")
PATH_LABEL = {"plain": "plain diffusers", "actor": "diffsweep actor", "ray": "diffsweep Ray job"}
HISTORY_KEY = ["suite", "sweep", "model", "device_name", "batch_size", "path", "batching", "compile", "channels_last",
               "fuse_qkv", "dtype", "steps", "height", "width", "cache_interval"]
MIXED_SCHEDULERS = {"eps": ("ddim", "euler_a", "dpmpp_2m", "unipc"), "flow": ("flow_match_euler", "flow_match_heun")}
CONFIG_COLUMNS = ["scheduler", "steps", "guidance", "height", "width"]  # one diffusers call's configuration
MIXED_STEP_FRACTIONS = (0.4, 0.7, 1.0)  # of the model's (or --steps) step count
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device name; anything else: --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="throughput", choices=["throughput"], help="which benchmark (default throughput)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="model to time; repeatable. sd15/sdxl: real architecture, random weights. "
                        "Default: sd15, sdxl, embedded on a GPU; embedded (else tiny-random) on CPU")
    p.add_argument("--models", default=None, metavar="FILE", help="extra models YAML, as for jobs/generate.py")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,16 on GPU; 1,4 on CPU)")
    p.add_argument("--rows", type=int, default=None,
                   help="timed images per path and batch size (default 4 x batch, >= 4)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed passes per path; the median pass is reported (use 3+ on a shared machine)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--size", default=None, help="N or HxW (default: the model's)")
    p.add_argument("--scheduler", default="ddim", help="scheduler registry name (default ddim)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="the rows' cache_interval manifest value for the actor and Ray paths: feature reuse, full "
                        "UNet every N-th call (default 1, off). It changes pixels, so plain diffusers stays the "
                        "unmodified reference and its pixels are not compared with the actor's")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: the model's half type on GPU, float32 on CPU")
    p.add_argument("--paths", default=",".join(PATHS), help="comma list of plain,actor,ray (default all)")
    p.add_argument("--channels-last", action="store_true", help="as jobs/generate.py: for the actor and Ray paths")
    p.add_argument("--fuse-qkv", action="store_true", help="as jobs/generate.py: for the actor and Ray paths")
    p.add_argument("--compile", default="none", metavar="MODE",
                   help="as jobs/generate.py: torch.compile mode for the actor and Ray paths (default none); "
                        "the compile is paid in the warm-up and reported as warmup_s")
    p.add_argument("--sweep", default="single", choices=["single", "mixed"],
                   help="single: every row one configuration (default); mixed: 4 schedulers x 3 step counts x "
                        "3 guidance scales (1, 4, the model's), --rows spread over the 36 configurations")
    p.add_argument("--batching", default="config",
                   help="comma list of config,continuous: the job's --batching values the actor and Ray paths "
                        "run with (default config)")
    p.add_argument("--profile-busy", action=argparse.BooleanOptionalAction, default=None,
                   help="after the timed passes of plain and actor, one more pass under torch.profiler to measure "
                        "device_busy (default: on with --sweep mixed, off otherwise; it costs a pass or more)")
    p.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
    p.add_argument("--work-dir", default=None, help="where random-weight models are saved (default OUT/_work)")
    p.add_argument("--history", default=None, metavar="FILE.parquet",
                   help="append records here and check for regressions")
    p.add_argument("--tolerance", type=float, default=0.1,
                   help="allowed images/s drop vs the history median (default 0.1)")
    p.add_argument("--window", type=int, default=5, help="previous runs the median is taken over (default 5)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default by name: H100/H200 989, A100 312; CPU: a measured fp32 matmul)")
    p.add_argument("--pixel-tolerance", type=int, default=1,
                   help="float32: max |difference| in 0..255 levels from the path compared with (default 1)")
    p.add_argument("--half-tolerance", type=float, default=1.5,
                   help="half precision: a path's mean |difference| to a float32 reference may be this many times "
                        "plain diffusers' own, + 0.5 level (default 1.5)")
    args = p.parse_args(argv)
    args.command = "python jobs/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.profile_busy is None:
        args.profile_busy = args.sweep == "mixed"
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    args.batching = [s.strip() for s in args.batching.split(",") if s.strip()]
    if not args.batching or not set(args.batching) <= {"config", "continuous"}:
        p.error(f"--batching: got {args.batching}; expected a comma list of config, continuous")
    from pipelines.generation.speed import COMPILE_MODES

    if args.compile not in COMPILE_MODES:
        p.error(f"--compile {args.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
    bad = [s for s in args.paths if s not in PATHS]
    if bad or not args.paths:
        p.error(f"--paths: got {bad or args.paths}; expected a comma list of {', '.join(PATHS)}")
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        except ValueError:
            p.error(f"--batch-sizes {args.batch_sizes!r}: expected a comma list of integers")
        if not args.batch_sizes or min(args.batch_sizes) < 1:
            p.error("--batch-sizes: expected positive integers")
    if args.size is not None:
        try:
            h, _, w = args.size.lower().partition("x")
            args.size = (int(h), int(w or h))
        except ValueError:
            p.error(f"--size {args.size!r}: expected N or HxW")
    for flag in ("rows", "steps", "window", "repeats", "cache_interval"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag} must be >= 1, got {v}")
    if not 0 <= args.tolerance < 1:
        p.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
    return args


# --------------------------------------------------------------------------- helpers


def _device() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    return "cpu", _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """Between paths, so each path's peak memory is its own. On CPU that is the resident
    set, which keeps freed heap (a profiled pass's events: about 2 KB each, millions of
    them) unless glibc is told to give it back."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure_cpu_matmul_tflops(n: int = 1024, seconds: float = 0.5) -> float:
    """What this CPU sustains on an fp32 matmul: the practical ceiling MFU is measured against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(args, device: str, device_name: str, dtype: str) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device == "cuda":
        for key, value in PEAK_TFLOPS.items():
            if key in device_name and dtype in ("float16", "bfloat16"):
                return value, f"{key} dense {dtype} spec"
        return None, "unknown device peak (pass --peak-tflops)"
    return measure_cpu_matmul_tflops(), "measured fp32 matmul on this CPU"


class PeakMemory:
    """Peak memory while a block runs. GPU, in-process: torch's max allocated bytes;
    GPU, other processes (the Ray job): device-wide used memory, sampled, above the start;
    CPU, in-process: this process's resident set, sampled. None where unknown."""

    def __init__(self, device: str, in_process: bool = True):
        self.device, self.in_process, self.peak = device, in_process, None
        self._stop = threading.Event()

    def _used(self) -> int | None:
        import torch

        if self.device == "cuda" and not self.in_process:
            free, total = torch.cuda.mem_get_info()
            return total - free
        if self.device == "cpu" and self.in_process:
            try:
                return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError):
                return None
        return None

    def _sample(self):
        while not self._stop.wait(0.05):
            used = self._used()
            if used is not None:
                self.peak = max(self.peak or 0, used)

    def __enter__(self):
        import torch

        if self.device == "cuda" and self.in_process:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self._used()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda" and self.in_process:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            if self.peak is not None and not self.in_process and self.base is not None:
                self.peak -= self.base  # what the job added on the device
        return False


def to_uint8(images) -> list[np.ndarray]:
    """A user's conversion of output_type="np" images (floats in [0, 1]) to uint8 pixels,
    as diffusers' numpy_to_pil does it (x255, round), clipped."""
    return [(np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8) for img in images]


def max_pixel_diff(a: dict, b: dict) -> int | None:
    """Largest |a - b| in 0..255 levels over the sample_ids both hold; None if one lacks pixels."""
    common = [k for k in a if k in b]
    if not common or any(a[k] is None or b[k] is None for k in common):
        return None
    return max(int(np.abs(a[k].astype(np.int16) - b[k].astype(np.int16)).max()) for k in common)


# --------------------------------------------------------------------------- device busy


class Span(NamedTuple):
    """One profiler event, reduced to what the busy figure needs (times in ns)."""

    kind: str  # kineto activity type: "cpu_op", "kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", ...
    name: str
    thread: int
    start: int
    end: int


# Device-side work. Not "gpu_user_annotation": it also sits on the GPU timeline but spans
# whole record_function ranges, gaps included.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def covered_length(intervals) -> float:
    """Length of the union of (start, end) intervals: overlapping work (kernels on two
    streams, nested ops) counts once, so the result never exceeds the time spanned."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + (cur_end - cur_start if cur_end is not None else 0)


def busy_intervals(spans, device: str) -> list[tuple[int, int]]:
    """The intervals during which the device computed. CUDA: kernels, memcpys and memsets.
    CPU: top-level aten operators (not inside another aten op on the same thread), i.e.
    time in tensor ops as opposed to Python, scheduler and pipeline overhead."""
    if device == "cuda":
        return [(s.start, s.end) for s in spans if s.kind in DEVICE_WORK]
    ops = sorted((s for s in spans if s.kind == "cpu_op" and s.name.startswith("aten::")),
                 key=lambda s: (s.start, -s.end))
    top, open_until = [], {}  # thread -> end of its last top-level op
    for s in ops:
        if s.end > open_until.get(s.thread, -1):  # not nested in that op
            top.append((s.start, s.end))
            open_until[s.thread] = max(s.end, open_until.get(s.thread, -1))
    return top


def profile_spans(prof) -> Iterator[Span]:
    """The raw kineto events of a finished torch.profiler run. Not prof.events(): building
    its FunctionEvent tree takes about a minute per million events, a mixed sweep has
    millions; the raw list takes seconds."""
    return (Span(e.activity_type(), e.name(), e.start_thread_id(), e.start_ns(), e.end_ns())
            for e in prof.profiler.kineto_results.events())


def device_busy(run, device: str) -> tuple[float, float]:
    """Run `run()` once under torch.profiler; return (busy fraction, wall seconds of that
    pass). Busy = covered length of busy_intervals / wall time. On CUDA only device activity
    is recorded: recording every CPU op would slow the host and starve the GPU it measures.
    Clipped to 1 against profiler/perf_counter clock skew of microseconds."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    _sync(device)
    with profile(activities=[activity]) as prof:
        t0 = time.perf_counter()
        run()
        _sync(device)
        wall = time.perf_counter() - t0
    busy = covered_length(busy_intervals(profile_spans(prof), device)) / 1e9
    return min(1.0, busy / wall), wall


# --------------------------------------------------------------------------- models and rows


def resolve_models(args, work_dir: Path, device: str):
    """name -> (ModelSpec, "random" | "trained", architecture name or None). sd15/sdxl (unless the user's --models file
    names them) are built with random weights and saved as a local diffusers directory, so
    plain diffusers, the actor and the Ray job all load the same files the usual way."""
    from pipelines.architectures import ARCHITECTURES, build_random_pipeline
    from pipelines.registry.models import ModelRegistry, check_available, load_models_yaml, resolve_dtype

    registry = ModelRegistry.with_user_file(args.models)
    user = set(load_models_yaml(args.models)) if args.models else set()
    names = args.model or (["sd15", "sdxl"] + (["embedded"] if _embedded_built() else []) if device == "cuda"
                           else [_cpu_default()])
    out = {}
    for name in names:
        if name in ARCHITECTURES and name not in user:
            spec = registry.get(name)
            dtype = resolve_dtype(spec, device, args.dtype)
            target = work_dir / f"{name}-random-{dtype}"
            if not (target / "model_index.json").is_file():
                print(f"[benchmark] building {name} with random weights ({dtype}) in {target}", file=sys.stderr)
                pipe = build_random_pipeline(name, dtype=dtype, device=device)
                staging = target.with_name(f".{target.name}.{os.getpid()}")
                pipe.save_pretrained(staging, safe_serialization=True)
                os.replace(staging, target)  # a half-written directory is never reused
                del pipe
                _free(device)
            out[name] = (replace(spec, source=str(target), variant=None), "random", name)
        else:
            spec = registry.get(name)
            check_available(spec)
            out[name] = (spec, "random" if name == "tiny-random" else "trained", None)
    return out


def _embedded_built() -> bool:
    from pipelines.registry.models import EMBEDDED_DIR

    return (EMBEDDED_DIR / "model_index.json").is_file()


def _cpu_default() -> str:
    if _embedded_built():
        return "embedded"
    print("[benchmark] the embedded model is not built yet (pipelines/embedded/model); using tiny-random",
          file=sys.stderr)
    return "tiny-random"


def configurations(spec, args) -> list[tuple[str, int, float]]:
    """(scheduler, steps, guidance) of the benchmark: one, or the mixed sweep's 36."""
    steps = args.steps or spec.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    if args.sweep == "single":
        return [(args.scheduler, steps, guidance)]
    step_counts = sorted({max(1, round(steps * f)) for f in MIXED_STEP_FRACTIONS})
    scales = sorted({1.0, 4.0, guidance})
    return [(s, n, g) for s in MIXED_SCHEDULERS[spec.family] for n in step_counts for g in scales]


def _schedulers_used(spec, args, rows: pd.DataFrame) -> list[str]:
    """The schedulers the rows run, in the sweep's order: the model family picks the list
    (eps or flow matching), and too few rows leave some out."""
    used = set(rows.scheduler)
    return [s for s in dict.fromkeys(c[0] for c in configurations(spec, args)) if s in used]


def make_rows(spec, args, n: int):
    """`n` validated manifest rows spread round-robin over the configurations, in the job's
    order (by run key)."""
    import pyarrow as pa

    from pipelines.registry.models import ModelRegistry
    from pipelines.schema import order_by_run_key, validate_manifest

    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    h, w = args.size or (spec.height, spec.width)
    configs = configurations(spec, args)
    rows = []
    for i in range(n):
        scheduler, steps, guidance = configs[i % len(configs)]
        rows.append(dict(prompt=f"a {colors[i % 6]} {shapes[i % 4]} on a white background, sample {i // len(configs)}",
                         seed=1000 + i, model=spec.name, scheduler=scheduler, steps=steps, guidance=guidance,
                         height=h, width=w, cache_interval=args.cache_interval))
    table = validate_manifest(pa.Table.from_pylist(rows), ModelRegistry({spec.name: spec}), spec.name,
                              source="benchmark rows")
    return order_by_run_key(table).to_pandas()


# --------------------------------------------------------------------------- the three paths


def time_plain(spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, repeats: int = 1,
               profile_busy: bool = False):
    """A user's loop: one pipeline; per configuration, set its scheduler and call it per
    batch. Returns (median pass seconds, pixels of the first batch by sample_id, peak bytes,
    (device busy, profiled pass seconds) or None)."""
    from pipelines.registry.models import load_model

    loaded = load_model(spec, device, dtype)  # from_pretrained + .to(device), safety checker off
    groups = [g for _, g in rows.groupby(CONFIG_COLUMNS, sort=False)]

    first = {}

    def one_pass():
        for group in groups:
            for start in range(0, len(group), batch):
                chunk = group.iloc[start:start + batch]
                images = plain_call(loaded, chunk, device)
                if not first:
                    first.update(zip(chunk.sample_id, to_uint8(images)))

    plain_call(loaded, groups[0].iloc[:batch], device)  # warm-up
    passes = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            one_pass()
            passes.append(time.perf_counter() - t0)
    busy = device_busy(one_pass, device) if profile_busy else None  # after the clock: profiling slows it
    return float(np.median(passes)), first, mem.peak, busy


def plain_call(loaded, chunk: pd.DataFrame, device: str) -> np.ndarray:
    """One diffusers call for rows of one configuration, as a user writes it."""
    import torch

    from pipelines.registry.schedulers import make_scheduler

    pipe, r0 = loaded.pipe, chunk.iloc[0]
    pipe.scheduler = make_scheduler(r0.scheduler, loaded.scheduler_config, loaded.spec.family)
    kwargs = dict(prompt=list(chunk.prompt), num_inference_steps=int(r0.steps), guidance_scale=float(r0.guidance),
                  height=int(r0.height), width=int(r0.width), output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk.seed])
    if float(r0.guidance) > 1:
        kwargs["negative_prompt"] = list(chunk.negative_prompt)
    with torch.inference_mode():
        images = pipe(**kwargs).images
    _sync(device)
    return images


REFERENCE_ROWS = 8  # float32 reference images per model and batch size (half precision only)


def float32_reference(spec, rows: pd.DataFrame, first_batch: dict, device: str) -> dict:
    """Pixels by sample_id of the first REFERENCE_ROWS rows of plain diffusers' first batch
    (`first_batch`: its pixels by sample_id), made in float32 with TF32 off (so the reference
    is not itself a 10-bit-mantissa computation). float32 pixels do not depend on batch
    composition (<= 1/255, tested), so a smaller batch than the timed one is fine."""
    import torch

    from pipelines.registry.models import load_model

    chunk = rows[rows.sample_id.isin(list(first_batch)[:REFERENCE_ROWS])]  # rows' order: the batch's
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        images = plain_call(load_model(spec, device, "float32"), chunk, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    _free(device)
    return dict(zip(chunk.sample_id, to_uint8(images)))


def _reference_fields(pixels: dict, reference: dict) -> dict:
    """fp32_mean_diff and reference_images for a path's measurements."""
    return dict(fp32_mean_diff=mean_pixel_diff(pixels, reference), reference_images=len(reference))


def mean_pixel_diff(a: dict, reference: dict) -> float | None:
    """Mean |a - reference| in 0..255 levels over the reference's sample_ids; None if a lacks one."""
    if any(a.get(k) is None for k in reference):
        return None
    return float(np.mean([np.abs(a[k].astype(np.int16) - reference[k].astype(np.int16)).mean() for k in reference]))


def half_precision_match(path_diff: float | None, plain_diff: float | None, tolerance: float) -> bool:
    """A half-precision path is as accurate as the precision allows if its distance to the
    float32 reference is within `tolerance` x plain diffusers' own, + 0.5 level."""
    return path_diff is not None and plain_diff is not None and path_diff <= tolerance * plain_diff + 0.5


def time_actor(spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, repeats: int = 1,
               batching: str = "config", speed: dict | None = None, profile_busy: bool = False):
    """GenerateActor in this process, on pandas batches of the rows Ray would feed it.
    Returns (median pass seconds, pixels by sample_id, error messages, peak bytes, warm-up
    seconds: model load, the actor's own warm-up (compile, if on) and one batch,
    (device busy, profiled pass seconds) or None)."""
    from jobs.generate import CALL_ROWS_CONTINUOUS, GenerateActor

    actor = GenerateActor(specs={spec.name: spec}, dtype=dtype, batch_size=batch, torch_threads=None,
                          batching=batching, speed=speed)
    call_rows = batch * (CALL_ROWS_CONTINUOUS if batching == "continuous" else 1)  # as jobs/generate.py
    t0 = time.perf_counter()
    actor(rows.iloc[:batch])  # warm-up (and model load)
    _sync(device)
    warmup_s = time.perf_counter() - t0

    def one_pass():
        return [actor(rows.iloc[start:start + call_rows]) for start in range(0, len(rows), call_rows)]

    passes = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = one_pass()
            passes.append(time.perf_counter() - t0)
    busy = device_busy(one_pass, device) if profile_busy else None  # after the clock: profiling slows it
    seconds = float(np.median(passes))
    out = pd.concat(outs, ignore_index=True)
    pixels = {sid: (None if raw is None else np.frombuffer(raw, np.uint8).reshape(int(h), int(w), 3))
              for sid, raw, h, w in zip(out.sample_id, out.pixels, out.height, out.width)}
    errors = out.error[out.status != "ok"].tolist()
    return seconds, pixels, errors, mem.peak, warmup_s, busy


def time_ray_job(spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, work: Path, models_file,
                 batching: str = "config", speed_flags: tuple = ()):
    """jobs/generate.py's main() on a manifest of `rows`, from submit to the last row committed."""
    import yaml
    from PIL import Image

    from jobs import generate as gen_job
    from pipelines.registry.models import ModelRegistry

    work.mkdir(parents=True, exist_ok=True)
    manifest, results = work / "manifest.parquet", work / "results"
    rows.to_parquet(manifest, index=False)
    argv = [str(manifest), "--out", str(results), "--batch-size", str(batch), "--dtype", dtype,
            "--batching", batching, *speed_flags, "--overwrite", "--no-progress"]
    registered = ModelRegistry.with_user_file(models_file).specs.get(spec.name)
    if spec != registered:  # a random-weight build: tell the job where it is, as a user would
        models_file = work / "models.yaml"
        models_file.write_text(yaml.safe_dump({"models": {spec.name: {
            k: getattr(spec, k) for k in ("source", "pipeline", "scheduler", "steps", "guidance", "height", "width",
                                          "family", "gpu_dtype", "size_factor")}}}))
    if models_file:
        argv += ["--models", str(models_file)]
    with PeakMemory(device, in_process=False) as mem:
        submitted = time.time()
        t0 = time.perf_counter()
        rc = gen_job.main(argv)
        seconds = time.perf_counter() - t0
        finished = time.time()
    if rc != 0:
        raise RuntimeError(f"jobs/generate.py {' '.join(argv)} exited {rc}")
    df = pd.read_parquet(results)
    first_start = df.created_at.min().timestamp()  # when the actor began its first batch (model loaded)
    steady = max(1e-9, finished - first_start)
    pixels = {sid: (None if png is None else np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
              for sid, png in zip(df.sample_id, df.image)}
    return dict(seconds=seconds, startup_s=max(0.0, first_start - submitted), steady_seconds=steady, pixels=pixels,
                errors=df.error[df.status != "ok"].tolist(), peak=mem.peak,
                actor_busy=actor_busy(df, _pool_size(results, df), steady))


def actor_busy(results: pd.DataFrame, actors: int, steady_seconds: float) -> float:
    """Fraction of the generation actors' time spent inside generate calls: the rows'
    gen_seconds (each row's share of the diffusers/UNet calls it was part of, so they add
    up to those calls' wall time) over actors x the steady wall time (first batch start to
    the last row committed). The rest is time the actors waited for rows or spent outside
    generate (Ray hand-offs, the last commit) once started; gaps inside a call are not seen."""
    return float(np.nansum(results.gen_seconds)) / (actors * steady_seconds)


def _pool_size(results: Path, df: pd.DataFrame) -> int:
    """The job's actor pool size, from its _run.json; else the workers seen in the rows."""
    try:
        return int(json.loads((results / "_run.json").read_text())["runs"][-1]["pool_size"])
    except (OSError, KeyError, IndexError, TypeError, ValueError):
        return max(1, df.worker.nunique())


# --------------------------------------------------------------------------- the suite


def run_throughput(args) -> tuple[list[dict], dict]:
    import diffusers
    import torch

    from pipelines.architectures import count_flops, flops_per_image
    from pipelines.registry.models import resolve_dtype

    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the report
    import transformers

    transformers.utils.logging.disable_progress_bar()
    device, device_name = _device()
    out_dir = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else out_dir / "_work"
    batches = args.batch_sizes or ([1, 4, 16] if device == "cuda" else [1, 4])
    models = resolve_models(args, work_dir, device)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    env = dict(run_id=run_id, suite=args.suite, created_at=_now(), host=socket.gethostname(), device=device,
               device_name=device_name, torch_version=torch.__version__, diffusers_version=diffusers.__version__,
               ray_version=_ray_version() if "ray" in args.paths else None, python=sys.version.split()[0],
               git_commit=_git_commit(), cpu_count=os.cpu_count(), command=args.command,
               load_avg_at_start=_load_avg())
    for spec, _, _ in models.values():
        make_rows(spec, args, 1)  # bad flags (scheduler, size, steps) fail here, before Ray starts
    if "ray" in args.paths:
        _init_ray()
    speed = dict(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile)
    speed_flags = ((("--channels-last",) if args.channels_last else ()) + (("--fuse-qkv",) if args.fuse_qkv else ())
                   + ("--compile", args.compile))
    records = []
    for name, (spec, weights, arch) in models.items():
        dtype = resolve_dtype(spec, device, args.dtype)
        peak, peak_source = peak_tflops(args, device, device_name, dtype)
        r0 = make_rows(spec, args, 1).iloc[0]
        pipe = _pipe_for_flops(spec, arch)
        counts = count_flops(pipe, int(r0.height), int(r0.width), float(r0.guidance) > 1)
        no_cfg = count_flops(pipe, int(r0.height), int(r0.width), False) if args.sweep == "mixed" else counts
        del pipe
        _free(device)
        for batch in batches:
            n = args.rows or (len(configurations(spec, args)) * max(1, batch // 4) if args.sweep == "mixed"
                              else max(4, 4 * batch))
            rows = make_rows(spec, args, n)
            flops, plain_flops = (float(np.mean([flops_per_image(counts if g > 1 else no_cfg, int(k), cache_interval=c)
                                                 for g, k in zip(rows.guidance, rows.steps)]))
                                  for c in (args.cache_interval, 1))  # plain diffusers never reuses features
            if args.sweep == "mixed":  # the record names the sweep, its largest step count and scale
                r0 = rows.sort_values(["steps", "guidance"]).iloc[-1].copy()
                r0["scheduler"] = "mixed"
            base = dict(run_id=run_id, suite=args.suite, sweep=args.sweep, model=name, weights=weights, pipeline=spec.pipeline,
                        device=device, device_name=device_name, dtype=dtype, batch_size=batch, rows=n,
                        repeats=args.repeats,
                        steps=int(r0.steps), height=int(r0.height), width=int(r0.width),
                        guidance=float(r0.guidance), scheduler=str(r0.scheduler),
                        schedulers=",".join(_schedulers_used(spec, args, rows)), cache_interval=args.cache_interval,
                        flops_per_image=flops,
                        unet_step_flops=counts["unet_step"], vae_decode_flops=counts["vae_decode"],
                        text_flops=counts["text"], peak_tflops=peak, peak_source=peak_source,
                        torch_version=env["torch_version"], diffusers_version=env["diffusers_version"],
                        ray_version=env["ray_version"], host=env["host"], git_commit=env["git_commit"],
                        created_at=env["created_at"])
            got = {}  # (path, batching) -> measurements
            print(f"[benchmark] {name} batch {batch}: {n} rows, {args.sweep} sweep, up to {int(r0.steps)} steps, "
                  f"{int(r0.height)}x{int(r0.width)}, {dtype} on {device_name}", file=sys.stderr)
            # Each path loads its own copy and frees it before the next, so peak memory is its own.
            half = dtype != "float32"
            reference = None  # float32 pixels of the first batch, where half precision needs them
            if "plain" in args.paths:
                seconds, plain_px, mem, busy = time_plain(spec, rows, batch, device, dtype, args.repeats,
                                                          args.profile_busy)
                _free(device)
                got["plain", None] = dict(seconds=seconds, peak_mem_bytes=mem, **_busy_fields(busy))
                if half and args.cache_interval == 1:
                    reference = float32_reference(spec, rows, plain_px, device)
                    got["plain", None].update(_reference_fields(plain_px, reference))
            for batching in args.batching:
                if "actor" in args.paths:
                    seconds, actor_px, errors, mem, warmup_s, busy = time_actor(
                        spec, rows, batch, device, dtype, args.repeats, batching, speed, args.profile_busy)
                    _free(device)
                    g = got["actor", batching] = dict(seconds=seconds, peak_mem_bytes=mem, errors=len(errors),
                                                      warmup_s=warmup_s, **_busy_fields(busy))
                    if errors:
                        print(f"[benchmark] actor errors: {errors[:3]}", file=sys.stderr)
                    if "plain" in args.paths and args.cache_interval == 1:  # feature reuse changes pixels
                        g["pixels_max_diff"] = max_pixel_diff(plain_px, actor_px)
                        g["pixels_compared"] = len(plain_px)
                    if reference:
                        g.update(_reference_fields(actor_px, reference))
                if "ray" in args.paths:
                    runs = [time_ray_job(spec, rows, batch, device, dtype, work_dir / f"{name}-b{batch}", args.models,
                                         batching, speed_flags) for _ in range(args.repeats)]
                    ray = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
                    g = got["ray", batching] = dict(seconds=ray["seconds"], peak_mem_bytes=ray["peak"],
                                                    errors=len(ray["errors"]), startup_s=ray["startup_s"],
                                                    steady_images_per_s=n / ray["steady_seconds"],
                                                    actor_busy=ray["actor_busy"])
                    if "actor" in args.paths:
                        g["pixels_max_diff"] = max_pixel_diff(actor_px, ray["pixels"])
                        g["pixels_compared"] = len(ray["pixels"])
                    if reference:
                        g.update(_reference_fields(ray["pixels"], reference))
            for (path, batching), g in got.items():
                ips = n / g["seconds"]
                f = plain_flops if path == "plain" else flops  # the FLOPs the path actually ran
                rec = dict(base, path=path, batching=batching, seconds=g["seconds"], images_per_s=ips,
                           s_per_image=g["seconds"] / n, achieved_tflops=ips * f / 1e12,
                           mfu=(ips * f / 1e12 / peak) if peak else None,
                           peak_mem_bytes=g.get("peak_mem_bytes"), errors=g.get("errors", 0),
                           pixels_max_diff=g.get("pixels_max_diff"), pixels_compared=g.get("pixels_compared"),
                           fp32_mean_diff=g.get("fp32_mean_diff"), reference_images=g.get("reference_images"),
                           startup_s=g.get("startup_s"), steady_images_per_s=g.get("steady_images_per_s"),
                           warmup_s=g.get("warmup_s"), device_busy=g.get("device_busy"),
                           profiled_s=g.get("profiled_s"), actor_busy=g.get("actor_busy"),
                           **(speed if path != "plain" else dict(cache_interval=1, flops_per_image=plain_flops)))
                if ("plain", None) in got:
                    rec["vs_plain"] = ips / (n / got["plain", None]["seconds"])
                if path == "ray" and ("actor", batching) in got:
                    actor_ips = n / got["actor", batching]["seconds"]
                    rec["ray_overhead_ratio"] = ips / actor_ips
                    rec["ray_steady_ratio"] = g["steady_images_per_s"] / actor_ips
                rec["pixels_match"] = _pixels_match(rec, got.get(("plain", None), {}).get("fp32_mean_diff"), half, args)
                records.append(rec)
    return records, env


def _pixels_match(rec: dict, plain_fp32_diff: float | None, half: bool, args) -> bool | None:
    """The record's pixel verdict (module docstring); None where nothing was compared."""
    if rec["path"] == "plain":
        return None
    if half:  # against the float32 reference, relative to plain diffusers' own distance
        if rec.get("fp32_mean_diff") is None:
            return None
        return rec["errors"] == 0 and half_precision_match(rec["fp32_mean_diff"], plain_fp32_diff, args.half_tolerance)
    if rec.get("pixels_compared") is None:
        return None
    d = rec.get("pixels_max_diff")
    return d is not None and d <= args.pixel_tolerance and rec["errors"] == 0


def _busy_fields(busy: tuple[float, float] | None) -> dict:
    """device_busy and the profiled pass's seconds (profiler overhead included) for a record."""
    return {} if busy is None else dict(device_busy=busy[0], profiled_s=busy[1])


def _pipe_for_flops(spec, arch):
    """FLOPs need only the architecture: a meta-device build when it is a known one, else the model's configs."""
    from pipelines.architectures import build_random_pipeline
    from pipelines.registry.models import load_model

    if arch is not None:
        return build_random_pipeline(arch, device="meta")
    return load_model(spec, "cpu", "float32").pipe  # only the components' configs are used


def _init_ray():
    """Ray up before the clock starts: timing is from job submit, on a running cluster.

    A fresh local Ray unless RAY_ADDRESS names one (as under `ray job submit`): a bare
    ray.init() would attach to any `ray start` cluster on the machine, and the benchmark
    compares paths on the same machine."""
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", runtime_env={"env_vars": {"PYTHONPATH": path}},
                 log_to_driver=True, logging_level="WARNING")


def _ray_version():
    import ray

    return ray.__version__


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load_avg() -> float | None:
    """1-minute load average: on a shared machine, what else was competing for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- outputs


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def _bytes(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def _configuration(r: dict) -> str:
    if r.get("sweep") == "mixed":
        steps = sorted({max(1, round(r["steps"] * f)) for f in MIXED_STEP_FRACTIONS})
        return (f"{r['height']}x{r['width']}, mixed sweep of {r['rows']} rows: "
                f"{' / '.join(r['schedulers'].split(','))} x {steps} steps x CFG {sorted({1.0, 4.0, r['guidance']})} "
                f"(FLOPs averaged over the rows)")
    return f"{r['height']}x{r['width']}, {r['steps']} {r['scheduler']} steps, CFG {r['guidance']:g}"


def _flops_note(recs: list[dict]) -> str:
    """FLOPs per image, both figures when feature reuse makes the actor's differ from plain diffusers'."""
    by_interval = {r.get("cache_interval") or 1: r["flops_per_image"] for r in recs}
    if len(by_interval) == 1:
        return f"FLOPs per image {next(iter(by_interval.values())) / 1e12:.4g} TFLOP"
    return "FLOPs per image " + ", ".join(f"{v / 1e12:.4g} TFLOP at cache_interval {k}"
                                          for k, v in sorted(by_interval.items()))


def _table_row(r: dict, show_busy: bool) -> str:
    row = (f"| {_label(r)} | {r['batch_size']} | {r['images_per_s']:.3g} | {r['s_per_image']:.3g} | "
           f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% | {_bytes(r['peak_mem_bytes'])} | "
           f"{_fmt(r.get('vs_plain'), '.2f', '-')}x |")
    if show_busy:
        row += f" {_fmt(_busy(r) and 100 * _busy(r), '.0f', '-')}% |"
    return row.replace("| n/a% |", "| n/a |").replace("| -% |", "| - |")


def _reference_line(r: dict, recs: list[dict]) -> str:
    """Half precision: how far the path is from the float32 reference, next to plain diffusers."""
    head = (f"- batch {r['batch_size']}: {_label(r)} ({r['dtype']}): mean |difference| to the float32 reference "
            f"{r['fp32_mean_diff']:.2f} levels over {r['reference_images']} images")
    if r["path"] == "plain":
        return head + " (the precision's own error; the other paths may have up to --half-tolerance x this + 0.5)."
    verdict = {True: "as accurate as plain diffusers", False: "LESS ACCURATE than plain diffusers",
               None: "not checked (no plain diffusers figure)"}[r.get("pixels_match")]
    plain = next((p for p in recs if p["path"] == "plain" and p["batch_size"] == r["batch_size"]), None)
    return (head + (f" (plain diffusers {plain['fp32_mean_diff']:.2f})" if plain and plain.get("fp32_mean_diff")
                    is not None else "") + f" -> {verdict}" + (f" ({r['errors']} error rows)" if r["errors"] else "")
            + ".")


def _busy_legend(recs: list[dict]) -> str:
    """What the busy column means for each kind of path in the table."""
    parts = []
    if any(r.get("device_busy") is not None for r in recs):
        work = "the GPU ran kernels or copies" if recs[0]["device"] == "cuda" else "the CPU was inside top-level aten ops"
        parts.append(f"plain diffusers and the actor: device busy, time {work} / wall time of one extra profiled pass")
    if any(r.get("actor_busy") is not None for r in recs):
        parts.append("Ray job: actor busy, the rows' gen_seconds / (actors x wall time from the first batch to the "
                     "last row committed)")
    return "busy: " + "; ".join(parts) + "."


def _busy(r: dict) -> float | None:
    """The busy figure a path has: device_busy in process, actor_busy for the Ray job."""
    v = r.get("device_busy") if r.get("device_busy") is not None else r.get("actor_busy")
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _label(r: dict) -> str:
    options = [("continuous batching" if r.get("batching") == "continuous" else None),
               (f"compile {r['compile']}" if r.get("compile") not in (None, "none") else None),
               ("channels_last" if r.get("channels_last") else None),
               ("fused QKV" if r.get("fuse_qkv") else None),
               (f"cache_interval {r['cache_interval']}" if (r.get("cache_interval") or 1) > 1 else None)]
    options = [o for o in options if o]
    return PATH_LABEL[r["path"]] + (f" ({', '.join(options)})" if options else "")


def markdown(records: list[dict], env: dict) -> str:
    lines = [f"# Throughput benchmark ({env['run_id']})", "",
             f"Machine: {env['device_name']} ({env['device']}), host {env['host']}; torch {env['torch_version']}, "
             f"diffusers {env['diffusers_version']}, ray {env['ray_version'] or '-'}; "
             f"commit {env['git_commit'] or '-'}.", ""]
    if env.get("load_avg_at_start") is not None:
        lines += [f"Load average (1 min) at start {env['load_avg_at_start']}, at end {env.get('load_avg_at_end')}, "
                  f"on {env['cpu_count']} cores.", ""]
    if env.get("command"):
        lines += [f"Command: `{env['command']}`", ""]
    by_model: dict[str, list[dict]] = {}
    for r in records:
        by_model.setdefault(r["model"], []).append(r)
    for model, recs in by_model.items():
        r0 = recs[0]
        lines += [f"## {model} ({r0['weights']} weights, {r0['pipeline']})", "",
                  f"{_configuration(r0)}, "
                  f"{r0['dtype']}. {_flops_note(recs)} (UNet step "
                  f"{r0['unet_step_flops'] / 1e12:.4g}, VAE decode {r0['vae_decode_flops'] / 1e12:.4g}, text "
                  f"{r0['text_flops'] / 1e12:.4g}); peak {_fmt(r0['peak_tflops'], '.4g')} TFLOP/s "
                  f"({r0['peak_source']}).",
                  ""]
        show_busy = any(_busy(r) is not None for r in recs)
        lines += ["| path | batch | images/s | s/image | MFU | peak mem | vs plain diffusers |" + (" busy |" * show_busy),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * show_busy)]
        lines += [_table_row(r, show_busy) for r in recs]
        lines.append("")
        if show_busy:
            lines += [_busy_legend(recs), ""]
        for r in recs:
            if r.get("device_busy") is not None:
                lines.append(f"- batch {r['batch_size']}: {_label(r)}: device busy {100 * r['device_busy']:.0f}% over "
                             f"a profiled pass of {r['profiled_s']:.1f} s (timed pass {r['seconds']:.1f} s).")
            if r.get("actor_busy") is not None:
                lines.append(f"- batch {r['batch_size']}: {_label(r)}: actor busy {100 * r['actor_busy']:.0f}% "
                             f"from the first batch to the last row committed.")
            if r["path"] == "ray" and r.get("ray_overhead_ratio") is not None:
                lines.append(f"- batch {r['batch_size']}: Ray job / actor loop = {r['ray_overhead_ratio']:.3f} end to "
                             f"end ({r['rows']} rows, {r['startup_s']:.1f} s from submit to the first batch), "
                             f"{r['ray_steady_ratio']:.3f} after start-up.")
            if r.get("warmup_s") is not None:
                lines.append(f"- batch {r['batch_size']}: {_label(r)} warm-up (model load, its warm-up call and "
                             f"compile if on, one batch) {r['warmup_s']:.1f} s, outside the timed passes.")
            if r.get("fp32_mean_diff") is not None:
                lines.append(_reference_line(r, recs))
            elif r.get("pixels_match") is not None:
                other = "plain diffusers" if r["path"] == "actor" else "the actor"
                lines.append(f"- batch {r['batch_size']}: {_label(r)} vs {other}: max pixel difference "
                             f"{_fmt(r['pixels_max_diff'], 'd')}/255 over {r['pixels_compared']} images -> "
                             f"{'same pixels' if r['pixels_match'] else 'MISMATCH'}"
                             + (f" ({r['errors']} error rows)" if r["errors"] else "") + ".")
        lines.append("")
    regressions = [r for r in records if r.get("regression")]
    if any("baseline_images_per_s" in r for r in records):
        lines += ["## Against history", ""]
        for r in records:
            if r.get("baseline_images_per_s") is not None:
                lines.append(f"- {r['model']} {_label(r)} batch {r['batch_size']}: {r['images_per_s']:.3g} "
                             f"images/s vs median {r['baseline_images_per_s']:.3g} of {r['baseline_runs']} runs"
                             + (" -> REGRESSION" if r.get("regression") else ""))
        lines += ["", f"Verdict: {'REGRESSION' if regressions else 'ok'}.", ""]
    return "\n".join(lines)


_NUMERIC = ["seconds", "warmup_s", "images_per_s", "s_per_image", "achieved_tflops", "mfu", "peak_mem_bytes", "peak_tflops",
            "flops_per_image", "vs_plain", "ray_overhead_ratio", "ray_steady_ratio", "startup_s",
            "steady_images_per_s", "pixels_max_diff", "pixels_compared", "fp32_mean_diff", "reference_images",
            "baseline_images_per_s", "baseline_runs",
            "device_busy", "profiled_s", "actor_busy"]


def records_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    for col in _NUMERIC:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("pixels_match", "regression"):
        if col in df:
            df[col] = df[col].astype("object")
    return df


def apply_history(records: list[dict], path: str, tolerance: float, window: int) -> bool:
    """Compare each record with the median images/s of the previous `window` runs of the
    same key, mark it, append all records to the history file. True if any regressed."""
    hist_path = Path(path)
    history = pd.read_parquet(hist_path) if hist_path.exists() else pd.DataFrame()
    if not history.empty:  # histories from before a key column existed ran its default
        if "sweep" not in history:
            history["sweep"] = "single"
        if "cache_interval" not in history:
            history["cache_interval"] = 1
        for col, default in (("batching", "config"), ("compile", "none"), ("channels_last", False),
                             ("fuse_qkv", False)):
            if col not in history and "path" in history:
                history[col] = pd.Series(np.where(history.path == "plain", None, default), dtype=object)
    regressed = False
    for rec in records:
        rec["baseline_images_per_s"], rec["baseline_runs"], rec["regression"] = None, 0, False
        if history.empty or not set(HISTORY_KEY) <= set(history.columns):
            continue
        mask = np.ones(len(history), dtype=bool)
        for k in HISTORY_KEY:
            col, want = history[k], rec.get(k)
            mask &= (col.isna() if want is None else col == want).to_numpy()
        prev = history[mask & (history.run_id != rec["run_id"]).to_numpy()]
        if prev.empty:
            continue
        last_runs = prev.sort_values("created_at").run_id.drop_duplicates(keep="last").tail(window)
        median = float(prev[prev.run_id.isin(last_runs)].groupby("run_id").images_per_s.mean().median())
        rec["baseline_images_per_s"], rec["baseline_runs"] = median, len(last_runs)
        rec["regression"] = rec["images_per_s"] < (1 - tolerance) * median
        regressed |= rec["regression"]
    new = records_frame(records)
    combined = new if history.empty else pd.concat([history, new], ignore_index=True)
    hist_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hist_path.with_name(f".{hist_path.name}.tmp")
    records_frame(combined.to_dict("records")).to_parquet(tmp, index=False)
    os.replace(tmp, hist_path)
    return regressed


def write_outputs(records: list[dict], env: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "records": records}
    (out_dir / "throughput.json").write_text(json.dumps(doc, indent=2, default=str))
    records_frame(records).to_parquet(out_dir / "throughput.parquet", index=False)
    (out_dir / "throughput.md").write_text(markdown(records, env))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        records, env = run_throughput(args)
        env["load_avg_at_end"] = _load_avg()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    regressed = apply_history(records, args.history, args.tolerance, args.window) if args.history else False
    out_dir = Path(args.out)
    write_outputs(records, env, out_dir)
    print(markdown(records, env))
    print(f"[benchmark] wrote {out_dir / 'throughput.md'}, .json, .parquet"
          + (f"; appended {len(records)} records to {args.history}" if args.history else ""), file=sys.stderr)
    if any(r.get("pixels_match") is False for r in records):
        print("[benchmark] pixel check FAILED (exit 4)", file=sys.stderr)
        return EXIT_PIXELS
    if regressed:
        print(f"[benchmark] throughput REGRESSION beyond {args.tolerance:.0%} (exit 3)", file=sys.stderr)
        return EXIT_REGRESSION
    return 0


if __name__ == "__main__":
    from jobs.benchmark import main as _main  # importable name, like jobs/generate.py

    sys.exit(_main())
