"""How the report writes values and names configurations: numbers to 3 significant figures,
intervals as `12.3 [11.1, 13.6]`, and short labels such as "ddim 25 steps g7.5".

Which columns are the configuration (the keys) is the caller's to say: jobs/evaluate.py
passes the grouping keys it used. Without them (a metrics.parquet opened by hand), the keys
are every column that is neither a metric nor a description of how it was measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from evals.metrics_table import DESCRIPTION_COLUMNS, METRIC_COLUMNS


def key_columns(metrics: pd.DataFrame, keys: Sequence[str] | None = None) -> list[str]:
    """The configuration columns of `metrics`: those of `keys` it has, in that order; without
    `keys`, every column that is not a metric or a description column, in frame order."""
    if keys is None:
        return [c for c in metrics.columns if c not in METRIC_COLUMNS and c not in DESCRIPTION_COLUMNS]
    return [k for k in keys if k in metrics.columns]


def device_kind(metrics: pd.DataFrame) -> str:
    """What ran the images, for the cost headers: "CPU", "GPU" (CUDA), "MPS", or "device"
    when the frame does not say or they ran on several kinds."""
    if "device" not in metrics.columns:
        return "device"
    kinds = {d.strip().split(":")[0] for v in metrics["device"].dropna() for d in str(v).split(",") if d.strip()}
    names = {"cpu": "CPU", "cuda": "GPU", "mps": "MPS", "xpu": "XPU"}
    return names.get(kinds.pop(), "device") if len(kinds) == 1 else "device"


def numeric(df: pd.DataFrame, col: str | None) -> pd.Series | None:
    """`df[col]` as float, or None when the column is absent or has no finite value."""
    if col is None or col not in df.columns:
        return None
    s = pd.to_numeric(df[col], errors="coerce").astype("float64")
    s = s.where(np.isfinite(s))
    return None if s.isna().all() else s


def has_values(df: pd.DataFrame, col: str) -> bool:
    return numeric(df, col) is not None


def sig_decimals(v: float) -> int:
    """Decimals that show 3 significant figures, at least 1 decimal, at most 6."""
    if not math.isfinite(v) or v == 0:
        return 1
    return int(min(6, max(1, 2 - math.floor(math.log10(abs(v))))))


def fmt_num(v, decimals: int | None = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    v = float(v)
    d = sig_decimals(v) if decimals is None else decimals
    return f"{v:.{d}f}"


def fmt_ci(v, lo=None, hi=None) -> str:
    """`12.3 [11.1, 13.6]`: the interval with as many decimals as the value."""
    if v is None or pd.isna(v):
        return "–"
    d = sig_decimals(float(v))
    s = fmt_num(v, d)
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        s += f" [{fmt_num(lo, d)}, {fmt_num(hi, d)}]"
    return s


def fmt_key(v) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def label_part(key: str, v) -> str:
    s = fmt_key(v)
    if key == "steps":
        return f"{s} steps"
    if key == "guidance":
        return f"g{s}"
    if key in ("scheduler", "model"):
        return s
    return f"{key}={s}"


def config_labels(metrics: pd.DataFrame, keys: Sequence[str] | None = None) -> pd.Series:
    """Short labels for the rows of `metrics` built from the key columns that vary, e.g.
    "ddim 25 steps g7.5" (height and width are shown as "512x512")."""
    keys = key_columns(metrics, keys)
    varying = [k for k in keys if metrics[k].nunique(dropna=False) > 1]
    if not varying:
        varying = keys[:]

    def one(row) -> str:
        parts = []
        for k in varying:
            if k == "width" and "height" in varying:
                continue
            if k == "height" and "width" in metrics.columns:
                parts.append(f"{fmt_key(row['height'])}x{fmt_key(row['width'])}")
            else:
                parts.append(label_part(k, row[k]))
        return " ".join(parts) if parts else "all"

    if len(metrics) == 0:
        return pd.Series([], index=metrics.index, dtype="object")
    return pd.Series([one(r) for _, r in metrics.iterrows()], index=metrics.index, dtype="object")

