"""Validation at the door: a manifest checked against the row contract (pipelines/contract.py).

A manifest is data, read before any model loads. Every problem is reported with the
row (0-based position in the manifest), the column, the value and what is allowed,
all problems at once up to a limit, so a bad row at position 912,000 is found in
seconds, not after six GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from pipelines.contract import (COLUMN, FROM_MODEL, MANIFEST_COLUMNS, MANIFEST_SCHEMA, MAX_STEPS, RESULT_COLUMNS,
                                RUN_KEY, SEED_LIMIT, default_seed, sample_id)
from pipelines.errors import InputError
from pipelines.registry.families import guidance_problem, pipeline_name
from pipelines.registry.models import ModelRegistry
from pipelines.registry.quant import scheme_problem
from pipelines.registry.schedulers import check_scheduler, local_scheduler_config, max_steps, scheduler_names


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


def validate_manifest(
    table: pa.Table,
    registry: ModelRegistry,
    default_model: str | None = None,
    max_problems: int = 20,
    source: str = "manifest",
) -> pa.Table:
    """Check every row and fill in defaults; returns the manifest as the job will run it:
    the contract's columns in MANIFEST_SCHEMA order and types, then the user's columns as given.

    Raises `ManifestError` naming each bad (row, column, value) and what is allowed.
    Columns the job does not know pass through unchanged.
    """
    default_model = default_model or "embedded"
    _check_columns(table, registry, default_model, source)
    out = _Collector(max_problems)
    n = table.num_rows
    given = {c: table.column(c).to_pylist() for c in MANIFEST_COLUMNS if c in table.column_names}

    values = {"prompt": _strings(given.get("prompt"), "prompt", n, out, required=True),
              "negative_prompt": _strings(given.get("negative_prompt"), "negative_prompt", n, out, required=False)}
    models = [default_model if m is None else m for m in given.get("model", [None] * n)]
    for i, m in enumerate(models):
        if m not in registry:
            out.add(i, "model", m, f"a registered model: {', '.join(registry.names())}")
    specs = {m: registry.get(m) for m in set(models) if m in registry}
    values["model"] = models
    for c in COLUMN.values():  # every other column: its default (constant or the model's), then its range
        if c.name in values or c.name in ("sample_id", "seed", "lora", "lora_scale"):
            continue
        defaults = ([getattr(specs[m], c.name) if m in specs else None for m in models] if c.default is FROM_MODEL
                    else [c.default] * n)
        if c.kind == "string":
            values[c.name] = defaults if c.name not in given else [d if v is None else v
                                                                   for v, d in zip(given[c.name], defaults)]
        else:
            values[c.name] = _numbers(c.name, given.get(c.name), defaults, out)
    _check_for_model(values, specs, out)
    for i, q in enumerate(values["quant"]):
        if scheme_problem(q):
            out.add(i, "quant", q, scheme_problem(q))
    values["lora"], values["lora_scale"] = _loras(given.get("lora"), given.get("lora_scale"), models, specs,
                                                  registry, out)
    values["seed"] = _seeds(given.get("seed"), values["prompt"], out)
    if out.total:
        raise ManifestError(out.problems, out.total, source)

    clean = pa.table({c: values[c] for c in MANIFEST_COLUMNS if c != "sample_id"},
                     schema=pa.schema([f for f in MANIFEST_SCHEMA if f.name != "sample_id"]))
    ids = _sample_ids(given.get("sample_id", [None] * n), clean.to_pylist(), out)
    if out.total:
        raise ManifestError(out.problems, out.total, source)
    result = clean.add_column(0, MANIFEST_SCHEMA.field("sample_id"), pa.array(ids, pa.string()))
    for c in table.column_names:
        if c not in MANIFEST_COLUMNS:
            result = result.append_column(table.schema.field(c), table.column(c))
    return result


def _check_columns(table: pa.Table, registry: ModelRegistry, default_model: str, source: str) -> None:
    """What must hold before any row is read: rows, a prompt column, a registered --model,
    no column named like a result column, and each known column of its kind."""
    def fail(column, value, expected):
        raise ManifestError([Problem(None, column, value, expected)], source=source)

    if table.num_rows == 0:
        fail("*", 0, "at least one row")
    if "prompt" not in table.column_names:
        fail("prompt", f"columns {table.column_names}", "a 'prompt' column (the only required one)")
    if default_model not in registry:
        fail("--model", default_model, f"a registered model: {', '.join(registry.names())}")
    taken = [c for c in table.column_names if c in RESULT_COLUMNS]
    if taken:  # the job writes these itself; a user column of that name would be ambiguous
        raise ManifestError([Problem(None, c, "a manifest column", "not a result column name (rename it): "
                                     + ", ".join(RESULT_COLUMNS)) for c in taken], source=source)
    problems = []
    for c in COLUMN.values():
        if c.name in table.column_names:
            t = table.schema.field(c.name).type
            ok = pa.types.is_null(t) or any(check(t) for check in _KIND_CHECKS[c.kind])
            if c.name in ("prompt", "negative_prompt") and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
                ok = True  # decoded row by row, so bad UTF-8 is named by row
            if c.name in ("lora", "lora_scale") and (pa.types.is_list(t) or pa.types.is_large_list(t)):
                ok = any(check(t.value_type) for check in _KIND_CHECKS[c.kind])  # stacked adapters, one per item
            if not ok:
                first = table.column(c.name).slice(0, 1).to_pylist()[0]
                problems.append(Problem(None, c.name, f"{t} column (row 0: {first!r})", f"{c.kind} values ({c.arrow})"))
    if problems:
        raise ManifestError(problems, source=source)


def _check_for_model(values: dict, specs: dict, out: _Collector) -> None:
    """What depends on the row's model: its scheduler family, the scheduler's step limit,
    the image size factor, feature reuse (UNet models only), a refiner for denoising_end < 1, and guidance and negative prompts
    the model's pipeline would ignore (pipelines.registry.families)."""
    models, schedulers = values["model"], values["scheduler"]
    checked: dict[tuple, str | None] = {}  # (model, scheduler) -> why it cannot run, or None
    limits: dict[tuple, tuple | None] = {}  # (model, scheduler) -> (max steps, why) or None
    for i, (m, s, steps) in enumerate(zip(models, schedulers, values["steps"])):
        if m not in specs:
            continue
        if (m, s) not in checked:
            try:
                check_scheduler(s, specs[m].family)
                checked[(m, s)] = _pipeline_refuses(specs[m], s)
            except ValueError as e:
                checked[(m, s)] = str(e).split("; ", 1)[-1].replace("valid names: ", "one of: ")
        if checked[(m, s)]:
            out.add(i, "scheduler", s, checked[(m, s)])
            continue
        if steps is None or not 1 <= steps <= MAX_STEPS:
            continue  # out of the documented range: already reported
        if (m, s) not in limits:
            limits[(m, s)] = max_steps(s, local_scheduler_config(specs[m].source))
        if limits[(m, s)] and steps > limits[(m, s)][0]:
            out.add(i, "steps", steps, f"an integer in [1, {limits[(m, s)][0]}] for scheduler {s!r} on model {m!r} "
                                       f"({limits[(m, s)][1]})")
    for col in ("height", "width"):
        for i, (v, m) in enumerate(zip(values[col], models)):
            f = specs[m].size_factor if m in specs else None
            if f and v is not None and v % f:
                out.add(i, col, v, f"a multiple of {f} for model {m!r}")
    for i, (v, m) in enumerate(zip(values["cache_interval"], models)):
        if v is not None and v > 1 and m in specs and specs[m].family == "flow":
            out.add(i, "cache_interval", v, f"1 for model {m!r}: feature reuse (cache_interval > 1) needs a UNet model, "
                                            f"and {m!r} is a flow-matching transformer")
    img2img = {m for m in specs if pipeline_name(specs[m]).endswith("Img2ImgPipeline")}
    for i, m in enumerate(models):
        if m in img2img:
            out.add(i, "model", m, f"a text-to-image model; {m!r} is an img2img refiner ({pipeline_name(specs[m])}): "
                                   "name its base model, whose 'refiner' it is, with denoising_end < 1")
    for i, (v, m) in enumerate(zip(values["denoising_end"], models)):
        if v is not None and m in specs and (v <= 0 or v < 1 and not specs[m].refiner):
            out.add(i, "denoising_end", v, f"1 for model {m!r}: it has no refiner (set 'refiner: <model>' in the models "
                                           "YAML)" if specs[m].refiner is None else
                                           "a fraction in (0, 1]: the base denoises that much, the refiner the rest")
    guided = zip(models, values["guidance"], values["negative_prompt"], values["true_cfg_scale"])
    for i, (m, g, neg, cfg) in enumerate(guided):
        bad = m in specs and g is not None and cfg is not None and guidance_problem(specs[m], g, neg or "", cfg)
        if bad:
            value = {"guidance": g, "negative_prompt": neg, "true_cfg_scale": cfg, "model": m}[bad[0]]
            out.add(i, bad[0], value, bad[1])


