"""Benchmark history: records appended to a Parquet file, each compared with the median
images/s of the previous runs of the same key (a regression is a drop beyond a tolerance)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.contract import COLUMN, RUN_KEY

# Runs compare when all of these are equal: the benchmark's own keys (what was timed, how,
# on which device) plus the contract's run key (the configuration of a diffusers call).
BENCHMARK_KEY = ["suite", "sweep", "device_name", "batch_size", "path", "batching", "compile", "channels_last",
                 "fuse_qkv", "dtype"]
HISTORY_KEY = BENCHMARK_KEY + [k for k in RUN_KEY if k not in BENCHMARK_KEY]

# Key columns added after histories were first written, and the value older runs ran with.
# For the speed options that is for the actor and Ray paths; plain diffusers has none (None).
OLDER_RUN_VALUES = {"sweep": "single", "cache_interval": COLUMN["cache_interval"].default}
OLDER_SPEED_VALUES = {"batching": "config", "compile": "none", "channels_last": False, "fuse_qkv": False}

NUMERIC = ["seconds", "warmup_s", "images_per_s", "s_per_image", "achieved_tflops", "mfu", "peak_mem_bytes",
           "peak_tflops", "flops_per_image", "vs_plain", "ray_overhead_ratio", "ray_steady_ratio", "startup_s",
           "steady_images_per_s", "pixels_max_diff", "pixels_compared", "fp32_mean_diff", "reference_images",
           "baseline_images_per_s", "baseline_runs", "device_busy", "profiled_s", "actor_busy"]


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Records as a frame with stable column types (a column of Nones stays float64 or object)."""
    df = pd.DataFrame(records)
    for col in NUMERIC:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("pixels_match", "regression"):
        if col in df:
            df[col] = df[col].astype("object")
    return df


def read_history(path: Path) -> pd.DataFrame:
    """The history file, with the key columns older versions did not write filled in:
    the value those runs ran with where there is one, else None (such a run then compares
    only with records that lack the value too)."""
    history = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    if history.empty:
        return history
    for col, value in OLDER_RUN_VALUES.items():
        if col not in history:
            history[col] = value
    for col, value in OLDER_SPEED_VALUES.items():
        if col not in history and "path" in history:
            history[col] = pd.Series(np.where(history.path == "plain", None, value), dtype=object)
    for col in HISTORY_KEY:
        if col not in history:
            history[col] = None
    return history


def baseline(rec: dict, history: pd.DataFrame, window: int) -> tuple[float | None, int]:
    """(median images/s of the last `window` earlier runs of rec's key, how many runs)."""
    if history.empty:
        return None, 0
    mask = np.ones(len(history), dtype=bool)
    for k in HISTORY_KEY:
        col, want = history[k], rec.get(k)
        mask &= (col.isna() if want is None else col == want).to_numpy()
    prev = history[mask & (history.run_id != rec["run_id"]).to_numpy()]
    if prev.empty:
        return None, 0
    last_runs = prev.sort_values("created_at").run_id.drop_duplicates(keep="last").tail(window)
    median = float(prev[prev.run_id.isin(last_runs)].groupby("run_id").images_per_s.mean().median())
    return median, len(last_runs)


def apply_history(records: list[dict], path: str, tolerance: float, window: int) -> bool:
    """Compare each record with the median images/s of the previous `window` runs of the
    same key, mark it, append all records to the history file. True if any regressed."""
    hist_path = Path(path)
    history = read_history(hist_path)
    regressed = False
    for rec in records:
        rec["baseline_images_per_s"], rec["baseline_runs"] = baseline(rec, history, window)
        rec["regression"] = rec["baseline_runs"] > 0 and rec["images_per_s"] < (1 - tolerance) * rec[
            "baseline_images_per_s"]
        regressed |= rec["regression"]
    new = records_frame(records)
    combined = new if history.empty else pd.concat([history, new], ignore_index=True)
    hist_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hist_path.with_name(f".{hist_path.name}.tmp")
    records_frame(combined.to_dict("records")).to_parquet(tmp, index=False)
    os.replace(tmp, hist_path)
    return regressed
