"""The data contract: manifest and result columns, and validation at the door.

A manifest is data, read before any model loads. Every problem is reported with the
row (0-based position in the manifest), the column, the value and what is allowed,
all problems at once up to a limit, so a bad row at position 912,000 is found in
seconds, not after six GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.errors import InputError
from pipelines.registry.models import ModelRegistry
from pipelines.registry.schedulers import check_scheduler, local_scheduler_config, max_steps
from pipelines.seeding import SEED_LIMIT, default_seed, sample_id

MAX_STEPS = 1000
MAX_SIDE = 4096

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("scheduler", pa.string()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("cache_interval", pa.int64()),
    ]
)
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
RUN_KEY = ["model", "height", "width", "scheduler", "steps", "guidance", "cache_interval"]

RESULT_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("prompt_truncated", pa.bool_()),
        ("gen_seconds", pa.float64()),
        ("batch_size", pa.int64()),
        ("worker", pa.string()),
        ("device", pa.string()),
        ("dtype", pa.string()),  # half precision changes pixels (docs/performance.md): compare within one
        ("diffusers_version", pa.string()),
        ("torch_version", pa.string()),
        ("model_digest", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
RESULT_COLUMNS = RESULT_SCHEMA.names


@dataclass(frozen=True)
class Problem:
    row: int | None
    column: str
    value: object
    expected: str

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row is not None else "manifest"
        value = repr(self.value)
        if len(value) > 60:
            value = value[:57] + "..."
        return f"{where}, column {self.column!r}: got {value}; expected {self.expected}"


class ManifestError(InputError):
    """A manifest that cannot be run, with every problem found (up to a limit)."""

    def __init__(self, problems: list[Problem], total: int | None = None, source: str = "manifest"):
        self.problems = problems
        total = total if total is not None else len(problems)
        shown = "; ".join(str(p) for p in problems)
        more = f" (and {total - len(problems)} more)" if total > len(problems) else ""
        super().__init__(f"{source}: {total} problem(s): {shown}{more}")


class _Collector:
    def __init__(self, limit: int):
        self.limit, self.problems, self.total = limit, [], 0

    def add(self, row, column, value, expected):
        self.total += 1
        if len(self.problems) < self.limit:
            self.problems.append(Problem(None if row is None else int(row), column, value, expected))



_KIND_CHECKS = {
    "string": (pa.types.is_string, pa.types.is_large_string),
    "integer": (pa.types.is_integer,),
    "number": (pa.types.is_integer, pa.types.is_floating),
}
_COLUMN_KINDS = {
    "prompt": "string", "negative_prompt": "string", "model": "string", "scheduler": "string",
    "sample_id": "string", "seed": "integer", "steps": "integer", "height": "integer",
    "width": "integer", "guidance": "number", "cache_interval": "integer",
}


def validate_manifest(
    table: pa.Table,
    registry: ModelRegistry,
    default_model: str | None = None,
    max_problems: int = 20,
    source: str = "manifest",
) -> pa.Table:
    """Check every row and fill in defaults; returns the manifest as the job will run it:
    the known columns in MANIFEST_SCHEMA order and types, then the user's columns as given.

    Raises `ManifestError` naming each bad (row, column, value) and what is allowed.
    Columns the job does not know pass through unchanged.
    """
    out = _Collector(max_problems)
    if table.num_rows == 0:
        raise ManifestError([Problem(None, "*", 0, "at least one row")], source=source)
    if "prompt" not in table.column_names:
        raise ManifestError(
            [Problem(None, "prompt", f"columns {table.column_names}", "a 'prompt' column (the only required one)")],
            source=source,
        )
    default_model = default_model or "embedded"
    if default_model not in registry:
        raise ManifestError(
            [Problem(None, "--model", default_model, f"a registered model: {', '.join(registry.names())}")],
            source=source,
        )
    taken = [c for c in table.column_names if c in RESULT_COLUMNS]
    if taken:  # the job writes these itself; a user column of that name would be ambiguous
        raise ManifestError([Problem(None, c, "a manifest column", "not a result column name (rename it): "
                                     + ", ".join(RESULT_COLUMNS)) for c in taken], source=source)
    for col, kind in _COLUMN_KINDS.items():
        if col in table.column_names:
            t = table.schema.field(col).type
            ok = pa.types.is_null(t) or any(check(t) for check in _KIND_CHECKS[kind])
            if col in ("prompt", "negative_prompt") and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
                ok = True  # decoded below, row by row, so bad UTF-8 is named by row
            if not ok:
                first = table.column(col).slice(0, 1).to_pylist()[0]
                out.add(None, col, f"{t} column (row 0: {first!r})", f"{kind} values ({MANIFEST_SCHEMA.field(col).type})")
    if out.total:
        raise ManifestError(out.problems, out.total, source)

    n = table.num_rows
    cols = {c: table.column(c).to_pylist() for c in MANIFEST_COLUMNS if c in table.column_names}

    prompts = _strings(cols.get("prompt"), "prompt", n, out, required=True)
    negatives = _strings(cols.get("negative_prompt"), "negative_prompt", n, out, required=False)

    models = [default_model if m is None else m for m in cols.get("model", [None] * n)]
    for i, m in enumerate(models):
        if m not in registry:
            out.add(i, "model", m, f"a registered model: {', '.join(registry.names())}")
    specs = {m: registry.get(m) for m in set(models) if m in registry}

    def model_default(key):
        return [getattr(specs[m], key) if m in specs else None for m in models]

    schedulers = [d if s is None else s for s, d in zip(cols.get("scheduler", [None] * n), model_default("scheduler"))]
    checked: dict[tuple, str | None] = {}
    for i, (m, s) in enumerate(zip(models, schedulers)):
        if m not in specs:
            continue
        if (m, s) not in checked:
            try:
                check_scheduler(s, specs[m].family)
                checked[(m, s)] = None
            except ValueError as e:
                checked[(m, s)] = str(e).split("; ", 1)[-1].replace("valid names: ", "one of: ")
        if checked[(m, s)]:
            out.add(i, "scheduler", s, checked[(m, s)])

    steps = _ints(cols.get("steps"), model_default("steps"), "steps", out, 1, MAX_STEPS)
    limits: dict[tuple, tuple | None] = {}  # (model, scheduler) -> (max steps, why) or None
    for i, (v, m, s) in enumerate(zip(steps, models, schedulers)):
        if v is None or not 1 <= v <= MAX_STEPS or m not in specs or checked[(m, s)]:
            continue  # out of the documented range, or a bad model/scheduler: already reported
        if (m, s) not in limits:
            limits[(m, s)] = max_steps(s, local_scheduler_config(specs[m].source))
        if limits[(m, s)] and v > limits[(m, s)][0]:
            out.add(i, "steps", v, f"an integer in [1, {limits[(m, s)][0]}] for scheduler {s!r} on model {m!r} "
                                   f"({limits[(m, s)][1]})")
    heights = _ints(cols.get("height"), model_default("height"), "height", out, 8, MAX_SIDE)
    widths = _ints(cols.get("width"), model_default("width"), "width", out, 8, MAX_SIDE)
    for col, vals in (("height", heights), ("width", widths)):
        for i, (v, f) in enumerate(zip(vals, model_default("size_factor"))):
            if f and v is not None and v % f:
                out.add(i, col, v, f"a multiple of {f} for model {models[i]!r}")
    guidance = _guidance(cols.get("guidance"), model_default("guidance"), out)
    intervals = _ints(cols.get("cache_interval"), [1] * n, "cache_interval", out, 1, MAX_STEPS)
    for i, (v, m) in enumerate(zip(intervals, models)):
        if v is not None and v > 1 and m in specs and specs[m].family == "flow":
            out.add(i, "cache_interval", v, f"1 for model {m!r}: feature reuse (cache_interval > 1) needs a UNet model, "
                                            f"and {m!r} is a flow-matching transformer")
    seeds = _seeds(cols.get("seed"), prompts, out)
    if out.total:
        raise ManifestError(out.problems, out.total, source)

    clean = pd.DataFrame(
        {
            "prompt": pd.Series(prompts, dtype=object),
            "negative_prompt": pd.Series(negatives, dtype=object),
            "seed": np.array(seeds, dtype=np.int64),
            "model": pd.Series(models, dtype=object),
            "scheduler": pd.Series(schedulers, dtype=object),
            "steps": np.array(steps, dtype=np.int64),
            "guidance": np.array(guidance, dtype=np.float64),
            "height": np.array(heights, dtype=np.int64),
            "width": np.array(widths, dtype=np.int64),
            "cache_interval": np.array(intervals, dtype=np.int64),
        }
    )
    given_ids = cols.get("sample_id", [None] * n)
    ids = []
    for i, (g, r) in enumerate(zip(given_ids, clean.itertuples(index=False))):
        if g is not None and not g.strip():
            out.add(i, "sample_id", g, "a non-empty string, or null to compute it")
        ids.append(g if g else sample_id(r._asdict()))
    first_of: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in first_of:
            out.add(i, "sample_id", sid, f"unique; row {first_of[sid]} has the same sample_id (the same image: give the rows different seeds)")
        else:
            first_of[sid] = i
    if out.total:
        raise ManifestError(out.problems, out.total, source)
    clean.insert(0, "sample_id", pd.Series(ids, dtype=object))
    result = pa.Table.from_pandas(clean, schema=MANIFEST_SCHEMA, preserve_index=False).replace_schema_metadata(None)
    for c in table.column_names:
        if c not in MANIFEST_COLUMNS:
            result = result.append_column(table.schema.field(c), table.column(c))
    return result


def _strings(vals, col, n, out: _Collector, required: bool) -> list:
    if vals is None:
        return [""] * n
    vals = list(vals)
    for i, v in enumerate(vals):
        if isinstance(v, (bytes, bytearray)):
            try:
                vals[i] = v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                out.add(i, col, bytes(v)[:40], f"UTF-8 text ({e.reason} at byte {e.start})")
                continue
        if v is None:
            if required:
                out.add(i, col, None, "a non-empty string")
            else:
                vals[i] = ""
        elif required and not v.strip():
            out.add(i, col, v, "a non-empty string")
        elif "\x00" in v:
            out.add(i, col, v, "text without NUL characters")
    return vals


def _ints(vals, defaults, col, out: _Collector, lo: int, hi: int) -> list:
    vals = defaults if vals is None else [d if v is None else v for v, d in zip(vals, defaults)]
    for i, v in enumerate(vals):
        if v is not None and not lo <= v <= hi:
            out.add(i, col, v, f"an integer in [{lo}, {hi}]")
    return vals


def _guidance(vals, defaults, out: _Collector) -> list:
    vals = defaults if vals is None else [d if v is None else float(v) for v, d in zip(vals, defaults)]
    for i, v in enumerate(vals):
        if v is not None and not (math.isfinite(v) and v >= 0):
            out.add(i, "guidance", v, "a finite number >= 0 (<= 1 disables classifier-free guidance)")
    return vals


def _seeds(vals, prompts, out: _Collector) -> list:
    counters: dict[str, int] = {}
    seeds = []
    for i, p in enumerate(prompts):
        k = counters.get(p, 0) if isinstance(p, str) else 0
        if isinstance(p, str):
            counters[p] = k + 1
        v = None if vals is None else vals[i]
        if v is None:
            seeds.append(default_seed(p if isinstance(p, str) else "", k))
        else:
            if not 0 <= v < SEED_LIMIT:
                out.add(i, "seed", v, "an integer in [0, 2**63)")
            seeds.append(v if 0 <= v < SEED_LIMIT else 0)
    return seeds


def order_by_run_key(table: pa.Table) -> pa.Table:
    """Rows of one configuration next to each other, so batches rarely mix configurations
    (a mixed batch still works: generation regroups it)."""
    return table.sort_by([(k, "ascending") for k in RUN_KEY + ["sample_id"]])


def manifest_digest(table: pa.Table) -> str:
    """Identity of what a manifest asks for: its sorted sample_ids."""
    import hashlib

    h = hashlib.sha256()
    for sid in sorted(table.column("sample_id").to_pylist()):
        h.update(sid.encode() + b"\n")
    return h.hexdigest()[:16]
