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
  actor   pipelines.generation.worker.GenerateActor called in-process on pandas batches (after one warm-up):
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

The work is pipelines/benchmarking/ (suite.py ties it together); the Ray Data path is
jobs/raydata/benchmark.py.

    python jobs/benchmark.py --suite quality --history bench/quality.parquet --plot --out bench/

`--suite quality` is the scheduled quality benchmark (jobs/quality_suite.py): --images
rows of one configuration (the model's defaults, or --scheduler/--steps/--guidance/--size)
through jobs/generate.py and jobs/evaluate.py, one record per run in the history, and a
verdict against the last good run of the same model on the same device: a metric worse
beyond interval overlap, or images/s below (1 - --tolerance) x the median of the last
--window good runs, is a regression (exit 3).

Exit codes: 0 ok; 2 bad input (unknown model, missing weights, bad flag);
3 regression (throughput: some path below (1 - --tolerance) x its history median;
quality: see above);
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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from any directory
    sys.path.insert(0, str(ROOT))

from jobs.cli import OneLineParser  # noqa: E402
from pipelines.benchmarking.history import apply_history  # noqa: E402
from pipelines.benchmarking.environment import load_avg  # noqa: E402
from pipelines.benchmarking.report import markdown, write_outputs  # noqa: E402
from pipelines.benchmarking.suite import PATHS, run_throughput  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.generation.speed import COMPILE_MODES  # noqa: E402

EXIT_REGRESSION = 3
EXIT_PIXELS = 4


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="jobs/benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="throughput", choices=["throughput", "quality"],
                   help="throughput (default): images/s of each path; quality: one fixed configuration generated and "
                        "evaluated, judged against the history (see jobs/quality_suite.py)")
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
                   help="append records here and check for regressions (quality: default OUT/quality_history.parquet)")
    p.add_argument("--images", type=int, default=64, help="quality: images generated and evaluated (default 64)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="quality: prompts, as make_manifest reads them (.txt one per line, .csv/.jsonl/.parquet with a "
                        "prompt column; default for embedded: 8 captions of its domain)")
    p.add_argument("--reference", default=None,
                   help="quality: evaluate's --reference (default for embedded: embedded:500)")
    p.add_argument("--plot", action="store_true", help="quality: draw the history to OUT/quality_history.png")
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
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with comma lists split and every value checked (argparse's exit 2 on a bad one)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.command = "python jobs/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.profile_busy is None:
        args.profile_busy = args.sweep == "mixed"
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    args.batching = [s.strip() for s in args.batching.split(",") if s.strip()]
    if not args.batching or not set(args.batching) <= {"config", "continuous"}:
        p.error(f"--batching: got {args.batching}; expected a comma list of config, continuous")
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
    for flag in ("rows", "steps", "window", "repeats", "cache_interval", "images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag} must be >= 1, got {v}")
    if not 0 <= args.tolerance < 1:
        p.error(f"--tolerance must be in [0, 1), got {args.tolerance}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "quality":
        from jobs.quality_suite import run_quality

        try:
            return run_quality(args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    ray_job = None
    if "ray" in args.paths:
        from jobs.raydata.benchmark import RayJobPath  # imports ray

        ray_job = RayJobPath()
    try:
        records, env = run_throughput(args, ray_job)
        env["load_avg_at_end"] = load_avg()
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
