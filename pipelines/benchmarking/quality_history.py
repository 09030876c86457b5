"""The quality benchmark's history: one record per run (configuration, environment, metrics
with their intervals, throughput), and a verdict against the last good run.

A metric regresses when it got worse *beyond interval overlap*: its new interval lies
entirely on the worse side of the baseline's interval. Two 95% intervals that do not
overlap are a conservative test (about p < 0.01 for two independent estimates of similar
spread), so an unchanged run is not flagged for sampling noise; with identical seeds and
code a rerun reproduces the metrics exactly. Throughput regresses as in the throughput
suite's history: images/s below (1 - tolerance) x the median of the last `window` good runs.

Runs compare when their suite, model and device are equal: a scheduled job keeps its flags
fixed, so what else changed between two runs (code, versions, a step count) is what the
verdict judges, and the verdict names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

COMPARE_KEY = ("suite", "model", "device_name")
CONFIG_KEYS = ("scheduler", "steps", "guidance", "height", "width", "n", "reference", "extractor")
PROVENANCE_KEYS = ("git_commit", "torch_version", "diffusers_version", "transformers_version")


@dataclass(frozen=True)
class Metric:
    name: str
    lo: str
    hi: str
    higher_is_better: bool
    label: str


# The metrics.parquet columns judged, with their interval columns. Plain FID is not: it is
# biased by 1/n and has no covering interval (FID-infinity is its bias-corrected form).
METRICS = (
    Metric("fid_inf", "fid_inf_lo", "fid_inf_hi", False, "FID-infinity"),
    Metric("kid", "kid_ci_lo", "kid_ci_hi", False, "KID"),
    Metric("cmmd", "cmmd_ci_lo", "cmmd_ci_hi", False, "CMMD"),
    Metric("clip_score", "clip_score_ci_lo", "clip_score_ci_hi", True, "CLIP score"),
    Metric("attribute_accuracy", "attribute_accuracy_ci_lo", "attribute_accuracy_ci_hi", True, "attribute accuracy"),
)


def metric_fields(metrics_row: dict) -> dict:
    """The judged metrics and their intervals from one metrics.parquet row. FID-infinity of a
    group smaller than the feature dimension is invalid (evaluate warns and never ranks it):
    recorded as NaN, so it is never judged."""
    out = {}
    small = metrics_row.get("n", 0) < metrics_row.get("feature_dim", 0)
    for m in METRICS:
        for col in (m.name, m.lo, m.hi):
            v = metrics_row.get(col)
            out[col] = float("nan") if v is None or (small and m.name == "fid_inf") else float(v)
    return out


def _finite(*values) -> bool:
    return all(v is not None and np.isfinite(v) for v in values)


def compare_metric(m: Metric, new: dict, base: dict) -> str:
    """"worse", "better" (intervals apart) or "same" (they overlap); "n/a" if either lacks one."""
    a_lo, a_hi, b_lo, b_hi = new.get(m.lo), new.get(m.hi), base.get(m.lo), base.get(m.hi)
    if not _finite(a_lo, a_hi, b_lo, b_hi):
        return "n/a"
    if a_hi < b_lo:
        return "better" if not m.higher_is_better else "worse"
    if a_lo > b_hi:
        return "worse" if not m.higher_is_better else "better"
    return "same"


def read_history(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _same_key(history: pd.DataFrame, rec: dict) -> pd.DataFrame:
    if history.empty:
        return history
    mask = np.ones(len(history), dtype=bool)
    for k in COMPARE_KEY:
        mask &= (history[k] == rec[k]).to_numpy() if k in history else False
    return history[mask].sort_values("created_at")


def judge(rec: dict, history: pd.DataFrame, tolerance: float, window: int) -> list[str]:
    """Fill rec's verdict fields (baseline_run_id, regression, regressed, verdict) and return
    the verdict as readable lines."""
    earlier = _same_key(history, rec)
    good = earlier[~earlier.regression.astype(bool)] if not earlier.empty else earlier
    head = (f"quality benchmark {rec['model']} ({rec['scheduler']}, {rec['steps']} steps, guidance "
            f"{rec['guidance']:g}, {rec['height']}x{rec['width']}, n = {rec['n']}) on {rec['device_name']}, "
            f"commit {rec.get('git_commit') or 'unknown'}")
    if good.empty:
        rec.update(baseline_run_id=None, regression=False, regressed="", verdict="baseline")
        return [head, "no earlier good run of this suite, model and device: this run is the baseline", "verdict: ok"]
    base = good.iloc[-1].to_dict()
    lines = [head, f"against run {base['run_id']} ({base['created_at']}, commit {base.get('git_commit') or 'unknown'})"]
    changed = [f"{k} {base.get(k)} -> {rec.get(k)}" for k in CONFIG_KEYS + PROVENANCE_KEYS
               if k in base and str(base.get(k)) != str(rec.get(k))]
    if changed:
        lines.append("  changed since: " + ", ".join(changed))
    regressed = []
    for m in METRICS:
        outcome = compare_metric(m, rec, base)
        if outcome == "n/a":
            continue
        lines.append(f"  {m.label}: {rec[m.name]:.4g} [{rec[m.lo]:.4g}, {rec[m.hi]:.4g}] vs {base[m.name]:.4g} "
                     f"[{base[m.lo]:.4g}, {base[m.hi]:.4g}]: " + {
                         "worse": "WORSE (intervals apart)", "better": "better (intervals apart)",
                         "same": "same (intervals overlap)"}[outcome])
        if outcome == "worse":
            regressed.append(m.label)
    speeds = good.images_per_s.tail(window)
    median = float(speeds.median())
    slow = rec["images_per_s"] < (1 - tolerance) * median
    lines.append(f"  images/s: {rec['images_per_s']:.3g} vs median {median:.3g} of the last {len(speeds)} good "
                 f"run(s): " + (f"SLOWER beyond {tolerance:.0%}" if slow else f"within {tolerance:.0%}"))
    if slow:
        regressed.append("images/s")
    rec.update(baseline_run_id=base["run_id"], regression=bool(regressed), regressed=",".join(regressed),
               verdict="regression" if regressed else "ok")
    lines.append(f"verdict: REGRESSION in {', '.join(regressed)}" if regressed else "verdict: ok")
    return lines


def append(rec: dict, history: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Append rec to the history file (written whole through a temporary file, so a crash
    never leaves half a history) and return the new history."""
    new = pd.DataFrame([rec])
    combined = new if history.empty else pd.concat([history, new], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    combined.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return combined


def plot(history: pd.DataFrame, rec: dict, path: Path) -> Path:
    """One panel per judged metric plus images/s, over this key's runs in time order:
    value with its interval; red where that panel's quantity regressed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _same_key(history, rec).reset_index(drop=True)
    panels = [m for m in METRICS if m.name in runs and runs[m.name].notna().any()]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(max(6, 0.6 * len(runs) + 3), 2.2 * (len(panels) + 1)),
                             sharex=True, squeeze=False)
    x = np.arange(len(runs))
    regressed = runs.regressed.fillna("").str.split(",")
    for ax, m in zip(axes[:, 0], panels):
        y = runs[m.name].to_numpy(float)
        err = np.vstack([y - runs[m.lo].to_numpy(float), runs[m.hi].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=err, fmt="o-", color="tab:blue", capsize=3)
        bad = regressed.apply(lambda names, label=m.label: label in names).to_numpy(bool)
        ax.plot(x[bad], y[bad], "o", color="tab:red", zorder=3)
        ax.set_ylabel(m.label + (" (higher better)" if m.higher_is_better else " (lower better)"), fontsize=8)
    ax = axes[-1, 0]
    bad = regressed.apply(lambda names: "images/s" in names).to_numpy(bool)
    ax.plot(x, runs.images_per_s, "o-", color="tab:green")
    ax.plot(x[bad], runs.images_per_s[bad], "o", color="tab:red", zorder=3)
    ax.set_ylabel("images/s", fontsize=8)
    ax.set_xticks(x, [f"{r.created_at[5:16]}\n{r.git_commit or ''}" for r in runs.itertuples()], fontsize=7)
    fig.suptitle(f"quality history: {rec['model']} on {rec['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
