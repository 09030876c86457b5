"""The evaluation report: a self-contained `report.html`, plot PNGs and a Markdown metrics table.

`write_report(metrics, grid, out_dir, ...)` writes `out_dir/report.html` with

- a header table of run metadata and a prominent box of statistical warnings,
- the metrics table (one row per configuration, bootstrap intervals as `12.3 [11.1, 13.6]`),
- plots: FID vs steps (one line per scheduler, one panel per guidance, CI error bars);
  CLIP score vs FID with the Pareto front (low FID, high CLIP score) marked; quality (FID and
  CLIP score) vs accelerator seconds per image,
- image grids: rows are (prompt, seed), columns are configurations, so every image in a row
  starts from the same noise and differences along a row are the configuration's.

The page has no external resources and no JavaScript: plots and thumbnails are base64 data
URIs, styles are inline, and a Content-Security-Policy forbids anything else, so it opens
offline and can be mailed or archived as one file. Plots are also written next to it as PNGs.

Every metric column is optional: a missing or all-NaN column drops the table column, and a
plot that cannot be drawn is replaced by a one-line note saying why. The module depends only
on numpy, pandas, matplotlib and Pillow (no torch, diffusers or ray), so reports can be
rebuilt from `metrics.parquet` anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
import warnings as _warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "DEFAULT_KEYS",
    "PlotSkipped",
    "config_labels",
    "default_keys",
    "grid_html",
    "metrics_markdown",
    "pareto_front",
    "plot_clip_vs_fid",
    "plot_fid_vs_steps",
    "plot_quality_vs_cost",
    "write_report",
]

DEFAULT_KEYS = ("model", "height", "width", "scheduler", "steps", "guidance")

# (column, header, ci_lo column, ci_hi column, spread column): the order of the metrics table.
_METRIC_COLUMNS = (
    ("n", "n", None, None, None),
    ("n_error", "errors", None, None, None),
    ("fid", "FID", "fid_ci_lo", "fid_ci_hi", None),
    ("kid", "KID", None, None, "kid_std"),
    ("clip_score", "CLIP score", "clip_score_ci_lo", "clip_score_ci_hi", None),
    ("attribute_accuracy", "attribute acc.", "attribute_accuracy_ci_lo", "attribute_accuracy_ci_hi", None),
    ("diversity", "diversity", None, None, None),
    ("vendi", "Vendi", None, None, None),
    ("gen_seconds", "GPU s / image", None, None, None),
    ("images_per_gpu_second", "images / GPU s", None, None, None),
)
_INT_COLUMNS = {"n", "n_error"}
_HTML_HEADERS = {"kid": "KID ± sd", "gen_seconds": "GPU s / img", "images_per_gpu_second": "img / GPU s",
                 "attribute_accuracy": "attribute accuracy"}
_LABELS = {
    "fid": "FID (lower is better)",
    "clip_score": "CLIP score (higher is better)",
    "kid": "KID (lower is better)",
    "attribute_accuracy": "attribute accuracy (higher is better)",
    "gen_seconds": "accelerator seconds per image",
}
_PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939",
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_PLOT_DPI = 110
_GRID_WIDTH_PX = 1120  # room for image columns in the page (main is 1400 px wide, less the prompt column)


class PlotSkipped(ValueError):
    """A plot cannot be drawn from this metrics frame (a column is missing or all-NaN); the
    message says why in a form fit to show to the reader."""


# --------------------------------------------------------------------------- small helpers


def default_keys(metrics: pd.DataFrame) -> list[str]:
    """The run-key columns (model, height, width, scheduler, steps, guidance) present in `metrics`."""
    return [k for k in DEFAULT_KEYS if k in metrics.columns]


def _resolve_keys(metrics: pd.DataFrame, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        return default_keys(metrics)
    return [k for k in keys if k in metrics.columns]


def _numeric(df: pd.DataFrame, col: str | None) -> pd.Series | None:
    """`df[col]` as float, or None when the column is absent or has no finite value."""
    if col is None or col not in df.columns:
        return None
    s = pd.to_numeric(df[col], errors="coerce").astype("float64")
    s = s.where(np.isfinite(s))
    return None if s.isna().all() else s


def _has(df: pd.DataFrame, col: str) -> bool:
    return _numeric(df, col) is not None


def _decimals(v: float) -> int:
    """Decimals that show 3 significant figures, at least 1 decimal, at most 6."""
    if not math.isfinite(v) or v == 0:
        return 1
    return int(min(6, max(1, 2 - math.floor(math.log10(abs(v))))))


def _fmt_num(v, decimals: int | None = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    v = float(v)
    d = _decimals(v) if decimals is None else decimals
    return f"{v:.{d}f}"


def _fmt_ci(v, lo=None, hi=None) -> str:
    """`12.3 [11.1, 13.6]`: the interval with as many decimals as the value."""
    if v is None or pd.isna(v):
        return "–"
    d = _decimals(float(v))
    s = _fmt_num(v, d)
    if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
        s += f" [{_fmt_num(lo, d)}, {_fmt_num(hi, d)}]"
    return s


def _fmt_key(v) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v)


def _label_part(key: str, v) -> str:
    s = _fmt_key(v)
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
    keys = _resolve_keys(metrics, keys)
    varying = [k for k in keys if metrics[k].nunique(dropna=False) > 1]
    if not varying:
        varying = keys[:]

    def one(row) -> str:
        parts = []
        for k in varying:
            if k == "width" and "height" in varying:
                continue
            if k == "height" and "width" in metrics.columns:
                parts.append(f"{_fmt_key(row['height'])}x{_fmt_key(row['width'])}")
            else:
                parts.append(_label_part(k, row[k]))
        return " ".join(parts) if parts else "all"

    if len(metrics) == 0:
        return pd.Series([], index=metrics.index, dtype="object")
    return pd.Series([one(r) for _, r in metrics.iterrows()], index=metrics.index, dtype="object")


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


# --------------------------------------------------------------------------- tables


def _table_columns(metrics: pd.DataFrame):
    return [c for c in _METRIC_COLUMNS if _has(metrics, c[0])]


def _cell(row, spec) -> str:
    col, _, lo, hi, spread = spec
    v = row.get(col)
    if col in _INT_COLUMNS:
        return "–" if v is None or pd.isna(v) else str(int(v))
    if lo is not None:
        return _fmt_ci(v, row.get(lo), row.get(hi))
    if spread is not None and spread in row.index and not pd.isna(row.get(spread)) and not pd.isna(v):
        d = _decimals(float(v))
        return f"{_fmt_num(v, d)} ± {_fmt_num(row[spread], d)}"
    return _fmt_num(v)


def _header(spec, ci_level: float) -> str:
    col, name, lo, _, spread = spec
    if lo is not None:
        return f"{name} [{ci_level:.0%} CI]"
    if spread is not None:
        return f"{name} ± sd"
    return name


def _md_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def metrics_markdown(metrics: pd.DataFrame, keys: Sequence[str] | None = None, *, ci_level: float = 0.95) -> str:
    """A Markdown table of `metrics`: the key columns, then each metric present (missing or
    all-NaN columns are left out), intervals written `12.3 [11.1, 13.6]` and KID as
    `0.0123 ± 0.0020`. Used for metrics.md and printed to the terminal."""
    keys = _resolve_keys(metrics, keys)
    specs = _table_columns(metrics)
    header = list(keys) + [_header(s, ci_level) for s in specs]
    if not header:
        return "_no metrics_\n"
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---" if i < len(keys) else "---:" for i in range(len(header))) + "|",
    ]
    for _, row in metrics.iterrows():
        cells = [_fmt_key(row[k]) for k in keys] + [_cell(row, s) for s in specs]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _metrics_table_html(metrics: pd.DataFrame, keys: list[str], ci_level: float) -> str:
    specs = _table_columns(metrics)
    front = pareto_front(metrics) if _has(metrics, "fid") and _has(metrics, "clip_score") else None
    best = {}
    for col, better in (("fid", "min"), ("kid", "min"), ("clip_score", "max"), ("attribute_accuracy", "max")):
        s = _numeric(metrics, col)
        if s is not None and s.notna().sum() > 1:
            best[col] = s.min() if better == "min" else s.max()
    constant = [k for k in keys if len(metrics) > 1 and metrics[k].nunique(dropna=False) == 1]
    keys = [k for k in keys if k not in constant]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    head += "".join(f'<th class="num">{html.escape(_HTML_HEADERS.get(s[0], s[1]))}</th>' for s in specs)
    if front is not None:
        head += '<th title="on the FID / CLIP score Pareto front">front</th>'
    rows = []
    for i, (_, row) in enumerate(metrics.iterrows()):
        tds = "".join(f"<td>{html.escape(_fmt_key(row[k]))}</td>" for k in keys)
        for s in specs:
            cls = "num"
            v = row.get(s[0])
            if s[0] in best and v is not None and not pd.isna(v) and float(v) == best[s[0]]:
                cls += " best"
            tds += f'<td class="{cls}">{html.escape(_cell(row, s))}</td>'
        if front is not None:
            tds += f'<td class="front">{"★" if bool(front.iloc[i]) else ""}</td>'
        rows.append(f"<tr>{tds}</tr>")
    same = ""
    if constant:
        same = '<p class="sub">Same for every row: ' + ", ".join(
            f"{html.escape(k)} = <b>{html.escape(_fmt_key(metrics[k].iloc[0]))}</b>" for k in constant) + "</p>"
    return (
        same + '<div class="scroll"><table class="metrics"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


# --------------------------------------------------------------------------- plots


def _line_keys(keys: list[str], metrics: pd.DataFrame) -> list[str]:
    """Keys that identify a line in the steps plots: everything but steps and guidance that varies."""
    return [k for k in keys if k not in ("steps", "guidance") and metrics[k].nunique(dropna=False) > 1]


def _line_label(row, line_keys: list[str]) -> str:
    if not line_keys:
        return "all"
    parts = []
    for k in line_keys:
        if k == "width" and "height" in line_keys:
            continue
        if k == "height" and "width" in line_keys:
            parts.append(f"{_fmt_key(row['height'])}x{_fmt_key(row['width'])}")
        else:
            parts.append(_label_part(k, row[k]))
    return " ".join(parts)


def _colors(labels: Iterable[str]) -> dict[str, str]:
    return {lab: _PALETTE[i % len(_PALETTE)] for i, lab in enumerate(sorted(set(labels)))}


def _sort_key_values(values) -> list:
    vals = list(pd.unique(pd.Series(values)))
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _yerr(df: pd.DataFrame, col: str, lo: str, hi: str):
    slo, shi = _numeric(df, lo), _numeric(df, hi)
    if slo is None or shi is None:
        return None
    v = df[col].to_numpy(dtype=np.float64)
    lo_err = np.clip(v - slo.to_numpy(), 0, None)
    hi_err = np.clip(shi.to_numpy() - v, 0, None)
    return np.nan_to_num(np.vstack([lo_err, hi_err]), nan=0.0)


def _style_axes(ax) -> None:
    ax.grid(True, color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _guidance_markers(df: pd.DataFrame) -> dict:
    if "guidance" not in df.columns or df["guidance"].nunique() < 2:
        return {}
    return {g: _MARKERS[i % len(_MARKERS)] for i, g in enumerate(_sort_key_values(df["guidance"].dropna()))}


def _scatter_groups(ax, df: pd.DataFrame, x: str, y: str, colors: dict, markers: dict) -> None:
    """Points coloured by `_color` and shaped by guidance."""
    for lab in sorted(df["_color"].unique()):
        part = df[df["_color"] == lab]
        groups = [(markers[g], part[part["guidance"] == g]) for g in markers] if markers else [("o", part)]
        for m, pts in groups:
            if len(pts):
                ax.scatter(pts[x], pts[y], s=42, color=colors[lab], marker=m, zorder=3, edgecolor="white",
                           linewidth=0.6)


def _legend_handles(colors: dict, markers: dict, line_keys: list[str]) -> list:
    handles = [Line2D([], [], color=colors[lab], marker="o", linestyle="", label=lab) for lab in sorted(colors)]
    if not line_keys:
        handles = []
    handles += [Line2D([], [], color="#444", marker=m, linestyle="", label=f"guidance {_fmt_key(g)}")
                for g, m in markers.items()]
    return handles


def plot_fid_vs_steps(metrics: pd.DataFrame, *, keys: Sequence[str] | None = None, metric: str = "fid") -> Figure:
    """`metric` (default FID) against steps: one line per scheduler (and per any other varying
    key but guidance), one panel per guidance value, bootstrap-CI error bars where present.
    Raises PlotSkipped when steps or the metric is missing."""
    metrics = metrics.reset_index(drop=True)
    keys = _resolve_keys(metrics, keys)
    if metric not in metrics.columns or not _has(metrics, metric):
        raise PlotSkipped(f"no {metric.upper() if metric == 'fid' else metric} values (no reference set?)")
    if "steps" not in metrics.columns or not _has(metrics, "steps"):
        raise PlotSkipped("no steps column")
    df = metrics.copy()
    df[metric] = _numeric(df, metric)
    df["_steps"] = _numeric(df, "steps")
    df = df[df[metric].notna() & df["_steps"].notna()]
    line_keys = _line_keys(keys, df)
    df["_line"] = [_line_label(r, line_keys) for _, r in df.iterrows()] if len(df) else []
    has_g = "guidance" in df.columns and df["guidance"].notna().any()
    if has_g:
        df = df[df["guidance"].notna()]
    panels = _sort_key_values(df["guidance"]) if has_g else [None]
    colors = _colors(df["_line"])
    lo, hi = f"{metric}_ci_lo", f"{metric}_ci_hi"

    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.4 * ncols + 1.6, 3.4 * nrows + 0.6), dpi=_PLOT_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    steps_ticks = sorted(df["_steps"].unique())
    log_x = len(steps_ticks) > 1 and steps_ticks[0] > 0 and steps_ticks[-1] / steps_ticks[0] >= 8
    for ax, g in zip(axes, panels):
        sub = df if g is None else df[df["guidance"] == g]
        for lab in sorted(sub["_line"].unique()):
            part = sub[sub["_line"] == lab]
            cols = [metric] + [c for c in (lo, hi) if c in part.columns]
            part = part.groupby("_steps", as_index=False)[cols].mean(numeric_only=True).sort_values("_steps")
            ax.errorbar(
                part["_steps"], part[metric], yerr=_yerr(part, metric, lo, hi),
                color=colors[lab], marker="o", markersize=4.5, linewidth=1.8, capsize=3, elinewidth=1, label=lab,
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(steps_ticks)
        ax.set_xticklabels([f"{s:g}" for s in steps_ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title("all" if g is None else f"guidance {_fmt_key(g)}", fontsize=11)
        _style_axes(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for r in range(nrows):
        axes[r * ncols].set_ylabel(_LABELS.get(metric, metric))
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[1 : len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if len(seen) > 1 or line_keys:
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside right upper", frameon=False, fontsize=9)
    fig.suptitle(f"{'FID' if metric == 'fid' else metric} vs steps" + (", per guidance" if has_g else ""), fontsize=12)
    return fig


def plot_clip_vs_fid(
    metrics: pd.DataFrame, *, keys: Sequence[str] | None = None, x: str = "fid", y: str = "clip_score",
    max_labels: int = 12,
) -> Figure:
    """Scatter of `y` (CLIP score) against `x` (FID), one point per configuration with CI error
    bars, colour per scheduler and marker per guidance, the Pareto front (low x, high y) drawn as
    a step line with its points ringed and labelled; other points are labelled in full too when
    there are at most `max_labels`, else by their steps only."""
    metrics = metrics.reset_index(drop=True)
    keys = _resolve_keys(metrics, keys)
    for col in (x, y):
        if not _has(metrics, col):
            raise PlotSkipped(f"no {col} values")
    df = metrics.copy()
    df[x], df[y] = _numeric(df, x), _numeric(df, y)
    df = df[df[x].notna() & df[y].notna()]
    df["_label"] = config_labels(df, keys) if len(df) else []
    front = pareto_front(df, x, y)
    line_keys = _line_keys(keys, df)
    df["_color"] = [_line_label(r, line_keys) for _, r in df.iterrows()] if len(df) else []
    colors = _colors(df["_color"])
    markers = _guidance_markers(df)

    fig = Figure(figsize=(9.8, 5.8), dpi=_PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    xerr = _yerr(df, x, f"{x}_ci_lo", f"{x}_ci_hi")
    yerr = _yerr(df, y, f"{y}_ci_lo", f"{y}_ci_hi")
    if xerr is not None or yerr is not None:
        ax.errorbar(df[x], df[y], xerr=xerr, yerr=yerr, fmt="none", ecolor="#c4c4c4", elinewidth=0.9, zorder=1)
    _scatter_groups(ax, df, x, y, colors, markers)
    f = df[front].sort_values(x)
    if len(f):
        ax.step(f[x], f[y], where="post", color="black", linestyle="--", linewidth=1.2, zorder=2)
        ax.scatter(f[x], f[y], s=170, facecolor="none", edgecolor="black", linewidth=1.4, zorder=4)
    short = "steps" in keys and len(df) > max_labels  # many points: off-front points get their steps only
    for _, r in df.iterrows():
        on = bool(front.get(r.name, False))
        if on or not short:
            text, size, color = r["_label"], 7.5, "#111" if on else "#555"
        else:
            text, size, color = _fmt_key(r["steps"]), 7, "#666"
        ax.annotate(text, (r[x], r[y]), xytext=(5, 4), textcoords="offset points", fontsize=size, color=color,
                    zorder=5, fontweight="bold" if on else "normal")
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    ax.text(0.01, 0.99, "better ↖", transform=ax.transAxes, ha="left", va="top", fontsize=9, color="#555")
    _style_axes(ax)
    handles = _legend_handles(colors, markers, line_keys)
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=11, linestyle="--",
                          label="Pareto front"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    title = f"{'CLIP score' if y == 'clip_score' else y} vs {'FID' if x == 'fid' else x}"
    ax.set_title(title + (" (numbers: steps)" if short else ""), fontsize=12)
    return fig


def _seconds(metrics: pd.DataFrame) -> pd.Series | None:
    s = _numeric(metrics, "gen_seconds")
    if s is None:
        ips = _numeric(metrics, "images_per_gpu_second")
        if ips is not None:
            s = 1.0 / ips.where(ips > 0)
    return s


def plot_quality_vs_cost(metrics: pd.DataFrame, *, keys: Sequence[str] | None = None) -> Figure:
    """FID and CLIP score (one panel each, whichever are present) against accelerator seconds
    per image: colour per scheduler, marker per guidance, steps written next to each point,
    and the cost/quality Pareto front dashed."""
    metrics = metrics.reset_index(drop=True)
    keys = _resolve_keys(metrics, keys)
    secs = _seconds(metrics)
    if secs is None:
        raise PlotSkipped("no gen_seconds / images_per_gpu_second values")
    quality = [(c, better) for c, better in (("fid", "min"), ("clip_score", "max")) if _has(metrics, c)]
    if not quality:
        raise PlotSkipped("no FID or CLIP score values")
    df = metrics.copy()
    df["_sec"] = secs
    df = df[df["_sec"].notna()]
    line_keys = _line_keys(keys, df)
    df["_color"] = [_line_label(r, line_keys) for _, r in df.iterrows()] if len(df) else []
    colors = _colors(df["_color"])
    markers = _guidance_markers(df)
    has_steps = "steps" in df.columns

    fig = Figure(figsize=(5.0 * len(quality) + 2.0, 4.4), dpi=_PLOT_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(quality), squeeze=False)).ravel()
    sec_vals = df["_sec"][df["_sec"] > 0]
    log_x = len(sec_vals) > 1 and sec_vals.max() / sec_vals.min() >= 10
    for ax, (col, better) in zip(axes, quality):
        sub = df.assign(_q=_numeric(df, col))
        sub = sub[sub["_q"].notna()]
        yerr = _yerr(sub.assign(**{col: sub["_q"]}), col, f"{col}_ci_lo", f"{col}_ci_hi")
        if yerr is not None:
            ax.errorbar(sub["_sec"], sub["_q"], yerr=yerr, fmt="none", ecolor="#c4c4c4", elinewidth=0.9, zorder=1)
        _scatter_groups(ax, sub, "_sec", "_q", colors, markers)
        if has_steps and len(sub) <= 60:
            for _, r in sub.iterrows():
                ax.annotate(_fmt_key(r["steps"]), (r["_sec"], r["_q"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=7, color="#555")
        # cost/quality front: minimise seconds, and minimise FID / maximise CLIP score
        fr = pareto_front(sub.assign(_qq=sub["_q"] if better == "max" else -sub["_q"]), "_sec", "_qq")
        f = sub[fr].sort_values("_sec")
        if len(f) > 1:
            ax.step(f["_sec"], f["_q"], where="post", color="black", linestyle="--", linewidth=1, zorder=2)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(_LABELS["gen_seconds"])
        ax.set_ylabel(_LABELS.get(col, col))
        _style_axes(ax)
    handles = _legend_handles(colors, markers, line_keys)
    handles.append(Line2D([], [], color="black", linestyle="--", label="cost/quality front"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    fig.suptitle("quality vs cost" + (" (numbers: steps)" if has_steps else ""), fontsize=12)
    return fig


def _fig_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PLOT_DPI, facecolor="white")
    return buf.getvalue()


# --------------------------------------------------------------------------- image grid


def _image_bytes(v) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, dict):
        v = v.get("bytes")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 1:
        return v.tobytes()
    return None


def _thumbnail(v, px: int) -> tuple[str, int, int] | None:
    """(PNG data URI at most `px` on its longer side, width, height), or None if `v` is no image."""
    from PIL import Image

    try:
        if hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image
            im = v
        else:
            data = _image_bytes(v)
            if data is None:
                return None
            im = Image.open(io.BytesIO(data))
            im.load()
        im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
        if max(im.size) > px:
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    except Exception:  # an undecodable image is shown as a gap, not a crash
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), im.size[0], im.size[1]


def grid_html(
    grid: pd.DataFrame | None,
    *,
    max_prompts: int = 8,
    max_configs: int = 12,
    seeds_per_prompt: int = 1,
    thumb_px: int = 128,
) -> str:
    """An HTML table of thumbnails: one row per (prompt, seed), one column per configuration
    (in order of first appearance), at most `max_prompts` prompts x `seeds_per_prompt` seeds
    and `max_configs` configurations. For each prompt the seeds with images for the most
    configurations are taken, so a row compares configurations on the same noise."""
    need = {"prompt", "seed", "config", "image"}
    if grid is None or len(grid) == 0:
        return '<p class="note">No images were given for the grid.</p>'
    if not need <= set(grid.columns):
        return f'<p class="note">Grid skipped: missing column(s) {", ".join(sorted(need - set(grid.columns)))}.</p>'
    g = grid[grid["image"].notna()]
    g = g.drop_duplicates(["prompt", "seed", "config"], keep="first")
    all_configs = list(pd.unique(g["config"].astype(str)))
    configs = all_configs[:max_configs]
    g = g[g["config"].astype(str).isin(configs)]
    all_prompts = list(pd.unique(g["prompt"]))
    prompts = all_prompts[:max_prompts]
    cells = {(p, s, str(c)): img for p, s, c, img in zip(g["prompt"], g["seed"], g["config"], g["image"])}
    counts = g.groupby(["prompt", "seed"], sort=False).size()
    rows = []
    for p in prompts:
        seeds = counts.loc[p].sort_values(ascending=False, kind="stable").index[:seeds_per_prompt]
        rows += [(p, s) for s in seeds]
    # thumbnails are stored at thumb_px but shown smaller when needed so that the grid fits the page
    show = int(max(48, min(thumb_px, _GRID_WIDTH_PX // max(1, len(configs)) - 6)))
    head = "".join(f'<th class="cfg" style="max-width:{show + 6}px">{html.escape(c)}</th>' for c in configs)
    body = []
    for p, s in rows:
        tds = []
        for c in configs:
            thumb = _thumbnail(cells.get((p, s, c)), thumb_px) if (p, s, c) in cells else None
            if thumb is None:
                tds.append(f'<td class="img missing" style="width:{show}px;height:{show}px">–</td>')
            else:
                uri, w, h = thumb
                scale = show / max(w, h)  # small images are scaled up, large ones down, aspect kept
                w, h = max(1, round(w * scale)), max(1, round(h * scale))
                alt = html.escape(f"{p} | seed {s} | {c}", quote=True)
                tds.append(f'<td class="img"><img src="{uri}" alt="{alt}" title="{alt}" '
                           f'width="{w}" height="{h}"></td>')
        body.append(
            f'<tr><th class="prompt"><div>{html.escape(str(p))}</div><div class="seed">seed {html.escape(str(s))}'
            f"</div></th>{''.join(tds)}</tr>"
        )
    note = ""
    if len(all_configs) > len(configs) or len(all_prompts) > len(prompts):
        note = (f'<p class="note">Showing {len(prompts)} of {len(all_prompts)} prompts and '
                f"{len(configs)} of {len(all_configs)} configurations.</p>")
    return (
        note + '<div class="scroll"><table class="grid"><thead><tr><th class="prompt">prompt / seed</th>'
        + head + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
    )


# --------------------------------------------------------------------------- the page

_CSS = """
:root { --fg:#1d2125; --muted:#5f6b76; --line:#dde2e6; --bg:#ffffff; --soft:#f5f7f9; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--soft); color:var(--fg);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
section { background: var(--bg); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
  margin: 18px 0; }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; }
