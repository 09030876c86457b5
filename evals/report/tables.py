"""The metrics table, one row per configuration: as Markdown (metrics.md, the terminal), as
the report's HTML table, and the files evaluation writes (metrics.parquet, .csv, .md, and
image_scores.parquet per image).

Every metric column is optional: a missing or all-NaN column is left out of the table. Every
table is headed by how its numbers were measured (extractor, image processor, resize,
weights, reference and its n, CLIP model, intervals), read from the description columns of
the rows, so a report rebuilt from metrics.parquet says the same.

FID: the headline is FID-infinity with its interval; the plain FID is headed "FID at n" and
shown without its bootstrap spread, which is not an interval for the population FID
(evals/metrics_table.py). Frames without `fid_n` (metrics files of older versions) show their
plain FID as they always did. Bold marks the best value of a column among the values the
warnings do not call invalid (`rankable`).

Cost is headed by the device the results record ("CPU s / image", "GPU s / image"), with its
interval over diffusers calls and the calls' sizes ("batch"); † marks a configuration whose
cost does not compare with the others' (evals/cost.py).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from evals.metrics_table import FID_INF_MIN_N, headline_fid
from evals.report.format import device_kind, fmt_ci, fmt_key, fmt_num, has_values, key_columns, numeric, sig_decimals
from evals.report.pareto import pareto_front

# (column, header, ci_lo column, ci_hi column, spread column): the order of the metrics table.
_TABLE_COLUMNS = (
    ("n", "n", None, None, None),
    ("n_error", "errors", None, None, None),
    ("fid_inf", "FID-infinity", "fid_inf_lo", "fid_inf_hi", None),
    ("fid", "FID", "fid_ci_lo", "fid_ci_hi", None),  # "FID at n", without its spread, when fid_n is there
    ("kid", "KID", "kid_ci_lo", "kid_ci_hi", "kid_std"),  # older metrics files have only the sd
    ("precision", "precision", None, None, None),
    ("recall", "recall", None, None, None),
    ("density", "density", None, None, None),
    ("coverage", "coverage", None, None, None),
    ("cmmd", "CMMD", "cmmd_ci_lo", "cmmd_ci_hi", None),
    ("clip_score", "CLIP score", "clip_score_ci_lo", "clip_score_ci_hi", None),
    ("attribute_accuracy", "attribute acc.", "attribute_accuracy_ci_lo", "attribute_accuracy_ci_hi", None),
    ("diversity", "diversity", None, None, None),
    ("vendi", "Vendi", None, None, None),
    ("gen_seconds", "{} s / image", "gen_seconds_ci_lo", "gen_seconds_ci_hi", None),  # {}: the device kind
    ("images_per_gpu_second", "images / {} s", None, None, None),
    ("batch_sizes", "batch", None, None, None),  # the sizes of the calls the images ran in
    ("weights_mb", "weights (MB)", None, None, None),  # the loaded pipeline's weights (evals/memory.py)
)
_INT_COLUMNS = {"n", "n_error"}
_TEXT_COLUMNS = {"batch_sizes"}
_COST_COLUMNS = {"gen_seconds", "images_per_gpu_second"}  # marked † where the cost does not compare
_HTML_HEADERS = {"gen_seconds": "{} s / img", "images_per_gpu_second": "img / {} s",
                 "attribute_accuracy": "attribute accuracy"}


def _has_text(metrics: pd.DataFrame, col: str) -> bool:
    return col in metrics.columns and (metrics[col].fillna("").astype(str) != "").any()


def _table_columns(metrics: pd.DataFrame):
    """The specs of the columns with values; an interval column the frame lacks is dropped
    from the spec (then a spread column, if any, is shown as ± sd)."""
    specs = []
    for col, name, lo, hi, spread in _TABLE_COLUMNS:
        if col == "fid" and "fid_n" in metrics.columns:
            name, lo, hi = _fid_at_n_header(metrics), None, None
        name = name.format(device_kind(metrics)) if col in _COST_COLUMNS else name
        if col in _TEXT_COLUMNS:
            if _has_text(metrics, col):
                specs.append((col, name, None, None, None))
        elif has_values(metrics, col):
            if lo is not None and not has_values(metrics, lo):
                lo = hi = None
            specs.append((col, name, lo, hi, spread if lo is None else None))
    return specs


def _fid_subset_n(metrics: pd.DataFrame) -> int | None:
    """The subset size of every plain FID (--fid-n), or None when each group's FID is of all
    its images (or the frame does not say)."""
    fid_n, n = numeric(metrics, "fid_n"), numeric(metrics, "n")
    if fid_n is None or n is None:
        return None
    known = fid_n.notna()
    if fid_n[known].nunique() != 1 or (fid_n[known] == n[known]).all():
        return None
    return int(fid_n[known].iloc[0])


def _fid_at_n_header(metrics: pd.DataFrame) -> str:
    """"FID at n" (n: the table's n column), or "FID at n=500" with --fid-n 500."""
    subset = _fid_subset_n(metrics)
    return "FID at n" if subset is None else f"FID at n={subset}"


def rankable(metrics: pd.DataFrame, col: str) -> pd.Series:
    """Rows whose `col` may be ranked: not what the warnings call invalid. FID-infinity needs
    FID_INF_MIN_N images and, like the plain FID, at least `feature_dim` images (below it the
    covariance is singular: FID is far off and FID-infinity's interval misses the population
    value); plain FIDs are ranked only at one n (`fid_n`), their bias depends on it. Frames
    without `feature_dim` (older metrics files) are checked for n only."""
    ok = pd.Series(True, index=metrics.index)
    if col not in ("fid", "fid_inf"):
        return ok
    n = numeric(metrics, "fid_n" if col == "fid" and "fid_n" in metrics.columns else "n")
    if n is None:
        return ok
    dim = numeric(metrics, "feature_dim")
    ok &= n >= (FID_INF_MIN_N if col == "fid_inf" else 2)
    if dim is not None:
        ok &= ~(n < dim)
    if col == "fid" and n[ok].nunique() > 1:
        ok &= False  # unequal n: the warnings say compare at equal n (--fid-n)
    return ok


def _best(metrics: pd.DataFrame) -> dict:
    """The best rankable value of each quality column with more than one rankable value."""
    best = {}
    for col, better in (("fid_inf", "min"), ("fid", "min"), ("kid", "min"), ("clip_score", "max"),
                        ("attribute_accuracy", "max"), ("cmmd", "min"), ("precision", "max"), ("recall", "max"),
                        ("coverage", "max")):
        s = numeric(metrics, col)
        if s is not None:
            s = s[rankable(metrics, col)]
            if s.notna().sum() > 1:
                best[col] = s.min() if better == "min" else s.max()
    return best


def _incomparable(row) -> bool:
    """Whether the row's cost is flagged (evals/cost.py flag_comparable; cost_warnings says why)."""
    v = row.get("cost_comparable")
    return v is not None and not pd.isna(v) and not bool(v)


def _cell(row, spec) -> str:
    text = _value(row, spec)
    return text + " †" if spec[0] in _COST_COLUMNS and text != "–" and _incomparable(row) else text


def _value(row, spec) -> str:
    col, _, lo, hi, spread = spec
    v = row.get(col)
    if col in _INT_COLUMNS:
        return "–" if v is None or pd.isna(v) else str(int(v))
    if col in _TEXT_COLUMNS:
        return "–" if v is None or pd.isna(v) or str(v) == "" else str(v)
    if lo is not None:
        return fmt_ci(v, row.get(lo), row.get(hi))
    if spread is not None and spread in row.index and not pd.isna(row.get(spread)) and not pd.isna(v):
        d = sig_decimals(float(v))
        return f"{fmt_num(v, d)} ± {fmt_num(row[spread], d)}"
    return fmt_num(v)


def _header(spec, ci_level: float) -> str:
    col, name, lo, _, spread = spec
    if lo is not None:
        return f"{name} [{ci_level:.0%} CI]"
    if spread is not None:
        return f"{name} ± sd"
    return name


def _described(metrics: pd.DataFrame, col: str) -> str | None:
    """The distinct values of a description column, joined (normally there is one), or None."""
    if col not in metrics.columns:
        return None
    values = [v for v in dict.fromkeys(metrics[col].tolist()) if v is not None and not pd.isna(v) and str(v) != ""]
    if not values:
        return None
    return " / ".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def _parts(metrics: pd.DataFrame, spec) -> str:
    """'extractor, image processor pil, ...': the present values of (column, label) pairs."""
    out = []
    for col, label in spec:
        v = _described(metrics, col)
        if v is not None:
            out.append(label.format(v))
    return ", ".join(out)


def measurement_lines(metrics: pd.DataFrame) -> list[str]:
    """How the table's numbers were measured, one line per part (features, reference, CLIP
    model, intervals), from the description columns `metrics` has; [] when it has none."""
    lines = []
    features = _parts(metrics, (("extractor", "{}"), ("image_processor", "image processor {}"),
                                ("resize_mode", "resize {}"), ("image_size", "{} px"),
                                ("feature_dim", "dim {}"), ("weights", "weights {}")))
    if features:
        lines.append(f"features (FID, KID): {features}")
    reference = _parts(metrics, (("reference", "{}"), ("reference_n", "n = {}")))
    if reference:
        lines.append(f"reference: {reference}")
    clip = _described(metrics, "clip_model")
    if clip == "none":
        diversity = _described(metrics, "diversity_features") or "the FID"
        lines.append(f"CLIP model: none (no CLIP score; diversity on {diversity} features)")
    elif clip is not None:
        lines.append("CLIP model (CLIP score, diversity): " + _parts(metrics, (
            ("clip_model", "{}"), ("clip_image_processor", "image processor {}"), ("clip_weights", "weights {}"))))
    fid = _fid_line(metrics)
    if fid:
        lines.append(fid)
    lines += _beyond_fid_lines(metrics)
    cost = _cost_line(metrics)
    if cost:
        lines.append(cost)
    n_boot, level = _described(metrics, "n_boot"), _described(metrics, "ci_level")
    if n_boot is not None:
        level = f"{float(level):.0%}" if level is not None and "/" not in level else (level or "95%")
        lines.append(f"intervals: {level} percentile bootstrap over images, n_boot = {n_boot} "
                     "(KID: generated and reference images resampled; CLIP score: max(mean 100 cos, 0) per resample)")
    return lines


def _cost_line(metrics: pd.DataFrame) -> str | None:
    """Where the cost was measured and what its interval is (None for frames without a device)."""
    where = _parts(metrics, (("device", "{}"), ("dtype", "{}")))
    if not where:
        return None
    return (f"cost: {where}; seconds per image = its share of its diffusers call's wall time, interval: "
            "bootstrap over calls; batch: the sizes of those calls (†: cost not comparable, see the warnings)")


def _fid_line(metrics: pd.DataFrame) -> str | None:
    """What the two FID columns are, when the frame has them (None for older metrics files)."""
    parts = []
    if has_values(metrics, "fid_inf"):
        boot = _described(metrics, "fid_inf_n_boot")
        parts.append("FID-infinity: FID on subsets of 6 sizes from n/2 to n, extrapolated linearly in 1/n to "
                     "n = infinity (Chong & Forsyth 2020), basic bootstrap interval"
                     + (f", n_boot = {boot}" if boot is not None else ""))
    if "fid_n" in metrics.columns and has_values(metrics, "fid"):
        subset = _fid_subset_n(metrics)
        if subset is not None:
            parts.append(f"FID at n: plain FID of a seeded subset of n = {subset} images of every group "
                         "(--fid-n), biased upward by about c/n, the same for every group")
        else:
            parts.append("FID at n: plain FID of all n images of each group, biased upward by about c/n "
                         "(compare only at equal n: --fid-n)")
    return "FID: " + "; ".join(parts) if parts else None


def _beyond_fid_lines(metrics: pd.DataFrame) -> list[str]:
    """What precision/recall, density/coverage and CMMD are, when the frame has them."""
    lines = []
    features = _described(metrics, "extractor") or "the FID"
    if has_values(metrics, "precision") or has_values(metrics, "recall"):
        k = _described(metrics, "pr_k") or "3"
        lines.append(f"precision, recall: k-NN manifolds (Kynkaanniemi et al. 2019), k = {k}, on the {features} "
                     "features against the reference's")
    if has_values(metrics, "density") or has_values(metrics, "coverage"):
        k = _described(metrics, "dc_k") or "5"
        lines.append(f"density, coverage: the reference's k-NN balls (Naeem et al. 2020), k = {k}, on the {features} "
                     "features")
    if has_values(metrics, "cmmd"):
        clip = _described(metrics, "cmmd_features") or features
        lines.append(f"CMMD: unbiased MMD^2 x 1000 with a Gaussian kernel, sigma = 10, on L2-normalised {clip} "
                     "embeddings (Jayasumana et al. 2024); interval: bootstrap of generated and reference images")
    return lines


def measurement_markdown(metrics: pd.DataFrame) -> str:
    """`measurement_lines` as a Markdown list under a heading, or "" without description columns."""
    lines = measurement_lines(metrics)
    if not lines:
        return ""
    return "Measured with:\n\n" + "".join(f"- {_md_escape(line)}\n" for line in lines) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def metrics_markdown(metrics: pd.DataFrame, keys: Sequence[str] | None = None, *, ci_level: float = 0.95) -> str:
    """A Markdown table of `metrics`: the key columns, then each metric present (missing or
    all-NaN columns are left out), intervals written `12.3 [11.1, 13.6]` and KID as
    `0.0123 ± 0.0020`. Used for metrics.md and printed to the terminal."""
    keys = key_columns(metrics, keys)
    specs = _table_columns(metrics)
    header = list(keys) + [_header(s, ci_level) for s in specs]
    if not header:
        return "_no metrics_\n"
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---" if i < len(keys) else "---:" for i in range(len(header))) + "|",
    ]
    for _, row in metrics.iterrows():
        cells = [fmt_key(row[k]) for k in keys] + [_cell(row, s) for s in specs]
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def metrics_table_html(metrics: pd.DataFrame, keys: list[str], ci_level: float) -> str:
    """The report's metrics table: keys that are the same for every row are named once above
    it, the best value of each quality column is bold, and Pareto-front rows are starred."""
    specs = _table_columns(metrics)
    fid = headline_fid(metrics)
    front = None  # on the headline FID's rankable values only
    if has_values(metrics, fid) and has_values(metrics, "clip_score"):
        front = pareto_front(metrics.assign(**{fid: numeric(metrics, fid).where(rankable(metrics, fid))}), fid)
    best, ranked = _best(metrics), {col: rankable(metrics, col) for col in ("fid", "fid_inf")}
    constant = [k for k in keys if len(metrics) > 1 and metrics[k].nunique(dropna=False) == 1]
    keys = [k for k in keys if k not in constant]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    kind = device_kind(metrics)
    head += "".join(f'<th class="num">{html.escape(_HTML_HEADERS.get(s[0], s[1] + (" ± sd" if s[4] else "")).format(kind))}'
                    "</th>" for s in specs)
    if front is not None:
        head += '<th title="on the FID / CLIP score Pareto front">front</th>'
    rows = []
    for i, (_, row) in enumerate(metrics.iterrows()):
        tds = "".join(f"<td>{html.escape(fmt_key(row[k]))}</td>" for k in keys)
        for s in specs:
            cls = "num"
            v = row.get(s[0])
            if (s[0] in best and v is not None and not pd.isna(v) and float(v) == best[s[0]]
                    and (s[0] not in ranked or bool(ranked[s[0]].iloc[i]))):
                cls += " best"
            tds += f'<td class="{cls}">{html.escape(_cell(row, s))}</td>'
        if front is not None:
            tds += f'<td class="front">{"★" if bool(front.iloc[i]) else ""}</td>'
        rows.append(f"<tr>{tds}</tr>")
    same = ""
    measured = measurement_lines(metrics)
    if measured:
        same += '<p class="sub measured">Measured with: ' + "<br>".join(html.escape(m) for m in measured) + "</p>"
    if constant:
        same += '<p class="sub">Same for every row: ' + ", ".join(
            f"{html.escape(k)} = <b>{html.escape(fmt_key(metrics[k].iloc[0]))}</b>" for k in constant) + "</p>"
    return (
        same + '<div class="scroll"><table class="metrics"><thead><tr>'
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )



def write_metrics_files(out: Path, metrics: pd.DataFrame, keys: Sequence[str], notes: Sequence[str],
                        image_scores: pd.DataFrame | None = None) -> str:
    """metrics.parquet, metrics.csv and metrics.md (how it was measured, the Markdown table,
    then the warnings) in `out`, and image_scores.parquet when given (one row per image,
    e.g. the unclamped CLIP scores). Returns the header and table, for the terminal."""
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(out / "metrics.parquet", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    if image_scores is not None:
        image_scores.to_parquet(out / "image_scores.parquet", index=False)
    else:
        (out / "image_scores.parquet").unlink(missing_ok=True)  # no stale scores from an earlier run
    table = measurement_markdown(metrics) + metrics_markdown(metrics, keys)
    (out / "metrics.md").write_text(table + "\n" + "".join(f"\n> warning: {n}" for n in notes) + "\n")
    return table
