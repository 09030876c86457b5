"""The report page: one self-contained `report.html` with the run's metadata, a prominent
box of statistical warnings, the metrics table, the plots and the image grid.

The page has no external resources and no JavaScript: plots and thumbnails are base64 data
URIs, styles are inline, and a Content-Security-Policy forbids anything else, so it opens
offline and can be mailed or archived as one file. Plots are also written next to it as PNGs.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
import warnings as _warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from evals.report.format import key_columns
from evals.report.grid import grid_html
from evals.report.plots import PlotSkipped, figure_png, plot_clip_vs_fid, plot_fid_vs_steps, plot_quality_vs_cost
from evals.report.tables import metrics_table_html

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
     "FID-infinity (bias-corrected; the plain FID at n in metrics files without it; KID when every configuration "
     "has fewer images than the feature dimension, where FID is invalid) against steps: one line per "
     "scheduler, one panel per guidance scale; bars are 95% bootstrap intervals, schedulers shifted slightly "
     "sideways at each step so their bars do not cover each other. Lines flattening out mean more "
     "steps no longer buy quality; overlapping bars mean the ranking is not established at this sample size. "
     "Values the warnings call invalid are drawn too: read the warnings first."),
    ("clip_vs_fid", "CLIP score vs FID", plot_clip_vs_fid,
     "Each point is a configuration (FID: FID-infinity where present). Ringed points joined by the dashed line "
     "form the Pareto front: no other configuration has both lower FID and higher CLIP score. Points off the "
     "front are beaten on both."),
    ("quality_vs_cost", "Quality vs seconds per image", plot_quality_vs_cost,
     "Quality against seconds per image on the device named in the Run panel (numbers: steps; colour: scheduler; "
     "marker: guidance; horizontal bars: 95% bootstrap interval over diffusers calls). The dashed line is the "
     "cost/quality front: the cheapest configuration for each quality level. Costs marked † in the table do not "
     "compare (see the warnings)."),
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


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plot_html(name: str, heading: str, plot, caption: str, metrics: pd.DataFrame, keys: list[str],
               out: Path, save_plots: bool) -> str:
    """One plot as a figure of the page (and out/<name>.png), or a note saying why it is not."""
    png_path = out / f"{name}.png"
    try:
        if not len(metrics):
            raise PlotSkipped("no metrics")
        png = figure_png(plot(metrics, keys=keys))
    except PlotSkipped as e:
        if save_plots:
            png_path.unlink(missing_ok=True)  # no stale plot from an earlier run
        return f'<h3>{html.escape(heading)}</h3><p class="note">Skipped: {html.escape(str(e))}.</p>'
    except Exception as e:  # a bug in one plot must not lose the whole report
        _warnings.warn(f"report: plot {name} failed: {e!r}", RuntimeWarning, stacklevel=3)
        return f'<h3>{html.escape(heading)}</h3><p class="note">Plot failed: {html.escape(repr(e))}.</p>'
    if save_plots:
        atomic_write(png_path, png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure id="{name}"><h3>{html.escape(heading)}</h3><img src="{uri}" alt="{html.escape(heading)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table_html(metrics: pd.DataFrame, keys: list[str], ci_level: float) -> str:
    if not len(metrics):
        return '<p class="note">No metrics.</p>'
    note = (f'<p class="sub">Brackets: bootstrap {ci_level:.0%} confidence intervals. FID-infinity: FID '
            "extrapolated to infinitely many images (bias-corrected, the headline); FID at n: the plain FID of n "
            "images, biased upward by about c/n, comparable only at equal n. "
            "Bold: best point estimate in the column (overlapping intervals mean the order is not established), "
            "never a value the warnings call invalid (FID of fewer images than the feature dimension, plain FIDs "
            "at unequal n). ★: on the FID / CLIP score Pareto front. "
            "s / img: mean seconds per image on the device named in the header (CPU or GPU), its interval over "
            "diffusers calls; batch: the sizes of those calls; †: cost not comparable with the other rows (calls of "
            "other sizes, see the warnings).</p>")
    return note + metrics_table_html(metrics, keys, ci_level)


def _summary(metrics: pd.DataFrame) -> str:
    n_cfg = len(metrics)
    summary = f"{n_cfg} configuration{'s' if n_cfg != 1 else ''}"
    if "n" in metrics.columns:
        summary += f", {int(pd.to_numeric(metrics['n'], errors='coerce').sum())} images"
    return summary


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
    optional), `keys` its configuration columns (see `key_columns`), `grid` has columns prompt,
    seed, config, image (PNG bytes). A plot that cannot be drawn becomes a note; nothing in
    the data makes this raise."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = pd.DataFrame() if metrics is None else metrics.reset_index(drop=True)
    keys = key_columns(metrics, keys)
    warns = [warnings] if isinstance(warnings, str) else [str(w) for w in (warnings or ())]
    table = _table_html(metrics, keys, ci_level)
    plots = [_plot_html(*spec, metrics, keys, out, save_plots) for spec in _PLOTS]
    try:
        grid_part = grid_html(grid, max_prompts=max_grid_prompts, max_configs=max_grid_configs,
                              seeds_per_prompt=seeds_per_prompt, thumb_px=thumb_px)
    except Exception as e:
        _warnings.warn(f"report: image grid failed: {e!r}", RuntimeWarning, stacklevel=2)
        grid_part = f'<p class="note">Image grid failed: {html.escape(repr(e))}.</p>'
    path = out / "report.html"
    atomic_write(path, _page(title, _summary(metrics), warns, meta, table, plots, grid_part).encode("utf-8"))
    return path


def _page(title: str, summary: str, warns: list[str], meta, table: str, plots: list[str], grid_part: str) -> str:
    return f"""<!DOCTYPE html>
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
<section id="metrics"><h2>Metrics</h2>{table}</section>
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
