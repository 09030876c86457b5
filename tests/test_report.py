"""evals.report: pure helpers, the HTML page, graceful degradation, and a real headless browser."""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from evals.report.format import config_labels, fmt_ci, fmt_num
from evals.report.grid import grid_html
from evals.report.page import write_report
from evals.report.pareto import pareto_front
from evals.report.plots import PlotSkipped, plot_clip_vs_fid, plot_fid_vs_steps, plot_quality_vs_cost
from evals.metrics_table import DESCRIPTION_COLUMNS
from evals.report.tables import metrics_markdown, metrics_table_html, write_metrics_files

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCHEDULERS = ("ddim", "dpmpp_2m", "euler_a")
STEPS = (10, 25, 50)
GUIDANCE = (3.0, 7.5)
COLORS = {"red": (214, 39, 40), "blue": (31, 119, 180), "green": (44, 160, 44), "yellow": (230, 190, 20)}
PROMPTS = (
    ("red", "circle", "blue", "square"),
    ("green", "triangle", "red", "circle"),
    ("yellow", "square", "blue", "triangle"),
    ("blue", "circle", "green", "square"),
)


def synthetic_metrics(seed: int = 0) -> pd.DataFrame:
    """3 schedulers x 3 steps x 2 guidance with plausible metric shapes and intervals."""
    rng = np.random.default_rng(seed)
    rows = []
    for si, sch in enumerate(SCHEDULERS):
        for st in STEPS:
            for g in GUIDANCE:
                # higher guidance: better prompt adherence (CLIP score) but worse FID, a real trade-off;
                # dpmpp_2m converges in fewer steps, euler_a (ancestral) keeps some noise
                fid = (18, 19.5, 21)[si] + (260, 140, 200)[si] / st + 7 * (g == 7.5) + rng.normal(0, 0.6)
                clip = 25.5 + 1.4 * (g == 7.5) - (15, 8, 12)[si] / st + rng.normal(0, 0.1)  # 100 x cosine
                sec = 0.0042 * st * (1.0 + 0.15 * (sch == "dpmpp_2m")) * 2  # CFG doubles the batch
                rows.append(dict(
                    model="embedded", height=64, width=64, scheduler=sch, steps=st, guidance=g,
                    n=512, n_error=0, fid=fid, fid_ci_lo=fid - 1.9, fid_ci_hi=fid + 2.2,
                    kid=fid / 9000, kid_std=0.0004,
                    clip_score=clip, clip_score_ci_lo=clip - 0.4, clip_score_ci_hi=clip + 0.35,
                    diversity=0.31 + 0.01 * si, vendi=5.1 + 0.2 * si,
                    attribute_accuracy=0.6 + 0.3 * (1 - 10 / st) * (g / 7.5),
                    attribute_accuracy_ci_lo=0.55 + 0.3 * (1 - 10 / st) * (g / 7.5),
                    attribute_accuracy_ci_hi=0.65 + 0.3 * (1 - 10 / st) * (g / 7.5),
                    gen_seconds=sec, images_per_gpu_second=1 / sec,
                    extractor="embedded", resize_mode="clean", reference="rendered:10000",
                ))
    return pd.DataFrame(rows)


def _shape(draw, kind, box, color):
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def render(prompt_parts, seed: int, steps: int, guidance: float, scheduler: str, size: int = 64) -> bytes:
    """A PNG like the embedded domain's: two shapes on white, noisier for fewer steps."""
    c1, s1, c2, s2 = prompt_parts
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    j = rng.integers(-4, 5, 4)
    _shape(d, s1, (6 + j[0], 10 + j[1], 30 + j[0], 34 + j[1]), COLORS[c1])
    _shape(d, s2, (34 + j[2], 28 + j[3], 58 + j[2], 52 + j[3]), COLORS[c2])
    arr = np.asarray(im, dtype=np.float64)
    sched_rng = np.random.default_rng(seed * 7 + SCHEDULERS.index(scheduler))
    noise = sched_rng.normal(0, 160 / steps * (1.4 if guidance < 5 else 1.0), arr.shape)
    if guidance < 5:  # weak guidance: washed-out colours
        arr = 0.65 * arr + 0.35 * 235
    out = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_grid(seeds=(11, 12)) -> pd.DataFrame:
    return _synthetic_grid(tuple(seeds)).copy()


