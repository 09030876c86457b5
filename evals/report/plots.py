"""The report's plots, as matplotlib Figures: FID vs steps (one line per scheduler, one panel
per guidance, CI error bars, lines dodged sideways so bars at one step do not cover each
other); CLIP score vs FID with the Pareto front marked and point labels placed where they
overlap neither each other nor a point; quality vs seconds per image on the run's device
with the cost/quality front.

"FID" in every plot is the headline FID (`evals.metrics_table.headline_fid`): FID-infinity
with its interval, whose bars cover the population FID; frames without it (older metrics
files) plot the plain FID, labelled "FID at n", with its bootstrap spread; and KID when
every group has fewer images than the feature dimension (both FIDs invalid there).

A plot that cannot be drawn from the frame (a column missing or all-NaN) raises PlotSkipped
with a reason fit to show the reader; the page shows that reason instead of the plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from evals.metrics_table import headline_fid, interval_columns
from evals.report.format import config_labels, device_kind, fmt_key, has_values, key_columns, label_part, numeric
from evals.report.pareto import pareto_front

_LABELS = {
    "fid_inf": "FID-infinity (bias-corrected, lower is better)",
    "fid": "FID at n (lower is better)",
    "clip_score": "CLIP score (higher is better)",
    "kid": "KID (lower is better)",
    "attribute_accuracy": "attribute accuracy (higher is better)",
}
_PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939",
)
_NAMES = {"fid_inf": "FID-infinity", "fid": "FID at n", "clip_score": "CLIP score", "kid": "KID"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_PLOT_DPI = 110


class PlotSkipped(ValueError):
    """A plot cannot be drawn from this metrics frame (a column is missing or all-NaN); the
    message says why in a form fit to show to the reader."""



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
            parts.append(f"{fmt_key(row['height'])}x{fmt_key(row['width'])}")
        else:
            parts.append(label_part(k, row[k]))
    return " ".join(parts)


def _colors(labels: Iterable[str]) -> dict[str, str]:
    return {lab: _PALETTE[i % len(_PALETTE)] for i, lab in enumerate(sorted(set(labels)))}


def _sort_key_values(values) -> list:
    vals = list(pd.unique(pd.Series(values)))
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _yerr(df: pd.DataFrame, col: str):
    """Error bars of `col` from its interval columns, or None without them."""
    lo, hi = interval_columns(col)
    slo, shi = numeric(df, lo), numeric(df, hi)
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
    handles += [Line2D([], [], color="#444", marker=m, linestyle="", label=f"guidance {fmt_key(g)}")
                for g, m in markers.items()]
    return handles


def dodge(x: np.ndarray, i: int, n_lines: int, ticks: Sequence[float], log_x: bool) -> np.ndarray:
    """Line `i` of `n_lines`' x values shifted sideways so that error bars of lines at the same
    step sit side by side instead of on top of each other: the lines spread over 12% of the
    axis span (at most half the closest gap between steps), in log space on a log axis; the
    ticks stay at the true steps."""
    if n_lines < 2:
        return x
    t = np.log10(np.asarray(ticks, dtype=np.float64)) if log_x else np.asarray(ticks, dtype=np.float64)
    gaps = np.diff(np.unique(t))
    span = float(t.max() - t.min()) if len(gaps) else (0.3 if log_x else max(1.0, abs(float(t[0]))))
    spread = min(0.12 * span, 0.5 * float(gaps.min())) if len(gaps) else 0.12 * span
    shift = (i - (n_lines - 1) / 2) * spread / (n_lines - 1)
    return x * 10.0 ** shift if log_x else x + shift


def plot_fid_vs_steps(metrics: pd.DataFrame, *, keys: Sequence[str] | None = None, metric: str | None = None) -> Figure:
    """`metric` (default the headline FID) against steps: one line per scheduler (and per any
    other varying key but guidance), one panel per guidance value, interval error bars where
    present. Raises PlotSkipped when steps or the metric is missing."""
    metrics = metrics.reset_index(drop=True)
    keys = key_columns(metrics, keys)
    metric = metric or headline_fid(metrics)
    if metric not in metrics.columns or not has_values(metrics, metric):
        raise PlotSkipped(f"no {'FID' if metric in ('fid', 'fid_inf') else metric} values (no reference set?)")
    if "steps" not in metrics.columns or not has_values(metrics, "steps"):
        raise PlotSkipped("no steps column")
    df = metrics.copy()
    df[metric] = numeric(df, metric)
    df["_steps"] = numeric(df, "steps")
    df = df[df[metric].notna() & df["_steps"].notna()]
    line_keys = _line_keys(keys, df)
    df["_line"] = [_line_label(r, line_keys) for _, r in df.iterrows()] if len(df) else []
    has_g = "guidance" in df.columns and df["guidance"].notna().any()
    if has_g:
        df = df[df["guidance"].notna()]
    panels = _sort_key_values(df["guidance"]) if has_g else [None]
    colors = _colors(df["_line"])
    lo, hi = interval_columns(metric)

    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.4 * ncols + 1.6, 3.4 * nrows + 0.6), dpi=_PLOT_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    steps_ticks = sorted(df["_steps"].unique())
    lines = sorted(df["_line"].unique())
    log_x = len(steps_ticks) > 1 and steps_ticks[0] > 0 and steps_ticks[-1] / steps_ticks[0] >= 8
    for ax, g in zip(axes, panels):
        sub = df if g is None else df[df["guidance"] == g]
        for lab in sorted(sub["_line"].unique()):
            i = lines.index(lab)  # the same sideways shift in every panel
            part = sub[sub["_line"] == lab]
            cols = [metric] + [c for c in (lo, hi) if c in part.columns]
            part = part.groupby("_steps", as_index=False)[cols].mean(numeric_only=True).sort_values("_steps")
            ax.errorbar(
                dodge(part["_steps"].to_numpy(), i, len(lines), steps_ticks, log_x), part[metric],
                yerr=_yerr(part, metric),
                color=colors[lab], marker="o", markersize=4.5, linewidth=1.8, capsize=3, elinewidth=1, label=lab,
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(steps_ticks)
        ax.set_xticklabels([f"{s:g}" for s in steps_ticks])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title("all" if g is None else f"guidance {fmt_key(g)}", fontsize=11)
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
    fig.suptitle(f"{_NAMES.get(metric, metric)} vs steps" + (", per guidance" if has_g else ""), fontsize=12)
    return fig


def plot_clip_vs_fid(
    metrics: pd.DataFrame, *, keys: Sequence[str] | None = None, x: str | None = None, y: str = "clip_score",
    max_labels: int = 12,
) -> Figure:
    """Scatter of `y` (CLIP score) against `x` (the headline FID), one point per configuration with CI error
    bars, colour per scheduler and marker per guidance, the Pareto front (low x, high y) drawn as
    a step line with its points ringed and labelled; other points are labelled in full too when
    there are at most `max_labels`, else by their steps only."""
    metrics = metrics.reset_index(drop=True)
    keys = key_columns(metrics, keys)
    x = x or headline_fid(metrics)
    for col in (x, y):
        if not has_values(metrics, col):
            raise PlotSkipped(f"no {col} values")
    df = metrics.copy()
    df[x], df[y] = numeric(df, x), numeric(df, y)
    df = df[df[x].notna() & df[y].notna()]
    df["_label"] = config_labels(df, keys) if len(df) else []
    front = pareto_front(df, x, y)
    line_keys = _line_keys(keys, df)
    df["_color"] = [_line_label(r, line_keys) for _, r in df.iterrows()] if len(df) else []
    colors = _colors(df["_color"])
    markers = _guidance_markers(df)

    fig = Figure(figsize=(9.8, 5.8), dpi=_PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    xerr, yerr = _yerr(df, x), _yerr(df, y)
    if xerr is not None or yerr is not None:
        ax.errorbar(df[x], df[y], xerr=xerr, yerr=yerr, fmt="none", ecolor="#c4c4c4", elinewidth=0.9, zorder=1)
    _scatter_groups(ax, df, x, y, colors, markers)
    f = df[front].sort_values(x)
    if len(f):
        ax.step(f[x], f[y], where="post", color="black", linestyle="--", linewidth=1.2, zorder=2)
        ax.scatter(f[x], f[y], s=170, facecolor="none", edgecolor="black", linewidth=1.4, zorder=4)
    short = "steps" in keys and len(df) > max_labels  # many points: off-front points get their steps only
    labels = []
    for _, r in df.iterrows():
        on = bool(front.get(r.name, False))
        if on or not short:
            text, style = r["_label"], dict(fontsize=7.5, color="#111" if on else "#555")
        else:
            text, style = fmt_key(r["steps"]), dict(fontsize=7, color="#666")
        labels.append((not on, r[x], r[y], text, dict(style, fontweight="bold" if on else "normal")))
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    ax.text(0.01, 0.99, "better ↖", transform=ax.transAxes, ha="left", va="top", fontsize=9, color="#555")
    _style_axes(ax)
    handles = _legend_handles(colors, markers, line_keys)
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=11, linestyle="--",
                          label="Pareto front"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    title = f"{_NAMES.get(y, y)} vs {_NAMES.get(x, x)}"
    ax.set_title(title + (" (numbers: steps)" if short else ""), fontsize=12)
    place_labels(fig, ax, [item[1:] for item in sorted(labels, key=lambda item: item[0])])  # front labels first
    return fig


# Where a label may go around its point, in points: rings of growing radius, 8 directions each
# (upper right first, the old fixed place). A label off the first ring gets a leader line.
_RINGS = (6, 13, 22, 33, 46, 62)
_DIRECTIONS = ((1, 0.7), (1, -0.7), (0, 1), (0, -1), (-1, 0.7), (-1, -0.7), (1, 0), (-1, 0))


def _overlap(a, b) -> float:
    """Overlapping area (display pixels squared) of two matplotlib Bboxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def label_extent(ann, renderer=None):
    """The box of an annotation's text alone (Annotation.get_window_extent adds its leader line)."""
    from matplotlib.text import Text

    ann.update_positions(renderer or ann.get_figure(root=True).canvas.get_renderer())
    return Text.get_window_extent(ann, renderer)


