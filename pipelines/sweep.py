"""Sweep spec -> manifest: the cross product of prompts x seeds x every swept column.

A sweep spec is a mapping of spec keys (the contract's `sweep` names: models, schedulers,
steps, guidance, sizes, cache_intervals, ... plus prompts, negative_prompt,
seeds_per_prompt and seed). Every key is type- and range-checked before anything is
built, with the contract's ranges; the cross product is built column-wise and validated
like any manifest. jobs/make_manifest.py is the command line around it.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.contract import COLUMN, COLUMNS, MANIFEST_SCHEMA, SEED_LIMIT, Column
from pipelines.errors import InputError
from pipelines.registry.models import ModelRegistry
from pipelines.registry.schedulers import SCHEDULERS
from pipelines.safe_yaml import describe, short_repr
from pipelines.registry.quant import SCHEMES
from pipelines.validation import order_by_run_key, validate_manifest

# The keys of a sweep spec: the contract's swept columns, plus how prompts and seeds are given.
SPEC_KEYS = {c.sweep for c in COLUMNS if c.sweep and c.name != "seed"} | {
    "prompts", "negative_prompt", "seeds_per_prompt", "seed"}
DEFAULT_MAX_ROWS = 1_000_000
MAX_PROBLEMS = 20
_AXIS_NAMES = {"model": "models", "scheduler": "schedulers", "steps": "step counts", "guidance": "guidance scales",
               "size": "sizes", "cache_interval": "cache intervals", "quant": "quantization schemes",
               "lora": "adapters", "lora_scale": "adapter scales"}


def _value_check(c: Column) -> tuple:
    """(check, expected) for one value of a swept column, from the contract's kind and range."""
    example = f", e.g. {list(c.example)}" if c.example else ""
    doc = f" ({c.doc})" if c.doc else ""
    if c.kind == "string":
        return (lambda v: v if isinstance(v, str) and v.strip() else None), f"non-empty strings{example}{doc}"
    if c.kind == "integer":
        expected = f"integers in [{c.lo}, {c.hi}]{example}{doc}"
        return (lambda v: v if _is_int(v) and c.lo <= v <= c.hi else None), expected
    expected = f"finite numbers >= {c.lo:g}{example}{doc}"
    return (lambda v: float(v) if _is_number(v) and math.isfinite(v) and v >= c.lo
            and (c.hi is None or v <= c.hi) else None), expected


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
    labels: dict = field(default_factory=dict)  # spec key -> how messages name it

    @property
    def configurations(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n_seeds * self.configurations

    def factors(self) -> str:
        parts = [f"{len(self.prompts):,} prompts", f"{self.n_seeds:,} seeds"]
        parts += [f"{len(v):,} {_AXIS_NAMES.get(k, k + ' values')}" for k, v in self.axes.items() if len(v) > 1]
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


def labels_for(spec_path: str | None, from_flags: set, flags: dict) -> dict:
    """How each spec key is named in messages: the flag that set it, or the spec file's key."""
    where = f"--spec {spec_path}, key " if spec_path else "sweep spec, key "
    return {k: flags[k] if k in from_flags else f"{where}{k!r}" for k in SPEC_KEYS} | {"*": (
        f"--spec {spec_path}" if spec_path else "sweep spec")}


def check_spec(spec: dict, registry: ModelRegistry, labels: dict | None = None) -> Sweep:
    """Every key's type and range; the prompts read. InputError naming each bad key and value."""
    labels = labels or labels_for(None, set(), {})
    bad = _Problems(labels)
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise InputError(f"{labels['*']}: unknown keys {short_repr(sorted(map(str, unknown)))}; "
                         f"allowed: {sorted(SPEC_KEYS)}")
    spec = {k: v for k, v in spec.items() if v is not None}  # null = not given: the default
    axes = _axes(_Values(spec, bad), registry)
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
    prompts = _prompts(spec.get("prompts"), bad)
    bad.raise_if_any()
    return Sweep(prompts=read_prompts(prompts, labels["prompts"]), n_seeds=n_seeds, seed=seed,
                 negative_prompt=negative, axes=axes, labels=labels)


class _Values:
    """A spec's swept keys read as lists of checked, distinct values; problems go to `bad`."""

    def __init__(self, spec: dict, bad: _Problems):
        self.spec, self.bad = spec, bad

    def items(self, key: str, split: bool) -> list | None:
        """A key's values: a list, a single value, or (names and sizes) a comma-separated string."""
        if key not in self.spec:
            return None
        v = self.spec[key]
        if isinstance(v, dict):
            self.bad.add(key, v, "a list of values (or a single value)")
            return None
        values = v if isinstance(v, list) else ([s.strip() for s in v.split(",")] if split and isinstance(v, str) else [v])
        if split and isinstance(v, str):
            values = [s for s in values if s]
        if not values:
            self.bad.add(key, v, "at least one value (leave the key out for each model's default)")
            return None
        return values

    def axis(self, key: str, split: bool, check, expected: str) -> list:
        """The checked values of one axis; [None] (each model's default) when the key is not given."""
        values = self.items(key, split)
        if values is None:
            return [None]
        out, seen = [], {}
        for v in values:
            norm = check(v)
            if norm is None:
                self.bad.add(key, v, expected)
            elif norm in seen:
                self.bad.add(key, v, "each value once", got=f"{short_repr(v)} twice")
            else:
                seen[norm] = v
                out.append(norm)
        return out or [None]


def _axes(values: _Values, registry: ModelRegistry) -> dict:
    """Manifest column (or "size": height and width together) -> the values swept over."""
    axes = {"model": values.axis("models", True, lambda v: v if isinstance(v, str) and v in registry else None,
                                 "a registered model (" + ", ".join(registry.names()) + ")"),
            "scheduler": values.axis("schedulers", True, lambda v: v if isinstance(v, str) and v in SCHEDULERS else None,
                                     "a scheduler name (" + ", ".join(SCHEDULERS) + ")")}
    side = COLUMN["height"]

    def size(v):
        hw = parse_size(v)
        return hw if hw and all(side.lo <= s <= side.hi for s in hw) else None

    for c in COLUMNS:  # every other swept column, its values checked against the contract's range
        if c.name == "height":
            axes["size"] = values.axis("sizes", True, size, f"sizes N or HxW (e.g. 512 or 512x768), each side in "
                                                            f"[{side.lo}, {side.hi}]")
        elif c.name == "quant":
            axes[c.name] = values.axis(c.sweep, True, lambda v: v if isinstance(v, str) and v in SCHEMES else None,
                                       "quantization schemes (" + ", ".join(SCHEMES) + ")")
        elif c.name == "lora":  # adapter names from the registry only ('none': no adapter; 'a+b': stacked)
            names = lambda v: [i.partition("@")[0] for i in v.split("+")] if isinstance(v, str) else [None]  # noqa: E731
            axes["lora"] = values.axis("loras", True, lambda v: v if v == "none" or all(
                n in registry.loras for n in names(v)) else None, "registered adapter names (none, "
                + ", ".join(sorted(registry.loras)) + "; 'a+b' stacks adapters)")
        elif c.sweep and c.name not in ("seed", "model", "scheduler", "width"):
            axes[c.name] = values.axis(c.sweep, c.kind == "string", *_value_check(c))
    return axes


def _prompts(source, bad: _Problems):
    """The prompts key checked: a list of non-empty strings or a file path (read later); None if bad."""
    if source is None:
        bad.items.append(f"{bad.labels['prompts']}: required (a list of prompts, or a .txt/.csv/.jsonl/.parquet file)")
    elif isinstance(source, list):
        wrong = [(i, p) for i, p in enumerate(source) if not isinstance(p, str) or not p.strip()]
        for i, p in wrong[:3]:
            bad.add("prompts", p, "a non-empty string (quote numbers, e.g. '1984')", got=f"item {i}: {describe(p)}")
        if len(wrong) > 3:
            bad.items.append(f"{bad.labels['prompts']}: {len(wrong) - 3} more items that are not non-empty strings")
        if not source:
            bad.add("prompts", source, "at least one prompt")
        elif not wrong:
            return source
    elif not isinstance(source, str) or not source.strip():
        bad.add("prompts", source, "a list of prompts, or the path of a .txt/.csv/.jsonl/.parquet file")
    else:
        return source
    return None


def build_manifest(spec: dict | Sweep, registry: ModelRegistry, max_rows: int = DEFAULT_MAX_ROWS,
                   labels: dict | None = None, notes: list | None = None) -> pa.Table:
    """The validated manifest of the sweep; refused before anything is built if it exceeds max_rows.
    One-line notes for the user (negative prompts left out, see `drop_unused_negatives`) go to `notes`."""
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
    table = table.drop_columns([c.name for c in COLUMNS if c.sweep and c.name in table.column_names])
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
    table = drop_unused_negatives(table, registry, sweep, notes if notes is not None else [])
    manifest = validate_manifest(table, registry, source="sweep spec")
    return order_by_run_key(manifest)


def drop_unused_negatives(table: pa.Table, registry: ModelRegistry, sweep: Sweep, notes: list) -> pa.Table:
    """Rows whose pipeline would not read their negative prompt get '' instead, and a note says how many.

    A manifest row with such a negative prompt is refused (pipelines.registry.families): guidance
    <= 1 on SD/SDXL/SD3 (no unconditional pass runs) or true_cfg_scale <= 1 on FLUX. A sweep that
    crosses a negative prompt with those values means the row without it: its image is the same,
    and now its sample_id and its negative_prompt column say so. A negative prompt no row of the
    sweep can read is refused: it would be dropped everywhere.
    """
    from pipelines.registry.families import unused_negative_prompt

    if "negative_prompt" not in table.column_names:
        return table
    n = table.num_rows
    given = {c: table.column(c).to_pylist() if c in table.column_names else [None] * n
             for c in ("negative_prompt", "model", "guidance", "true_cfg_scale")}
    negatives, dropped, why = list(given["negative_prompt"]), 0, None
    for i, (neg, m, g, cfg) in enumerate(zip(*given.values())):
        spec = registry.specs.get(m or "embedded")
        if not (isinstance(neg, str) and neg) or spec is None:
            continue  # no negative prompt, or a bad row that validation names
        unused = unused_negative_prompt(spec, spec.guidance if g is None else g, 1.0 if cfg is None else cfg)
        if unused:
            negatives[i], dropped, why = "", dropped + 1, why or f"model {spec.name!r} {unused}"
    if not dropped:
        return table
    if dropped == sum(isinstance(v, str) and v != "" for v in given["negative_prompt"]):
        first = next(v for v in given["negative_prompt"] if isinstance(v, str) and v)
        where = (sweep.labels.get("negative_prompt", "negative_prompt") if sweep.negative_prompt is not None
                 else f"{sweep.labels.get('prompts', 'prompts')}, column 'negative_prompt'")
        raise InputError(f"{where}: got {short_repr(first)}; expected a sweep where some row reads it: no row does "
                         f"({why}); add guidance > 1 (true_cfg_scales > 1 on FLUX) or leave the negative prompt out")
    notes.append(f"note: negative_prompt left out ('') of {dropped:,} of {n:,} rows whose pipeline does not read it "
                 "(guidance <= 1 on SD/SDXL/SD3, true_cfg_scale <= 1 on FLUX): their images are the same without it, "
                 "and their sample_ids say so")
    i = table.column_names.index("negative_prompt")
    return table.set_column(i, "negative_prompt", pa.array(negatives, type=table.schema.field(i).type))