def _loras(names, scales, models, specs, registry: ModelRegistry, out: _Collector) -> tuple[list, list]:
    """The canonical (lora, lora_scale) of each row (pipelines/registry/loras.py): each adapter
    registered (never a path) and trained for the row's model, each scale a finite number."""
    from pipelines.registry.loras import adapters, canonical

    n = len(models)
    names, scales = names or [None] * n, scales or [None] * n
    loras, out_scales = [], []
    for i, (lora, scale, m) in enumerate(zip(names, scales, models)):
        lora_c, scale_c, why = canonical(lora, scale)
        if why:
            col, why = why.split("|", 1)
            out.add(i, col, lora if col == "lora" else scale, why.split("; expected ", 1)[-1])
        for name, _ in adapters(lora_c, scale_c):
            if name not in registry.loras:
                out.add(i, "lora", name, f"a registered adapter: {', '.join(sorted(registry.loras)) or '(none)'} "
                                         "(the loras: section of --models)")
            elif m in specs and not registry.loras[name].fits_model(specs[m]):
                out.add(i, "lora", name, f"an adapter that fits model {m!r}; {name!r} fits "
                                         f"{', '.join(registry.loras[name].fits)}")
        loras.append(lora_c)
        out_scales.append(scale_c)
    return loras, out_scales


