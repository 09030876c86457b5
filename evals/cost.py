"""What a configuration's images cost, with its spread, and when costs do not compare.

A result row's `gen_seconds` is its share of the wall time of the diffusers call it ran in
(pipelines/contract.py RESULT_SCHEMA), so the images of one call carry one value and are not
independent draws of the cost: the interval resamples calls, not images. A call is the rows
of one group with the same (worker, created_at, batch_size, gen_seconds): created_at is the
start of a worker's batch and batch_size the size of the call a row ran in.

Per-image cost falls with the batch size (fixed costs per call are shared by more images),
so costs compare only between configurations that ran in calls of one size: a configuration
split across calls of different sizes (e.g. 16 + 4 images at --batch-size 16), or run at
another size than the others, is flagged (`cost_comparable` False, and `cost_warnings`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from evals.messages import listing

# What cost_metrics writes per configuration, besides gen_seconds and images_per_gpu_second.
COST_COLUMNS = ("gen_seconds_ci_lo", "gen_seconds_ci_hi", "n_calls", "batch_sizes", "cost_comparable", "device",
                "dtype")
CALL_COLUMNS = ("worker", "created_at", "batch_size", "gen_seconds")


def calls(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per diffusers call among `rows`: its per-image seconds, batch size (0 when the
    rows do not record it) and how many of `rows` ran in it."""
    cols = [c for c in CALL_COLUMNS if c in rows.columns]
    sizes = rows["batch_size"] if "batch_size" in rows.columns else pd.Series(0, index=rows.index)
    frame = rows[cols].assign(_size=sizes.fillna(0).astype("int64"), _sec=rows["gen_seconds"].astype("float64"))
    return (frame.groupby(cols, dropna=False, sort=True)
            .agg(seconds=("_sec", "first"), batch_size=("_size", "first"), images=("_sec", "size"))
            .reset_index(drop=True))


def call_bootstrap_ci(seconds: np.ndarray, images: np.ndarray, n_boot: int, level: float,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean seconds per image, sum(seconds x images) / sum(images),
    resampling calls; NaN with fewer than 2 calls (one call has no spread to resample)."""
    if len(seconds) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(seconds), size=(n_boot, len(seconds)))
    means = (seconds[pick] * images[pick]).sum(axis=1) / images[pick].sum(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _distinct(rows: pd.DataFrame, col: str) -> str:
    if col not in rows.columns:
        return ""
    return ", ".join(sorted(str(v) for v in rows[col].dropna().unique()))


def cost_metrics(rows: pd.DataFrame, n_boot: int, level: float) -> dict:
    """The cost of one configuration's ok rows: mean seconds per image with its interval over
    calls, images per second, the calls and their sizes ("4, 16" when split), and the device
    and dtype they ran on. `cost_comparable` is set across the table by `flag_comparable`."""
    c = calls(rows)
    sec, images = c.seconds.to_numpy(), c.images.to_numpy(dtype=np.float64)
    mean = float((sec * images).sum() / images.sum()) if images.sum() else float("nan")
    lo, hi = call_bootstrap_ci(sec, images, n_boot, level)
    sizes = sorted({int(s) for s in c.batch_size if s > 0})
    return {"gen_seconds": mean, "gen_seconds_ci_lo": lo, "gen_seconds_ci_hi": hi,
            "images_per_gpu_second": 1.0 / mean if mean > 0 else float("nan"), "n_calls": len(c),
            "batch_sizes": ", ".join(map(str, sizes)), "device": _distinct(rows, "device"),
            "dtype": _distinct(rows, "dtype")}


def flag_comparable(metrics: pd.DataFrame) -> pd.Series:
    """Per configuration, whether its cost compares with the others': all its images ran in
    calls of one size, the size most configurations ran at (ties: the larger), on the same
    device and dtype as that majority. Rows without batch sizes are not flagged."""
    sizes = metrics.get("batch_sizes", pd.Series("", index=metrics.index)).fillna("").astype(str)
    where = [metrics[c].fillna("").astype(str) if c in metrics else pd.Series("", index=metrics.index)
             for c in ("device", "dtype")]
    single = sizes[(sizes != "") & ~sizes.str.contains(",")]
    if single.empty:
        return sizes == ""
    counts = single.groupby(single).size()
    common = max(counts.index, key=lambda s: (counts[s], int(s)))
    like = [w[sizes == common].mode().iloc[0] for w in where]
    ok = (sizes == common) & (where[0] == like[0]) & (where[1] == like[1])
    return ok | (sizes == "")


def cost_warnings(metrics: pd.DataFrame, labels: pd.Series) -> list[str]:
    """One warning naming the configurations (by `labels`) whose cost does not compare, and why."""
    if "cost_comparable" not in metrics.columns or metrics["cost_comparable"].astype(bool).all():
        return []
    bad = metrics.index[~metrics["cost_comparable"].astype(bool)]
    split = [f"{labels[i]} (calls of {metrics.at[i, 'batch_sizes']})" for i in bad
             if "," in str(metrics.at[i, "batch_sizes"])]
    other = [f"{labels[i]} (batch {metrics.at[i, 'batch_sizes']}"
             + "".join(f", {metrics.at[i, c]}" for c in ("device", "dtype") if c in metrics) + ")"
             for i in bad if "," not in str(metrics.at[i, "batch_sizes"])]
    parts = []
    if split:
        parts.append(f"{len(split)} split across calls of different sizes: {listing(split)}")
    if other:
        parts.append(f"{len(other)} ran at another batch size, device or dtype than the rest: {listing(other)}")
    return [f"cost: {len(bad)} configuration(s) marked † do not compare on seconds per image (per-image cost falls "
            f"with the batch size): {'; '.join(parts)}. Generate with a --batch-size that divides every "
            "configuration's image count to compare costs"]
