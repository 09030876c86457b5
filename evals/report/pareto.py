"""The Pareto front of two metrics: configurations no other configuration beats on both."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_front(df: pd.DataFrame, x: str = "fid", y: str = "clip_score") -> pd.Series:
    """Boolean mask (indexed like `df`) of the rows on the Pareto front that minimises `x` and
    maximises `y`: rows that no other row beats in one and at least matches in the other.
    Exact duplicates of a front point are on the front too; rows with a NaN in `x` or `y`
    (or a missing column) are never on it."""
    if x not in df.columns or y not in df.columns or len(df) == 0:
        return pd.Series(False, index=df.index, dtype=bool)
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=np.float64)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    mask = np.zeros(len(df), dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size:
        order = idx[np.lexsort((-ys[idx], xs[idx]))]  # x ascending, then y descending
        best_y = -np.inf  # highest y among points with strictly smaller x
        i = 0
        while i < order.size:
            j = i
            while j + 1 < order.size and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            group = order[i : j + 1]
            top = ys[group].max()
            if top > best_y:
                mask[group[ys[group] == top]] = True
            best_y = max(best_y, top)
            i = j + 1
    return pd.Series(mask, index=df.index, dtype=bool)

