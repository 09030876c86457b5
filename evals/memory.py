"""Weights memory per configuration, beside quality and speed in the report.

The generation job records, per worker and (model, quant), the loaded pipeline's weight
bytes in RESULTS/_run.json (`loads`); result rows do not carry it. A configuration's
`weights_mb` is the weight bytes (in 10^6 bytes) of the (model, quant) pairs its ok rows ran
with: one pair (the run key has both), or NaN when its rows span pairs of different sizes
(a --by without model or quant) or no load was recorded (older results, an older job).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evals import files

MEMORY_COLUMNS = ("weights_mb",)


def recorded_weights(results: str) -> dict[tuple[str, str], float]:
    """(model, quant) -> weight bytes, from every run of RESULTS/_run.json ({} when there is
    none, or it records no loads)."""
    try:
        record = json.loads(files.read_bytes(files.join(results, "_run.json")))
    except (FileNotFoundError, ValueError):
        return {}
    out: dict[tuple[str, str], float] = {}
    for run in record.get("runs", []) if isinstance(record, dict) else []:
        for load in run.get("loads") or []:
            if load.get("weights_bytes") is not None:  # the same pair on every worker: the last run's figure
                out[(load["model"], load.get("quant") or "none")] = float(load["weights_bytes"])
    return out


def weights_memory(ok: pd.DataFrame, keys: Sequence[str], weights: dict[tuple[str, str], float]) -> pd.DataFrame:
    """One row per configuration of `ok` (columns `keys` + weights_mb)."""
    quant = ok["quant"] if "quant" in ok else pd.Series("none", index=ok.index)
    per_row = pd.Series([weights.get((m, q), np.nan) for m, q in zip(ok["model"], quant)], index=ok.index)

    def one(v: pd.Series) -> float:
        values = set(v.dropna())
        return values.pop() / 1e6 if len(values) == 1 and v.notna().all() else np.nan

    by = list(keys)
    return per_row.groupby([ok[k] for k in by], sort=False, dropna=False).agg(one).rename("weights_mb").reset_index()


def add_weights_memory(metrics: pd.DataFrame, ok: pd.DataFrame, keys: Sequence[str], results: str) -> pd.DataFrame:
    """`metrics` with a weights_mb column (NaN throughout when nothing was recorded)."""
    weights = recorded_weights(results)
    if not weights or not len(ok) or "model" not in ok:
        return metrics.assign(weights_mb=np.nan)
    return metrics.merge(weights_memory(ok, keys, weights), on=list(keys), how="left")