.sub { color: var(--muted); margin: 0 0 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; }
table.meta td, table.meta th { text-align: left; padding: 3px 14px 3px 0; vertical-align: top; }
table.meta th { color: var(--muted); font-weight: 600; white-space: nowrap; }
table.meta td { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
  word-break: break-all; }
table.metrics { font-size: 12.5px; }
table.metrics th, table.metrics td { padding: 4px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
table.metrics thead th { background: var(--soft); text-align: left; white-space: normal; vertical-align: bottom;
  min-width: 3.5em; }
table.metrics tbody tr:nth-child(even) { background: #fafbfc; }
table.metrics td.num, table.metrics th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.best { font-weight: 700; color: #0b6b2f; }
table.metrics td.front { text-align: center; color: #b07800; }
.warnings { background: #fff6e0; border: 1px solid #e8b339; border-left: 6px solid #e09b00; border-radius: 8px;
  padding: 12px 18px; margin: 18px 0; }
.warnings h2 { border: none; margin: 0 0 6px; padding: 0; color: #7a4d00; }
.warnings ul { margin: 0; padding-left: 20px; }
.warnings li { margin: 4px 0; }
.ok { background: #eaf6ee; border: 1px solid #9fd3b0; border-radius: 8px; padding: 8px 16px; margin: 18px 0;
  color: #1d5a32; }
figure { margin: 8px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: 13px; max-width: 980px; margin-top: 4px; }
.note { color: var(--muted); font-style: italic; margin: 6px 0; }
table.grid th, table.grid td { padding: 3px; }
table.grid th.cfg { font-size: 11px; font-weight: 600; white-space: normal; vertical-align: bottom;
  text-align: center; }
table.grid th.prompt { text-align: left; font-weight: normal; font-size: 12.5px; width: 190px; min-width: 150px;
  vertical-align: middle; padding-right: 10px; }
table.grid .seed { color: var(--muted); font-size: 11px; }
table.grid td.img img { display: block; border-radius: 3px; image-rendering: auto; }
table.grid td.missing { background: var(--soft); color: var(--muted); text-align: center; vertical-align: middle; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""

_PLOTS = (
    ("fid_vs_steps", "FID vs steps", plot_fid_vs_steps,
     "One line per scheduler, one panel per guidance scale; bars are bootstrap confidence intervals. "
     "Lines flattening out mean more steps no longer buy quality; overlapping bars mean the ranking is "
     "not established at this sample size."),
    ("clip_vs_fid", "CLIP score vs FID", plot_clip_vs_fid,
     "Each point is a configuration. Ringed points joined by the dashed line form the Pareto front: no other "
     "configuration has both lower FID and higher CLIP score. Points off the front are beaten on both."),
    ("quality_vs_cost", "Quality vs GPU-seconds per image", plot_quality_vs_cost,
     "Quality against accelerator seconds per image (numbers: steps; colour: scheduler; marker: guidance). "
     "The dashed line is the cost/quality front: the cheapest configuration for each quality level."),
)


def _meta_html(meta: Mapping[str, object] | None) -> str:
    if not meta:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items()
    )
    return f'<table class="meta">{rows}</table>'


def _warnings_html(warns: Sequence[str]) -> str:
    if not warns:
        return '<div class="ok">No statistical warnings.</div>'
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in warns)
    return (f'<div class="warnings" id="warnings"><h2>⚠ {len(warns)} statistical warning'
            f'{"s" if len(warns) != 1 else ""}</h2><ul>{items}</ul></div>')


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(
    metrics: pd.DataFrame | None,
    grid: pd.DataFrame | None,
    out_dir,
    *,
    keys: Sequence[str] | None = None,
    title: str = "diffsweep report",
    warnings: Sequence[str] = (),
    meta: Mapping[str, object] | None = None,
    ci_level: float = 0.95,
    max_grid_prompts: int = 8,
    max_grid_configs: int = 12,
    seeds_per_prompt: int = 1,
    thumb_px: int = 128,
    save_plots: bool = True,
) -> Path:
    """Write `out_dir/report.html` (self-contained) and, with `save_plots`, each plot as
    `out_dir/<name>.png` (fid_vs_steps, clip_vs_fid, quality_vs_cost). Returns the HTML path.

    `metrics` has one row per configuration (key columns plus any of the metric columns; all
    optional), `grid` has columns prompt, seed, config, image (PNG bytes). A plot that cannot
    be drawn becomes a note; nothing in the data makes this raise."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame() if metrics is None else metrics.reset_index(drop=True)
    keys = _resolve_keys(metrics, keys)
    warns = [warnings] if isinstance(warnings, str) else [str(w) for w in (warnings or ())]

    if len(metrics):
        table = _metrics_table_html(metrics, keys, ci_level)
        table_note = (f'<p class="sub">Brackets: bootstrap {ci_level:.0%} confidence intervals. '
                      "Bold: best point estimate in the column (overlapping intervals mean the order is not established). ★: on the FID / CLIP score Pareto front. "
                      "GPU s / img: mean accelerator seconds per image.</p>")
    else:
        table, table_note = '<p class="note">No metrics.</p>', ""

    plots = []
    for name, heading, fn, caption in _PLOTS:
        png_path = out / f"{name}.png"
        try:
            if not len(metrics):
                raise PlotSkipped("no metrics")
            fig = fn(metrics, keys=keys)
            png = _fig_png(fig)
        except PlotSkipped as e:
            plots.append(f'<h3>{html.escape(heading)}</h3><p class="note">Skipped: {html.escape(str(e))}.</p>')
            if save_plots:
                png_path.unlink(missing_ok=True)  # no stale plot from an earlier run
            continue
        except Exception as e:  # a bug in one plot must not lose the whole report
            _warnings.warn(f"report: plot {name} failed: {e!r}", RuntimeWarning, stacklevel=2)
            plots.append(f'<h3>{html.escape(heading)}</h3><p class="note">Plot failed: {html.escape(repr(e))}.</p>')
            continue
        if save_plots:
            _atomic_write(png_path, png)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        plots.append(
            f'<figure id="{name}"><h3>{html.escape(heading)}</h3><img src="{uri}" alt="{html.escape(heading)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    try:
        grid_part = grid_html(grid, max_prompts=max_grid_prompts, max_configs=max_grid_configs,
                              seeds_per_prompt=seeds_per_prompt, thumb_px=thumb_px)
    except Exception as e:
        _warnings.warn(f"report: image grid failed: {e!r}", RuntimeWarning, stacklevel=2)
        grid_part = f'<p class="note">Image grid failed: {html.escape(repr(e))}.</p>'

    n_cfg = len(metrics)
    n_img = int(pd.to_numeric(metrics["n"], errors="coerce").sum()) if "n" in metrics.columns else None
    summary = f"{n_cfg} configuration{'s' if n_cfg != 1 else ''}"
    if n_img is not None:
        summary += f", {n_img} images"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(summary)}</p>
<nav><a href="#metrics">Metrics</a><a href="#plots">Plots</a><a href="#grid">Image grid</a></nav>
</header>
{_warnings_html(warns)}
{f'<section id="meta"><h2>Run</h2>{_meta_html(meta)}</section>' if meta else ''}
<section id="metrics"><h2>Metrics</h2>{table_note}{table}</section>
<section id="plots"><h2>Plots</h2>{''.join(plots)}</section>
<section id="grid"><h2>Image grid</h2>
<p class="sub">Rows: prompt and seed; columns: configurations. Every image in a row starts from the same seed,
so differences along a row are the configuration's.</p>
{grid_part}</section>
<footer>generated by diffsweep evals.report</footer>
</main>
</body>
</html>
"""
    path = out / "report.html"
    _atomic_write(path, page.encode("utf-8"))
    return path
