"""The evaluation report: a self-contained `report.html`, plot PNGs and a Markdown metrics table.

One module per part: `tables` (the metrics table as Markdown and HTML, and the metrics
files), `plots` (FID vs steps, CLIP score vs FID, quality vs cost), `grid` (the image grid),
`page` (`write_report`, the HTML page around them), with `format` (numbers and labels) and
`pareto` (the Pareto front) shared by them.

Every metric column is optional: a missing or all-NaN column drops the table column, and a
plot that cannot be drawn is replaced by a one-line note saying why. The package depends
only on numpy, pandas, matplotlib and Pillow (no torch, diffusers or ray), so reports can be
rebuilt from `metrics.parquet` anywhere.
"""
