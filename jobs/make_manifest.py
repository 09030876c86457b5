#!/usr/bin/env python
"""Sweep spec -> manifest: the cross product of prompts x seeds x models x schedulers x
steps x guidance x sizes (x cache intervals), one row per image, ordered by run key, with stable sample_ids.

    python jobs/make_manifest.py --spec sweep.yaml --out manifest.parquet
    python jobs/make_manifest.py --prompts prompts.txt --schedulers ddim,euler --steps 10,25 \\
        --guidance 1,7.5 --seeds-per-prompt 4 --out manifest.parquet

Seeds are shared across configurations (seed k of a prompt is the same in every
configuration), so configurations are compared on the same starting noise.

Every spec key and flag is type- and range-checked before anything is built, and a sweep
whose cross product exceeds --max-rows is refused with the row count it would make; on
bad input the exit code is 2, one `error:` line names each key or flag, the value and what
is allowed, and nothing is written.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import OneLineParser, at_least  # noqa: E402
from pipelines.errors import InputError  # noqa: E402
from pipelines.registry.models import ModelRegistry  # noqa: E402
from pipelines.safe_yaml import describe, load_yaml, short_repr  # noqa: E402
from pipelines.registry.schedulers import SCHEDULERS  # noqa: E402
from pipelines.contract import MANIFEST_SCHEMA, MAX_SIDE, MAX_STEPS, RUN_KEY, SEED_LIMIT  # noqa: E402
from pipelines.schema import order_by_run_key, validate_manifest  # noqa: E402

# spec key -> the flag that sets it
FLAGS = {
    "prompts": "--prompts", "negative_prompt": "--negative-prompt", "models": "--models", "schedulers": "--schedulers",
    "steps": "--steps", "guidance": "--guidance", "sizes": "--sizes", "cache_intervals": "--cache-intervals",
    "seeds_per_prompt": "--seeds-per-prompt", "seed": "--seed",
}
SPEC_KEYS = set(FLAGS)
DEFAULT_MAX_ROWS = 1_000_000
MAX_PROBLEMS = 20
# the columns the sweep sets; a prompts file's columns of these names are replaced
SWEEP_COLUMNS = ["seed", "model", "scheduler", "steps", "guidance", "height", "width", "cache_interval"]


def read_prompts(source, label: str = "prompts") -> pd.DataFrame:
    """Prompts (plus any per-prompt columns) from a list of strings or a .txt/.csv/.jsonl/.parquet file."""
    if isinstance(source, list):
        return pd.DataFrame({"prompt": source})
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{label}: file {str(path)!r} does not exist")
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
            raise InputError(f"{label}: {path} has suffix {suffix!r}; expected .txt, .csv, .jsonl or .parquet")
    except (UnicodeDecodeError, ValueError, pa.ArrowException) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{label}: cannot read {path}: {str(e).splitlines()[0]}") from None
    if "prompt" not in df.columns:
        raise InputError(f"{label}: {path} has no 'prompt' column (columns: {short_repr(list(df.columns))})")
    if df.empty:
        raise InputError(f"{label}: {path} holds no prompts")
    return df.reset_index(drop=True)


_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def parse_size(value) -> tuple[int, int] | None:
    """64, "64", "512x768" (height x width) or [512, 768]; None if it is none of these."""
    if _is_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        return value[0], value[1]
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m:
        return int(m.group(1)), int(m.group(2) or m.group(1))
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------- the spec


@dataclass
class Sweep:
    """A checked sweep: what the cross product is made of."""

    prompts: pd.DataFrame
    n_seeds: int
    seed: int
    negative_prompt: str | None
    axes: dict  # manifest column (or "size") -> values; [None] = the model's default

    @property
    def configurations(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n_seeds * self.configurations

    def factors(self) -> str:
        parts = [f"{len(self.prompts):,} prompts", f"{self.n_seeds:,} seeds"]
        names = {"model": "models", "scheduler": "schedulers", "steps": "step counts", "guidance": "guidance scales",
                 "size": "sizes", "cache_interval": "cache intervals"}
        parts += [f"{len(v):,} {names[k]}" for k, v in self.axes.items() if len(v) > 1]
        return " x ".join(parts)


class _Problems:
    def __init__(self, labels: dict):
        self.labels, self.items = labels, []

    def add(self, key: str, value, expected: str, got: str | None = None):
        self.items.append(f"{self.labels[key]}: got {got if got is not None else describe(value)}; expected {expected}")

    def raise_if_any(self):
        if self.items:
            shown = "; ".join(self.items[:MAX_PROBLEMS])
            more = f"; ... and {len(self.items) - MAX_PROBLEMS} more" if len(self.items) > MAX_PROBLEMS else ""
            head = f"{len(self.items)} problems: " if len(self.items) > 1 else ""
            raise InputError(head + shown + more)


def _labels(spec_path: str | None, from_flags: set) -> dict:
    where = f"--spec {spec_path}, key " if spec_path else "sweep spec, key "
    return {k: FLAGS[k] if k in from_flags else f"{where}{k!r}" for k in SPEC_KEYS} | {"*": (
        f"--spec {spec_path}" if spec_path else "sweep spec")}


def check_spec(spec: dict, registry: ModelRegistry, labels: dict | None = None) -> Sweep:
    """Every key's type and range; the prompts read. InputError naming each bad key and value."""
    labels = labels or _labels(None, set())
    bad = _Problems(labels)
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise InputError(f"{labels['*']}: unknown keys {short_repr(sorted(map(str, unknown)))}; "
                         f"allowed: {sorted(SPEC_KEYS)}")
    spec = {k: v for k, v in spec.items() if v is not None}  # null = not given: the default

    def items(key: str, split: bool) -> list | None:
        """A key's values: a list, a single value, or (names and sizes) a comma-separated string."""
        if key not in spec:
            return None
        v = spec[key]
        if isinstance(v, dict):
            bad.add(key, v, "a list of values (or a single value)")
            return None
        values = v if isinstance(v, list) else ([s.strip() for s in v.split(",")] if split and isinstance(v, str) else [v])
        if split and isinstance(v, str):
            values = [s for s in values if s]
        if not values:
            bad.add(key, v, "at least one value (leave the key out for each model's default)")
            return None
        return values

    def axis(key: str, split: bool, check, expected: str) -> list:
        values = items(key, split)
        if values is None:
            return [None]
        out, seen = [], {}
        for v in values:
            norm = check(v)
            if norm is None:
                bad.add(key, v, expected)
            elif norm in seen:
                bad.add(key, v, "each value once", got=f"{short_repr(v)} twice")
            else:
                seen[norm] = v
                out.append(norm)
        return out or [None]

    models = axis("models", True, lambda v: v if isinstance(v, str) and v in registry else None,
                  "a registered model (" + ", ".join(registry.names()) + ")")
    schedulers = axis("schedulers", True, lambda v: v if isinstance(v, str) and v in SCHEDULERS else None,
                      "a scheduler name (" + ", ".join(SCHEDULERS) + ")")
    steps = axis("steps", False, lambda v: v if _is_int(v) and 1 <= v <= MAX_STEPS else None,
                 f"integers in [1, {MAX_STEPS}], e.g. [10, 25]")
    guidance = axis("guidance", False,
                    lambda v: float(v) if _is_number(v) and math.isfinite(v) and v >= 0 else None,
                    "finite numbers >= 0, e.g. [1.0, 7.5] (<= 1 disables classifier-free guidance)")

    def size(v):
        hw = parse_size(v)
        return hw if hw and all(8 <= s <= MAX_SIDE for s in hw) else None

    sizes = axis("sizes", True, size, f"sizes N or HxW (e.g. 512 or 512x768), each side in [8, {MAX_SIDE}]")
    intervals = axis("cache_intervals", False, lambda v: v if _is_int(v) and 1 <= v <= MAX_STEPS else None,
                     f"integers in [1, {MAX_STEPS}] (1 = no feature reuse)")

    n_seeds = spec.get("seeds_per_prompt", 1)
    if not (_is_int(n_seeds) and n_seeds >= 1):
        bad.add("seeds_per_prompt", n_seeds, "an integer >= 1")
        n_seeds = 1
    seed = spec.get("seed", 0)
    if not (_is_int(seed) and 0 <= seed and seed + n_seeds - 1 < SEED_LIMIT):
        bad.add("seed", seed, "an integer >= 0 with seed + seeds_per_prompt - 1 < 2**63")
        seed = 0
    negative = spec.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        bad.add("negative_prompt", negative, "a string")
        negative = None

    prompts = None
    source = spec.get("prompts")
    if source is None:
        bad.items.append(f"{labels['prompts']}: required (a list of prompts, or a .txt/.csv/.jsonl/.parquet file)")
    elif isinstance(source, list):
        wrong = [(i, p) for i, p in enumerate(source) if not isinstance(p, str) or not p.strip()]
        for i, p in wrong[:3]:
            bad.add("prompts", p, "a non-empty string (quote numbers, e.g. '1984')", got=f"item {i}: {describe(p)}")
        if len(wrong) > 3:
            bad.items.append(f"{labels['prompts']}: {len(wrong) - 3} more items that are not non-empty strings")
        if not source:
            bad.add("prompts", source, "at least one prompt")
        elif not wrong:
            prompts = source
    elif not isinstance(source, str) or not source.strip():
        bad.add("prompts", source, "a list of prompts, or the path of a .txt/.csv/.jsonl/.parquet file")
    else:
        prompts = source
    bad.raise_if_any()
    return Sweep(
        prompts=read_prompts(prompts, labels["prompts"]), n_seeds=n_seeds, seed=seed, negative_prompt=negative,
        axes={"model": models, "scheduler": schedulers, "steps": steps, "guidance": guidance, "size": sizes,
              "cache_interval": intervals},
    )


