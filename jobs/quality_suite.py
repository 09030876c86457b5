"""`jobs/benchmark.py --suite quality`: the scheduled quality benchmark.

One fixed configuration of one model (the model's defaults unless flags say otherwise),
generated and evaluated exactly as a user would (jobs/generate.py, then jobs/evaluate.py,
into OUT/RUN_ID/), one record per run appended to --history (git commit, versions,
hardware, configuration, metrics with intervals, throughput), and a verdict against the
last good run of the same model on the same device (pipelines/benchmarking/quality_history.py).
Exit 3 on a regression, so cron, the RayCronJob in cluster/ or CI can act on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from pipelines.benchmarking import environment, quality_history
from pipelines.errors import InputError
from pipelines.registry.models import ModelRegistry
from pipelines.sweep import read_prompts

EXIT_REGRESSION = 3


def manifest_rows(args, spec) -> list[dict]:
    """The fixed sweep: --images rows over the prompts, seeds 0, 1, ... per prompt."""
    if args.prompts:  # .txt, .csv, .jsonl or .parquet, as make_manifest reads them
        prompts = read_prompts(args.prompts, "--prompts").prompt.tolist()
    elif spec.name == "embedded":
        from evals.shapes import sample_captions

        prompts = sample_captions(8, seed=0)
    else:
        raise InputError(f"--prompts: model {spec.name!r} has no built-in prompt set; pass a text file, one per line")
    h, w = args.size or (spec.height, spec.width)
    steps, guidance = args.steps or spec.steps, spec.guidance if args.guidance is None else args.guidance
    return [dict(prompt=prompts[i % len(prompts)], seed=i // len(prompts), model=spec.name, scheduler=args.scheduler,
                 steps=steps, guidance=guidance, height=h, width=w) for i in range(args.images)]


def _reference(args, spec) -> str:
    if args.reference:
        return args.reference
    if spec.name == "embedded":
        return "embedded:500"
    raise InputError(f"--reference: model {spec.name!r} needs reference images or statistics (see jobs/evaluate.py)")


def run_quality(args) -> int:
    from jobs import evaluate, generate

    registry = ModelRegistry.with_user_file(args.models)
    spec = registry.get(args.model[0] if args.model else "embedded")
    rows, reference = manifest_rows(args, spec), _reference(args, spec)
    device_kind, device_name = environment.device()
    env = environment.describe(args, device_kind, device_name, with_ray=True)
    work = Path(args.out) / env["run_id"]
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    started = time.perf_counter()
    batch = str((args.batch_sizes or [8])[0])
    extra = ["--models", args.models] if args.models else []
    rc = generate.main([str(manifest), "--out", str(work / "results"), "--batch-size", batch, "--no-progress"] + extra)
    if rc:
        return rc
    generate_s = time.perf_counter() - started
    # The reference's features are cached beside the runs, keyed by everything that changes
    # them, so only the first run of a history pays for them.
    rc = evaluate.main([str(work / "results"), "--reference", reference, "--out", str(work / "report"),
                        "--cache", str(Path(args.out) / "_features"), "--no-progress"])
    if rc:
        return rc
    metrics = pd.read_parquet(work / "report" / "metrics.parquet")
    if len(metrics) != 1:
        raise InputError(f"the quality sweep should be one configuration; evaluate reported {len(metrics)}")
    m = metrics.iloc[0].to_dict()
    import transformers

    rec = dict(env, suite="quality", model=spec.name, scheduler=rows[0]["scheduler"], steps=int(m["steps"]),
               guidance=float(m["guidance"]), height=int(m["height"]), width=int(m["width"]), n=int(m["n"]),
               n_error=int(m["n_error"]), batch_size=int(batch), reference=m["reference"], extractor=m["extractor"],
               transformers_version=transformers.__version__, images_per_s=float(m["images_per_gpu_second"]),
               generate_wall_s=round(generate_s, 2), wall_s=round(time.perf_counter() - started, 2),
               load_avg_at_end=environment.load_avg(), **quality_history.metric_fields(m))
    history_path = Path(args.history) if args.history else Path(args.out) / "quality_history.parquet"
    history = quality_history.read_history(history_path)
    lines = quality_history.judge(rec, history, args.tolerance, args.window)
    history = quality_history.append(rec, history, history_path)
    print("\n".join(lines))
    print(f"[benchmark] run {rec['run_id']} in {work}; appended to {history_path}", file=sys.stderr)
    if args.plot:
        png = quality_history.plot(history, rec, Path(args.out) / "quality_history.png")
        print(f"[benchmark] history plot: {png}", file=sys.stderr)
    return EXIT_REGRESSION if rec["regression"] else 0

