"""Where and with what the evaluated images were made, for the report's Run panel.

Every result row records its device, dtype, library versions, model digest and the size of
the diffusers call it ran in (pipelines/contract.py RESULT_SCHEMA); a report shows them so a
reader can tell a CPU float32 run from a GPU float16 one without opening the results.
"""

from __future__ import annotations

import pandas as pd

# (result column, Run panel label)
PROVENANCE = (
    ("device", "device"), ("dtype", "dtype"), ("diffusers_version", "diffusers"), ("torch_version", "torch"),
    ("model_digest", "model digest"), ("worker", "workers"), ("batch_size", "batch sizes (call sizes)"),
)


def _counts(rows: pd.DataFrame, col: str) -> pd.Series:
    """How many rows have each value of `col` (as text), the most common first."""
    values = rows[col].dropna()
    if col == "batch_size":
        values = values[values > 0].astype(int)
    counts = values.astype(str).value_counts()
    return counts.loc[sorted(counts.index, key=lambda v: (-counts[v], v))]


def run_provenance(ok: pd.DataFrame) -> dict[str, str]:
    """Run panel rows from the ok result rows: each recorded value, the most common first and
    counted when several ("cpu:x86_64 (96 images), cuda:NVIDIA H100 (32 images)"); workers
    are counted."""
    out = {}
    for col, label in PROVENANCE:
        counts = _counts(ok, col) if col in ok.columns else pd.Series(dtype="int64")
        if counts.empty:
            continue
        if col == "worker":
            out[label] = str(len(counts))
        elif len(counts) == 1:
            out[label] = counts.index[0]
        else:
            out[label] = ", ".join(f"{v} ({n} images)" for v, n in counts.items())
    return out