@functools.lru_cache(maxsize=4)
def _synthetic_grid(seeds: tuple) -> pd.DataFrame:
    rows = []
    for parts in PROMPTS:
        prompt = f"a {parts[0]} {parts[1]} and a {parts[2]} {parts[3]} on a white background"
        for seed in seeds:
            for sch in SCHEDULERS:
                for st in STEPS:
                    for g in GUIDANCE:
                        rows.append(dict(prompt=prompt, seed=seed, config=f"{sch} {st} steps g{g:g}",
                                         image=render(parts, seed, st, g, sch)))
    return pd.DataFrame(rows)


WARNINGS = [
    "FID: 18 group(s) have fewer images than the feature dimension 2048: ddim 10 steps g3 (n=512) and 17 more. "
    "Their covariance is singular and FID is biased upward; rank groups only at equal n, and prefer KID "
    "(unbiased) for small groups.",
    "CLIP score: the intervals of dpmpp_2m 50 steps g7.5 and euler_a 50 steps g7.5 overlap; their order is "
    "not established.",
]
META = {
    "results": "results/sweep-2024-06-01/",
    "reference": "rendered:10000 (embedded domain)",
    "extractor": "embedded (domain CLIP), resize clean",
    "created_at": "2024-06-01T12:00:00Z",
    "versions": "diffsweep 0.1.0, torch 2.4.1, diffusers 0.32.2",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = write_report(synthetic_metrics(), synthetic_grid(), out, title="diffsweep report: synthetic sweep",
                        warnings=WARNINGS, meta=META)
    return path


# --------------------------------------------------------------------------- pure helpers


def test_pareto_front_known_set():
    df = pd.DataFrame({
        "fid": [10.0, 12.0, 9.0, 15.0, 9.0, 20.0, np.nan, 11.0, 9.0],
        "clip_score": [0.30, 0.33, 0.28, 0.35, 0.27, 0.34, 0.99, 0.30, 0.28],
    }, index=list("abcdefghi"))
    mask = pareto_front(df)
    assert mask.dtype == bool and list(mask.index) == list(df.index)
    # c and i tie (same point) -> both on; e same fid, lower clip -> off; h = a's clip with higher fid -> off
    # f dominated by d? no: f has higher fid (worse) and lower clip -> off. g NaN -> off.
    assert set(df.index[mask]) == {"a", "b", "c", "d", "i"}


def test_pareto_front_direction_and_degenerate():
    df = pd.DataFrame({"x": [1, 2, 3], "y": [3, 2, 1]})
    assert pareto_front(df, "x", "y").tolist() == [True, False, False]  # the first beats both others
    # a trade-off (higher y costs higher x): all on the front
    assert pareto_front(pd.DataFrame({"x": [1, 2, 3], "y": [1, 2, 3]}), "x", "y").tolist() == [True, True, True]
    assert pareto_front(pd.DataFrame({"x": [1, 2, 3], "y": [3, 2, 3]}), "x", "y").tolist() == [True, False, False]
    assert not pareto_front(df, "fid", "clip_score").any()  # missing columns
    assert pareto_front(df.iloc[:0], "x", "y").tolist() == []


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        df = pd.DataFrame({"fid": rng.integers(0, 8, n).astype(float), "clip_score": rng.integers(0, 8, n) / 10})
        xs, ys = df["fid"].to_numpy(), df["clip_score"].to_numpy()
        brute = [not any((xs[j] <= xs[i] and ys[j] >= ys[i]) and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(n))
                 for i in range(n)]
        assert pareto_front(df).tolist() == brute


def test_metrics_markdown_formatting():
    df = pd.DataFrame([
        dict(scheduler="ddim", steps=25, guidance=7.5, n=100, n_error=1, fid=12.3456, fid_ci_lo=11.11, fid_ci_hi=13.6,
             kid=0.01234, kid_std=0.002, clip_score=0.2876, clip_score_ci_lo=0.281, clip_score_ci_hi=0.2949,
             vendi=np.nan),
        dict(scheduler="a|b", steps=50, guidance=1.0, n=100, n_error=0, fid=123.45, fid_ci_lo=np.nan,
             fid_ci_hi=np.nan, kid=0.02, kid_std=np.nan, clip_score=0.3, clip_score_ci_lo=0.29, clip_score_ci_hi=0.31,
             vendi=np.nan),
    ])
    md = metrics_markdown(df, ["scheduler", "steps", "guidance"])
    lines = md.strip().splitlines()
    assert lines[0] == ("| scheduler | steps | guidance | n | errors | FID [95% CI] | KID ± sd | "
                        "CLIP score [95% CI] |")  # all-NaN vendi dropped
    assert lines[1] == "|---|---|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| ddim | 25 | 7.5 | 100 | 1 | 12.3 [11.1, 13.6] | 0.0123 ± 0.0020 | 0.288 [0.281, 0.295] |"
    assert lines[3] == r"| a\|b | 50 | 1 | 100 | 0 | 123.5 | 0.0200 | 0.300 [0.290, 0.310] |"
    # default keys are the run-key columns present
    assert metrics_markdown(df).splitlines()[0].startswith("| scheduler | steps | guidance | n |")


def described_metrics() -> pd.DataFrame:
    """synthetic_metrics with every description column, as jobs/evaluate.py writes them, and KID intervals."""
    df = synthetic_metrics()
    return df.assign(image_processor="pil", image_size=64, feature_dim=64, weights="1a2b3c4d5e6f",
                     reference_n=10000, clip_model="embedded", clip_image_processor="pil",
                     clip_weights="1a2b3c4d5e6f", diversity_features="embedded", n_boot=200, ci_level=0.95,
                     fid_inf_n_boot=50, pr_k=3, dc_k=5, cmmd_features="embedded",
                     kid_ci_lo=df.kid * 0.8, kid_ci_hi=df.kid * 1.2)


def test_every_table_is_headed_by_how_it_was_measured(tmp_path):
    df = described_metrics()
    keys = ["scheduler", "steps", "guidance"]
    printed = write_metrics_files(tmp_path, df, keys, ["a warning"])
    md = (tmp_path / "metrics.md").read_text()
    assert md.startswith(printed)  # the terminal gets the same header and table
    header, table = md.split("\n\n| ", 1)
    assert header.splitlines() == [
        "Measured with:",
        "",
        "- features (FID, KID): embedded, image processor pil, resize clean, 64 px, dim 64, weights 1a2b3c4d5e6f",
        "- reference: rendered:10000, n = 10000",
        "- CLIP model (CLIP score, diversity): embedded, image processor pil, weights 1a2b3c4d5e6f",
        "- intervals: 95% percentile bootstrap over images, n_boot = 200 (KID: generated and reference images "
        "resampled; CLIP score: max(mean 100 cos, 0) per resample)",
    ]
    assert table.startswith("scheduler | steps | guidance | n | errors | FID [95% CI] | KID [95% CI] |")
    assert "KID ± sd" not in md and md.rstrip().endswith("> warning: a warning")
    assert set(DESCRIPTION_COLUMNS) <= set(pd.read_parquet(tmp_path / "metrics.parquet").columns)
    # description columns are not configuration keys, and the HTML table states them once
    first = metrics_markdown(df).splitlines()[0]
    assert first.startswith("| model | height | width | scheduler | steps | guidance | n |")
    html = write_report(df, None, tmp_path / "html", keys=keys).read_text()
    assert html.count("Measured with:") == 1 and "reference: rendered:10000, n = 10000" in html
    # no CLIP model: said so, with what diversity used
    none = df.assign(clip_model="none", clip_image_processor="", clip_weights="", diversity_features="inception")
    assert "CLIP model: none (no CLIP score; diversity on inception features)" in write_metrics_files(
        tmp_path / "none", none, keys, [])


def fid_infinity_metrics() -> pd.DataFrame:
    """described_metrics as this version of jobs/evaluate.py writes them: FID-infinity with its
    interval, and the plain FID with the n it was computed on."""
    df = described_metrics()
    return df.assign(fid_inf=df.fid - 5, fid_inf_lo=df.fid - 9, fid_inf_hi=df.fid - 2, fid_n=df.n)


def test_fid_infinity_heads_the_tables_and_the_plain_fid_is_fid_at_n(tmp_path):
    df = fid_infinity_metrics()
    keys = ["scheduler", "steps", "guidance"]
    header, table = write_metrics_files(tmp_path, df, keys, []).split("\n\n| ", 1)
    assert ("- FID: FID-infinity: FID on subsets of 6 sizes from n/2 to n, extrapolated linearly in 1/n to "
            "n = infinity (Chong & Forsyth 2020), basic bootstrap interval, n_boot = 50; FID at n: plain FID of "
            "all n images of each group") in header
    lines = table.splitlines()
    assert "| n | errors | FID-infinity [95% CI] | FID at n | KID [95% CI] |" in lines[0]
    r = df.iloc[0]
    assert f"| {fmt_ci(r.fid_inf, r.fid_inf_lo, r.fid_inf_hi)} | {fmt_num(r.fid)} |" in lines[2]  # no spread
    sub = write_metrics_files(tmp_path / "sub", df.assign(fid_n=100), keys, [])
    assert "| FID at n=100 |" in sub and "plain FID of a seeded subset of n = 100 images of every group" in sub
    # the plots lead with FID-infinity and its interval; older frames plot the plain FID, named so
    assert plot_fid_vs_steps(df).axes[0].get_ylabel().startswith("FID-infinity")
    assert plot_fid_vs_steps(synthetic_metrics()).axes[0].get_ylabel().startswith("FID at n")
    assert plot_clip_vs_fid(df).axes[0].get_xlabel().startswith("FID-infinity")
    assert "FID-infinity" in plot_quality_vs_cost(df).axes[0].get_ylabel()


def test_bold_never_marks_a_value_the_warnings_call_invalid():
    keys = ["scheduler", "steps", "guidance"]
    df = fid_infinity_metrics().iloc[:6].copy()

    def bold(frame):
        return set(re.findall(r'<td class="num best">([^<]*)</td>', metrics_table_html(frame, keys, 0.95)))

    def shown(frame, i):
        return fmt_ci(frame.fid_inf[i], frame.fid_inf_lo[i], frame.fid_inf_hi[i])

    best = df.fid_inf.idxmin()
    assert shown(df, best) in bold(df) and fmt_num(df.fid.min()) in bold(df)  # equal n, n >= dim: ranked
    df.loc[best, ["n", "fid_n"]] = 32  # fewer images than the feature dimension 64
    runner_up = df.drop(best).fid_inf.idxmin()
    assert shown(df, best) not in bold(df) and shown(df, runner_up) in bold(df)
    assert fmt_num(df.fid[best]) not in bold(df) and fmt_num(df.drop(best).fid.min()) in bold(df)
    df.loc[runner_up, ["n", "fid_n"]] = 256  # above the dimension, but plain FIDs at unequal n: none ranked
    assert not {fmt_num(v) for v in df.fid} & bold(df) and shown(df, runner_up) in bold(df)
    assert fmt_num(df.clip_score.max()) + " [" in " ".join(bold(df))  # other columns still are


def test_config_labels_use_varying_keys():
    df = synthetic_metrics()
    labels = config_labels(df)
    assert labels.iloc[0] == "ddim 10 steps g3"
    assert labels.is_unique


# --------------------------------------------------------------------------- plots


def test_plots_return_figures():
    df = synthetic_metrics()
    fig = plot_fid_vs_steps(df)
    assert len([a for a in fig.axes if a.get_visible()]) == len(GUIDANCE)
    assert len(fig.axes[0].lines) >= len(SCHEDULERS)
    assert plot_clip_vs_fid(df).axes
    assert len(plot_quality_vs_cost(df).axes) == 2
    with pytest.raises(PlotSkipped):
        plot_fid_vs_steps(df.drop(columns=["fid"]))
    with pytest.raises(PlotSkipped):
        plot_quality_vs_cost(df.drop(columns=["gen_seconds", "images_per_gpu_second"]))


# --------------------------------------------------------------------------- the page


def _data_uris(text: str) -> list[str]:
    return re.findall(r'<img src="(data:image/png;base64,[A-Za-z0-9+/=]+)"', text)


def test_write_report_contents(report):
    out = report.parent
    text = report.read_text(encoding="utf-8")
    assert report.name == "report.html"
    for name in ("fid_vs_steps", "clip_vs_fid", "quality_vs_cost"):
        assert f'id="{name}"' in text
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
        assert base64.b64encode(png).decode() in text  # the embedded plot is the saved one
    uris = _data_uris(text)
    n_thumbs = len(PROMPTS) * 1 * min(12, len(SCHEDULERS) * len(STEPS) * len(GUIDANCE))  # default limit: 12
    assert len(uris) == 3 + n_thumbs
    im = Image.open(io.BytesIO(base64.b64decode(uris[-1].split(",", 1)[1])))
    assert im.size == (64, 64)
    for w in WARNINGS[:1]:
        assert "statistical warnings" in text and "feature dimension 2048" in text
    for v in META.values():
        assert v in text
    assert re.search(r"<td class=\"num[^\"]*\">\d+\.\d \[\d+\.\d, \d+\.\d\]</td>", text)  # FID with its CI
    assert "Same for every row: model = <b>embedded</b>" in text  # constant keys are not columns
    assert "★" in text  # pareto rows flagged
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<script" not in text and "http://" not in text and "https://" not in text


def test_grid_limits_and_same_seed_rows():
    grid = synthetic_grid(seeds=(12, 11))  # configs are ordered by first appearance: seed 12's order
    # drop one image for seed 11 so seed 12 is the fuller row for every prompt
    grid = grid[~((grid.seed == 11) & (grid.config == "ddim 10 steps g3"))]
    out = grid_html(grid, max_prompts=2, max_configs=5, thumb_px=48)
    assert "Showing 2 of 4 prompts and 5 of 18 configurations" in out
    assert len(_data_uris(out)) == 2 * 5
    assert out.count("seed 12</div>") == 2 and "seed 11</div>" not in out
    two = grid_html(grid, max_prompts=1, max_configs=3, seeds_per_prompt=2)
    assert two.count("<div class=\"seed\">") == 2 and "missing" in two  # seed 11 lacks ddim 10 steps g3
    assert "No images" in grid_html(None) and "No images" in grid_html(grid.iloc[:0])
    assert "missing column" in grid_html(grid.drop(columns=["image"]))
    bad = grid.iloc[:2].copy()
    bad["image"] = [b"not a png", None]
    assert "missing" in grid_html(bad)


@pytest.mark.parametrize(
    "drop",
    [
        ["fid", "fid_ci_lo", "fid_ci_hi", "kid", "kid_std"],  # no reference
        ["clip_score", "clip_score_ci_lo", "clip_score_ci_hi"],
        ["gen_seconds", "images_per_gpu_second"],
        ["fid_ci_lo", "fid_ci_hi", "clip_score_ci_lo", "clip_score_ci_hi", "guidance"],
        ["steps"],
    ],
)
def test_missing_columns_degrade(tmp_path, drop):
    df = synthetic_metrics().drop(columns=drop)
    path = write_report(df, synthetic_grid().head(6), tmp_path, warnings=[], meta=None)
    text = path.read_text()
    assert "No statistical warnings" in text
    assert "Plot failed" not in text
    if "fid" in drop:
        assert "Skipped: no FID values" in text and not (tmp_path / "fid_vs_steps.png").exists()
        assert (tmp_path / "quality_vs_cost.png").exists()  # CLIP panel only
    if "gen_seconds" in drop:
        assert "Skipped: no gen_seconds" in text
    md = metrics_markdown(df)
    assert md.count("\n") == len(df) + 2


def test_all_nan_and_empty_inputs(tmp_path):
    df = synthetic_metrics()
    metric_cols = [c for c in df.columns if c not in ("model", "height", "width", "scheduler", "steps", "guidance",
                                                       "extractor", "resize_mode", "reference")]
    df[metric_cols] = np.nan
    text = write_report(df, None, tmp_path / "nan").read_text()
    assert text.count("Skipped:") == 3 and "Plot failed" not in text and "No images" in text
    text = write_report(pd.DataFrame(), pd.DataFrame(), tmp_path / "empty").read_text()
    assert "No metrics" in text and text.count("Skipped:") == 3
    text = write_report(None, None, tmp_path / "none").read_text()
    assert "No metrics" in text
    # a single configuration, user --by keys, string steps
    one = synthetic_metrics().iloc[:1].assign(steps="25", lora="v2")
    text = write_report(one, None, tmp_path / "one", keys=["lora", "scheduler", "steps"]).read_text()
    assert "Plot failed" not in text and "<th>lora</th>" in text


def test_random_frames_never_fail(tmp_path):
    """Random column subsets, NaNs, infinities, duplicate index and key subsets: no plot fails."""
    rng = np.random.default_rng(3)
    base = synthetic_metrics()
    optional = [c for c in base.columns if c not in ("scheduler", "steps")]
    for case in range(4):
        df = base.drop(columns=list(rng.choice(optional, size=int(rng.integers(0, len(optional))), replace=False)))
        df = df.sample(frac=float(rng.uniform(0.2, 1.0)), random_state=case)
        num = df.select_dtypes("number").columns
        for c in num:
            df.loc[rng.random(len(df)) < 0.3, c] = np.nan
        if len(num):
            df.loc[df.index[:1], num[-1]] = np.inf
        df.index = [0] * len(df)  # duplicate labels
        keys = [k for k in ("model", "scheduler", "steps", "guidance") if k in df.columns and rng.random() < 0.8]
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="report:")  # a failed plot warns "report: plot ... failed"
            text = write_report(df, None, tmp_path / str(case), keys=keys, warnings="one warning").read_text()
        assert "Plot failed" not in text and "one warning" in text
        metrics_markdown(df, keys)