def build_manifest(spec: dict | Sweep, registry: ModelRegistry, max_rows: int = DEFAULT_MAX_ROWS,
                   labels: dict | None = None) -> pa.Table:
    """The validated manifest of the sweep; refused before anything is built if it exceeds max_rows."""
    sweep = spec if isinstance(spec, Sweep) else check_spec(spec, registry, labels)
    if sweep.rows > max_rows:
        raise InputError(f"the sweep would make {sweep.rows:,} rows ({sweep.factors()}), more than --max-rows "
                         f"{max_rows:,}; shrink the sweep or raise --max-rows")
    n_p, n_s = len(sweep.prompts), sweep.n_seeds
    configs = list(itertools.product(*sweep.axes.values()))
    config_idx = pa.array(np.repeat(np.arange(len(configs)), n_p * n_s))
    try:
        table = pa.Table.from_pandas(sweep.prompts, preserve_index=False).replace_schema_metadata(None)
    except pa.ArrowException as e:
        raise InputError(f"prompts: a column cannot be stored ({str(e).splitlines()[0]})") from None
    table = table.take(pa.array(np.tile(np.repeat(np.arange(n_p), n_s), len(configs))))
    table = table.drop_columns([c for c in SWEEP_COLUMNS if c in table.column_names])
    columns = {"seed": pa.array(np.tile(np.arange(n_s, dtype=np.int64) + sweep.seed, n_p * len(configs)))}
    by_axis = dict(zip(sweep.axes, zip(*configs)))
    sizes = by_axis.pop("size")
    by_axis["height"] = [s and s[0] for s in sizes]
    by_axis["width"] = [s and s[1] for s in sizes]
    for col, values in by_axis.items():
        columns[col] = pa.array(list(values), type=MANIFEST_SCHEMA.field(col).type).take(config_idx)
    if sweep.negative_prompt is not None and "negative_prompt" not in table.column_names:
        columns["negative_prompt"] = pa.array([sweep.negative_prompt] * table.num_rows, type=pa.string())
    for col, values in columns.items():
        table = table.append_column(col, values)
    manifest = validate_manifest(table, registry, source="sweep spec")
    return order_by_run_key(manifest)


# ----------------------------------------------------------------------------------- flags


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
    for key in ("models", "schedulers", "sizes"):
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
    labels = _labels(args.spec, flags)
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
        manifest = build_manifest(sweep, registry, max_rows=args.max_rows)
        try:
            write_atomically(manifest, out)
        except OSError as e:
            raise InputError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = manifest.select(RUN_KEY).to_pandas().drop_duplicates()
    print(f"wrote {args.out}: {manifest.num_rows:,} rows, {len(configs):,} configurations ({sweep.factors()})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