# pipeline class -> {scheduler: why that pipeline cannot drive it} (measured with diffusers 0.42)
_UNDRIVABLE = {
    "FluxPipeline": {"flow_match_heun": "FluxPipeline passes its own sigmas to the scheduler and "
                                        "FlowMatchHeunDiscreteScheduler.set_timesteps takes none"},
}


def _pipeline_refuses(spec, scheduler: str) -> str | None:
    """Why the model's pipeline class cannot run `scheduler` (a scheduler of the model's family), or None."""
    why = _UNDRIVABLE.get(pipeline_name(spec), {}).get(scheduler)
    if why is None:
        return None
    usable = [n for n in scheduler_names(spec.family) if n not in _UNDRIVABLE[pipeline_name(spec)]]
    return f"one of: {', '.join(usable)} for model {spec.name!r} ({why})"


def _sample_ids(given: list, rows: list[dict], out: _Collector) -> list[str]:
    """The user's sample_id where given, else the content hash; each one unique."""
    ids = []
    for i, (g, r) in enumerate(zip(given, rows)):
        if g is not None and not g.strip():
            out.add(i, "sample_id", g, "a non-empty string, or null to compute it")
        ids.append(g if g else sample_id(r))
    first_of: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in first_of:
            out.add(i, "sample_id", sid, f"unique; row {first_of[sid]} has the same sample_id (the same image: give the rows different seeds)")
        else:
            first_of[sid] = i
    return ids


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


def _numbers(col, vals, defaults, out: _Collector) -> list:
    """A numeric column with its defaults filled in, each value checked against the contract's range."""
    c = COLUMN[col]
    vals = defaults if vals is None else [d if v is None else v for v, d in zip(vals, defaults)]
    if c.kind == "integer":
        expected = f"an integer in [{c.lo}, {c.hi}]"
        bad = lambda v: not c.lo <= v <= c.hi  # noqa: E731
    else:
        vals = [None if v is None else float(v) for v in vals]
        expected = f"a finite number >= {c.lo:g}" + (f" ({c.doc})" if c.doc else "")
        bad = lambda v: not (math.isfinite(v) and v >= c.lo and (c.hi is None or v <= c.hi))  # noqa: E731
    for i, v in enumerate(vals):
        if v is not None and bad(v):
            out.add(i, col, v, expected)
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


def check_device(table: pa.Table, device: str, source: str = "manifest", max_problems: int = 20) -> None:
    """Refuse rows whose `quant` scheme the job's device cannot run (e.g. nf4 on CPU actors).
    Called once the device is known (Ray up, GPUs per actor decided), before any work starts."""
    out = _Collector(max_problems)
    for i, q in enumerate(table.column("quant").to_pylist()):
        why = scheme_problem(q, device)
        if why:
            out.add(i, "quant", q, why)
    if out.total:
        raise ManifestError(out.problems, out.total, source)


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