def test_report_imports_no_heavy_deps():
    code = ("import sys, evals.report.page; bad = [m for m in ('torch', 'diffusers', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- headless browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    base = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
    ]
    url = report.resolve().as_uri()
    r = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1400,4000", url],
                       capture_output=True, text=True, timeout=120)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    bad = [ln for ln in log.splitlines()
           if re.search(r"CONSOLE|Uncaught|Content.Security.Policy|Refused to|ERR_FILE_NOT_FOUND|Failed to load", ln)]
    assert not bad, "\n".join(bad)
    im = Image.open(shot).convert("L")
    arr = np.asarray(im)
    assert arr.std() > 10 and (arr < 100).mean() > 0.002  # not blank: text, plots and thumbnails drew

    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    # every configuration is one row of the metrics table the browser parsed, under its own keys
    body = re.search(r'<table class="metrics">.*?<tbody>(.*?)</tbody>', dom.stdout, re.S).group(1)
    shown = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", body)
    assert sorted(shown) == sorted((r.scheduler, str(r.steps), f"{r.guidance:g}") for r in synthetic_metrics().itertuples())
    assert len(_data_uris(dom.stdout)) == len(_data_uris(report.read_text()))
    assert not [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]

    if os.environ.get("DIFFSWEEP_UPDATE_SCREENSHOT"):  # regenerate docs/report-screenshot.png
        Image.open(shot).convert("RGB").quantize(256).save(ROOT / "docs" / "report-screenshot.png", optimize=True)
