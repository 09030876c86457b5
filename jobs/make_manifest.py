#!/usr/bin/env python
"""Sweep spec -> manifest: the cross product of prompts x seeds x models x schedulers x
steps x guidance x sizes (x cache intervals), one row per image, ordered by run key, with stable sample_ids.

    python jobs/make_manifest.py --spec sweep.yaml --out manifest.parquet
    python jobs/make_manifest.py --prompts prompts.txt --schedulers ddim,euler --steps 10,25 \\
        --guidance 1,7.5 --seeds-per-prompt 4 --out manifest.parquet

Seeds are shared across configurations (seed k of a prompt is the same in every
configuration), so configurations are compared on the same starting noise.

A negative prompt goes only to rows whose pipeline reads it: rows at guidance <= 1 on SD, SDXL
and SD3 (no classifier-free guidance runs, so no unconditional pass) and at true_cfg_scale <= 1
on FLUX get negative_prompt '' (the image is the same with or without it, and the sample_id then
says so), and one stderr line says how many; a negative prompt no row reads is refused.

Every spec key and flag is type- and range-checked before anything is built, and a sweep
whose cross product exceeds --max-rows is refused with the row count it would make; on
bad input the exit code is 2, one `error:` line names each key or flag, the value and what
is allowed, and nothing is written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import OneLineParser, at_least  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.registry.models import ModelRegistry  # noqa: E402
from pipelines.safe_yaml import describe, load_yaml, short_repr  # noqa: E402
from pipelines.contract import RUN_KEY  # noqa: E402
from pipelines.sweep import DEFAULT_MAX_ROWS, MAX_PROBLEMS, SPEC_KEYS, build_manifest, check_spec, labels_for  # noqa: E402

# spec key -> the flag that sets it
FLAGS = {
    "prompts": "--prompts", "negative_prompt": "--negative-prompt", "models": "--models", "schedulers": "--schedulers",
    "steps": "--steps", "guidance": "--guidance", "sizes": "--sizes", "cache_intervals": "--cache-intervals",
    "quants": "--quants",
    "loras": "--loras", "lora_scales": "--lora-scales",
    "seeds_per_prompt": "--seeds-per-prompt", "seed": "--seed",
}


def _flag_values(text: str, flag: str, kind, expected: str, bad: list) -> list:
    values = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            values.append(kind(piece))
        except ValueError:
            bad.append(f"{flag}: got {short_repr(piece)}; expected {expected}")
    if not values and not any(b.startswith(flag + ":") for b in bad):
        bad.append(f"{flag}: got {short_repr(text)}; expected {expected}")
    return values


def _flag_int(text: str, flag: str, expected: str, bad: list):
    try:
        return int(text.strip())
    except ValueError:
        bad.append(f"{flag}: got {short_repr(text)}; expected {expected}")
        return None


def parse_args(argv=None):
    p = OneLineParser(prog="jobs/make_manifest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", help="YAML sweep spec (keys: " + ", ".join(sorted(SPEC_KEYS)) + "); flags override it")
    p.add_argument("--prompts", help=".txt/.csv/.jsonl/.parquet file of prompts")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--models", help="comma-separated model names (default: embedded)")
    p.add_argument("--models-file", help="YAML of extra models, as for jobs/generate.py --models")
    p.add_argument("--schedulers", help="comma-separated scheduler names (default: each model's own)")
    p.add_argument("--steps", help="comma-separated step counts")
    p.add_argument("--guidance", help="comma-separated guidance scales")
    p.add_argument("--sizes", help="comma-separated sizes, N or HxW")
    p.add_argument("--cache-intervals", help="comma-separated DeepCache intervals (1 = off, the default): the UNet's "
                                             "deep features are recomputed every N-th step and reused in between")
    p.add_argument("--quants", help="comma-separated weight quantization schemes (none, the default; int8wo, int8, "
                                    "intx4wo, fp8wo on CPU and GPU; int4wo, fp8, nf4 on a GPU)")
    p.add_argument("--loras", help="comma-separated adapter names from the registry's loras: section "
                                   "(none = no adapter; a+b stacks two)")
    p.add_argument("--lora-scales", help="comma-separated adapter strengths, e.g. 0,0.5,1")
    p.add_argument("--seeds-per-prompt", default=None, help="seeds 0..N-1 (plus --seed) for every prompt (default 1)")
    p.add_argument("--seed", default=None, help="first seed (default 0)")
    p.add_argument("--max-rows", type=at_least(1, int), default=DEFAULT_MAX_ROWS,
                   help=f"refuse a sweep of more rows than this (default {DEFAULT_MAX_ROWS:,})")
    p.add_argument("--out", required=True, help="manifest Parquet file to write")
    return p.parse_args(argv)


def spec_from_args(args) -> tuple[dict, dict]:
    """The sweep spec (the --spec file, overridden by flags) and the labels that name each key's origin."""
    spec = {}
    if args.spec:
        spec = load_yaml(args.spec, "--spec")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise InputError(f"--spec {args.spec}: got {describe(spec)}; expected a mapping of sweep keys "
                             f"({', '.join(sorted(SPEC_KEYS))})")
        spec = dict(spec)
        prompts = spec.get("prompts")
        if isinstance(prompts, str) and prompts.strip() and not Path(prompts).is_absolute():
            # a prompts file named in a spec is found beside the spec (like a models YAML's
            # paths), so a spec and its prompts move together and work from any directory
            spec["prompts"] = str(Path(args.spec).parent / prompts)
    flags, bad = set(), []

    def put(key, value):
        spec[key] = value
        flags.add(key)

    if args.prompts:
        put("prompts", args.prompts)
    if args.prompt:
        put("prompts", args.prompt)
    integers = "comma-separated integers, e.g. 10,25"
    if args.steps is not None:
        put("steps", _flag_values(args.steps, "--steps", int, integers, bad))
    if args.cache_intervals is not None:
        put("cache_intervals", _flag_values(args.cache_intervals, "--cache-intervals", int, integers, bad))
    if args.guidance is not None:
        put("guidance", _flag_values(args.guidance, "--guidance", float, "comma-separated numbers, e.g. 1,7.5", bad))
    if args.lora_scales is not None:
        put("lora_scales", _flag_values(args.lora_scales, "--lora-scales", float, "comma-separated numbers, e.g. 0,1",
                                        bad))
    for key in ("models", "schedulers", "sizes", "quants", "loras"):
        if getattr(args, key) is not None:
            put(key, [v.strip() for v in getattr(args, key).split(",") if v.strip()])
    if args.seeds_per_prompt is not None:
        put("seeds_per_prompt", _flag_int(args.seeds_per_prompt, "--seeds-per-prompt", "an integer >= 1", bad))
    if args.seed is not None:
        put("seed", _flag_int(args.seed, "--seed", "an integer >= 0", bad))
    if args.negative_prompt is not None:
        put("negative_prompt", args.negative_prompt)
    if bad:
        raise InputError(("{} problems: ".format(len(bad)) if len(bad) > 1 else "") + "; ".join(bad[:MAX_PROBLEMS]))
    labels = labels_for(args.spec, flags, FLAGS)
    if args.prompt:
        labels["prompts"] = "--prompt"
    return spec, labels


def write_atomically(table: pa.Table, out: Path) -> None:
    """Readers see the whole manifest or none: written under a hidden name, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed), or --help
        return e.code if isinstance(e.code, int) else 2
    out = Path(args.out)
    try:
        if not args.out.strip() or out.is_dir():
            raise InputError(f"--out {args.out!r}: expected the path of a Parquet file to write"
                             + (", not a directory" if out.is_dir() else ""))
        spec, labels = spec_from_args(args)
        registry = ModelRegistry.with_user_file(args.models_file)
        sweep = check_spec(spec, registry, labels)
        notes: list[str] = []
        manifest = build_manifest(sweep, registry, max_rows=args.max_rows, notes=notes)
        try:
            write_atomically(manifest, out)
        except OSError as e:
            raise InputError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(note, file=sys.stderr)
    configs = manifest.select(RUN_KEY).to_pandas().drop_duplicates()
    print(f"wrote {args.out}: {manifest.num_rows:,} rows, {len(configs):,} configurations ({sweep.factors()})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
