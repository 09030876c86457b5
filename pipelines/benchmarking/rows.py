"""The manifest rows a benchmark times: one configuration, or the mixed sweep's 36."""

from __future__ import annotations

import pandas as pd

MIXED_SCHEDULERS = {"eps": ("ddim", "euler_a", "dpmpp_2m", "unipc"), "flow": ("flow_match_euler", "flow_match_heun")}
MIXED_STEP_FRACTIONS = (0.4, 0.7, 1.0)  # of the model's (or --steps) step count


def configurations(spec, args) -> list[tuple[str, int, float]]:
    """(scheduler, steps, guidance) of the benchmark: one, or the mixed sweep's 36."""
    steps = args.steps or spec.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    if args.sweep == "single":
        return [(args.scheduler, steps, guidance)]
    step_counts = sorted({max(1, round(steps * f)) for f in MIXED_STEP_FRACTIONS})
    scales = sorted({1.0, 4.0, guidance})
    return [(s, n, g) for s in MIXED_SCHEDULERS[spec.family] for n in step_counts for g in scales]


def schedulers_used(spec, args, rows: pd.DataFrame) -> list[str]:
    """The schedulers the rows run, in the sweep's order: the model family picks the list
    (eps or flow matching), and too few rows leave some out."""
    used = set(rows.scheduler)
    return [s for s in dict.fromkeys(c[0] for c in configurations(spec, args)) if s in used]


def row_count(spec, args, batch: int) -> int:
    """--rows, else 4 batches (at least 4 rows); a mixed sweep: every configuration, batch // 4 times."""
    if args.rows:
        return args.rows
    if args.sweep == "mixed":
        return len(configurations(spec, args)) * max(1, batch // 4)
    return max(4, 4 * batch)


def make_rows(spec, args, n: int) -> pd.DataFrame:
    """`n` validated manifest rows spread round-robin over the configurations, in the job's
    order (by run key). Validation is the job's: a bad --scheduler, --size or --steps fails here."""
    import pyarrow as pa

    from pipelines.registry.models import ModelRegistry
    from pipelines.validation import order_by_run_key, validate_manifest

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


def summary_row(rows: pd.DataFrame, sweep: str) -> pd.Series:
    """The configuration a record names: the rows' one, or for a mixed sweep its largest
    step count and scale, with scheduler "mixed"."""
    if sweep != "mixed":
        return rows.iloc[0]
    r0 = rows.sort_values(["steps", "guidance"]).iloc[-1].copy()
    r0["scheduler"] = "mixed"
    return r0