def place_labels(fig: Figure, ax, labels: Sequence[tuple[float, float, str, dict]], point_px: float = 7.0) -> list:
    """Annotate each (x, y, text, text style) so that no two labels overlap and no label
    covers a point: every candidate place (`_RINGS` x `_DIRECTIONS`) is tried in order and
    the first whose box overlaps nothing placed is kept (else the least overlapping one, inside
    the axes if it can be). Labels are placed in the given order, so the important ones get
    the closest places. The layout is settled first and labels are left out of it, so the
    boxes measured here are where the saved figure draws them. Returns the annotations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    if not labels:
        return []
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # constrained layout moves the axes: measure after it
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.array([(lx, ly) for lx, ly, _, _ in labels], dtype=np.float64))
    taken = [Bbox.from_extents(px - point_px, py - point_px, px + point_px, py + point_px) for px, py in pts]
    scale = fig.dpi / 72.0
    placed = []
    for lx, ly, text, style in labels:
        best = None
        for ring in _RINGS:
            for dx, dy in _DIRECTIONS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                leader = dict(arrowstyle="-", color="#9a9a9a", lw=0.6, shrinkA=0, shrinkB=4) if ring > _RINGS[0] else None
                ann = ax.annotate(text, (lx, ly), xytext=(dx * ring, dy * ring), textcoords="offset points", ha=ha,
                                  va=va, zorder=5, arrowprops=leader, annotation_clip=False, **style)
                ann.set_in_layout(False)
                box = label_extent(ann, renderer)
                cost = sum(_overlap(box, t) for t in taken)
                outside = box.width * box.height - _overlap(box, frame)
                score = (cost + 4 * outside, ring)
                if best is None or score < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (score, ann, box)
                else:
                    ann.remove()
                if score[0] == 0:
                    break
            if best[0][0] == 0:
                break
        taken.append(best[2].expanded(1.0, 1.0).padded(1.0 * scale))
        placed.append(best[1])
    return placed


def _seconds(metrics: pd.DataFrame) -> pd.Series | None:
    s = numeric(metrics, "gen_seconds")
    if s is None:
        ips = numeric(metrics, "images_per_gpu_second")
        if ips is not None:
            s = 1.0 / ips.where(ips > 0)
    return s


def plot_quality_vs_cost(metrics: pd.DataFrame, *, keys: Sequence[str] | None = None) -> Figure:
    """The headline FID and CLIP score (one panel each, whichever are present) against seconds
    per image on the device that made them (CPU, GPU: from the `device` column), with the
    interval over calls as x error bars: colour per scheduler, marker per guidance, steps
    written next to each point, and the cost/quality Pareto front dashed."""
    metrics = metrics.reset_index(drop=True)
    keys = key_columns(metrics, keys)
    secs = _seconds(metrics)
    if secs is None:
        raise PlotSkipped("no gen_seconds / images_per_gpu_second values")
    fid = headline_fid(metrics)
    quality = [(c, better) for c, better in ((fid, "min"), ("clip_score", "max")) if has_values(metrics, c)]
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
        sub = df.assign(_q=numeric(df, col))
        sub = sub[sub["_q"].notna()]
        yerr = _yerr(sub.assign(**{col: sub["_q"]}), col)
        xerr = _yerr(sub, "gen_seconds") if "gen_seconds" in sub and sub["gen_seconds"].notna().all() else None
        if yerr is not None or xerr is not None:
            ax.errorbar(sub["_sec"], sub["_q"], xerr=xerr, yerr=yerr, fmt="none", ecolor="#c4c4c4", elinewidth=0.9,
                        zorder=1)
        _scatter_groups(ax, sub, "_sec", "_q", colors, markers)
        if has_steps and len(sub) <= 60:
            for _, r in sub.iterrows():
                ax.annotate(fmt_key(r["steps"]), (r["_sec"], r["_q"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=7, color="#555")
        # cost/quality front: minimise seconds, and minimise FID / maximise CLIP score
        fr = pareto_front(sub.assign(_qq=sub["_q"] if better == "max" else -sub["_q"]), "_sec", "_qq")
        f = sub[fr].sort_values("_sec")
        if len(f) > 1:
            ax.step(f["_sec"], f["_q"], where="post", color="black", linestyle="--", linewidth=1, zorder=2)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(f"{device_kind(metrics)} seconds per image")
        ax.set_ylabel(_LABELS.get(col, col))
        _style_axes(ax)
    handles = _legend_handles(colors, markers, line_keys)
    handles.append(Line2D([], [], color="black", linestyle="--", label="cost/quality front"))
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=9)
    fig.suptitle("quality vs cost" + (" (numbers: steps)" if has_steps else ""), fontsize=12)
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PLOT_DPI, facecolor="white")
    return buf.getvalue()

