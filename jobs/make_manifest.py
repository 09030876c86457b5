#!/usr/bin/env python
"""Sweep spec -> manifest: the cross product of prompts x seeds x models x schedulers x
steps x guidance x sizes (x cache intervals), one row per image, ordered by run key, with stable sample_ids.

    python jobs/make_manifest.py --spec sweep.yaml --out manifest.parquet
    python jobs/make_manifest.py --prompts prompts.txt --schedulers ddim,euler --steps 10,25 \\
        --guidance 1,7.5 --seeds-per-prompt 4 --out manifest.parquet

Seeds are shared across configurations (seed k of a prompt is the same in every
configuration), so configurations are compared on the same starting noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from pipelines.errors import InputError  # noqa: E402
from pipelines.models import ModelRegistry  # noqa: E402
from pipelines.schema import RUN_KEY, order_by_run_key, validate_manifest  # noqa: E402

SPEC_KEYS = {"prompts", "negative_prompt", "models", "schedulers", "steps", "guidance", "sizes", "cache_intervals",
             "seeds_per_prompt", "seed"}


def read_prompts(source) -> pd.DataFrame:
    """Prompts (plus any per-prompt columns) from a list or a .txt/.csv/.jsonl/.parquet file."""
    if isinstance(source, list):
        return pd.DataFrame({"prompt": [str(p) for p in source]})
    path = Path(source)
    if not path.is_file():
        raise InputError(f"prompts: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            df = pd.DataFrame({"prompt": [line for line in lines if line and not line.startswith("#")]})
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise InputError(f"prompts: {path} has suffix {suffix!r}; expected .txt, .csv, .jsonl or .parquet")
    except (UnicodeDecodeError, ValueError, pa.ArrowException) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"prompts: cannot read {path}: {str(e).splitlines()[0]}") from None
    if "prompt" not in df.columns:
        raise InputError(f"prompts: {path} has no 'prompt' column (columns: {list(df.columns)})")
    if df.empty:
        raise InputError(f"prompts: {path} holds no prompts")
    return df.reset_index(drop=True)


def parse_size(value) -> tuple[int, int]:
    """64, "64", "512x768" (height x width) or [512, 768]."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    text = str(value).lower()
    try:
        if "x" in text:
            h, w = text.split("x")
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise InputError(f"sizes: {value!r} is not a size; expected N or HxW (e.g. 512 or 512x768)") from None


def build_manifest(spec: dict, registry: ModelRegistry) -> pa.Table:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise InputError(f"sweep spec: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if "prompts" not in spec:
        raise InputError("sweep spec: 'prompts' is required (a list, or a .txt/.csv/.jsonl/.parquet file)")
    prompts = read_prompts(spec["prompts"])
    n_seeds = spec.get("seeds_per_prompt", 1)
    if not isinstance(n_seeds, int) or n_seeds < 1:
        raise InputError(f"sweep spec: seeds_per_prompt {n_seeds!r}: expected an integer >= 1")
    base_seed = spec.get("seed", 0)
    models = _list(spec.get("models"), [None])
    axes = {
        "scheduler": _list(spec.get("schedulers"), [None]),
        "steps": _list(spec.get("steps"), [None]),
        "guidance": _list(spec.get("guidance"), [None]),
        "size": [parse_size(s) for s in _list(spec.get("sizes"), [])] or [None],
        "cache_interval": _list(spec.get("cache_intervals"), [None]),
    }
    rows = []
    for model, sched, steps, guidance, size, interval in itertools.product(models, *axes.values()):
        for p in prompts.itertuples(index=False):
            for k in range(n_seeds):
                row = {**p._asdict(), "seed": base_seed + k, "model": model, "scheduler": sched, "steps": steps,
                       "guidance": None if guidance is None else float(guidance),
                       "height": size[0] if size else None, "width": size[1] if size else None,
                       "cache_interval": None if interval is None else int(interval)}
                if spec.get("negative_prompt") is not None and "negative_prompt" not in row:
                    row["negative_prompt"] = spec["negative_prompt"]
                rows.append(row)
    df = pd.DataFrame(rows)
    table = pa.Table.from_pandas(df, preserve_index=False)
    manifest = validate_manifest(table, registry, source="sweep spec")
    return order_by_run_key(manifest)


def _list(value, default):
    if value is None:
        return default
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _numbers(text: str, kind):
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jobs/make_manifest.py", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--seeds-per-prompt", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--out", required=True, help="manifest Parquet file to write")
    args = p.parse_args(argv)
    try:
        spec = {}
        if args.spec:
            try:
                spec = yaml.safe_load(Path(args.spec).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise InputError(f"--spec {args.spec}: {str(e).splitlines()[0]}") from None
            if not isinstance(spec, dict):
                raise InputError(f"--spec {args.spec}: expected a mapping of sweep keys")
        if args.prompts:
            spec["prompts"] = args.prompts
        if args.prompt:
            spec["prompts"] = args.prompt
        for key, kind in (("steps", int), ("guidance", float), ("cache_intervals", int)):
            if getattr(args, key):
                spec[key] = _numbers(getattr(args, key), kind)
        for key in ("models", "schedulers", "sizes"):
            if getattr(args, key):
                spec[key] = _list(getattr(args, key), [])
        if args.seeds_per_prompt is not None:
            spec["seeds_per_prompt"] = args.seeds_per_prompt
        if args.seed is not None:
            spec["seed"] = args.seed
        if args.negative_prompt is not None:
            spec["negative_prompt"] = args.negative_prompt
        manifest = build_manifest(spec, ModelRegistry.with_user_file(args.models_file))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(manifest, args.out)
    configs = manifest.select(RUN_KEY).to_pandas().drop_duplicates()
    print(f"wrote {args.out}: {manifest.num_rows} rows, {len(configs)} configurations", file=sys.stderr)
    print(json.dumps({"rows": manifest.num_rows, "configurations": len(configs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
