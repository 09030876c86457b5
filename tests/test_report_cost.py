"""Cost per image named by its device, with an interval over calls and a flag when batch
composition makes it incomparable; the report's readability (labels apart, error bars
dodged, warnings named by readable labels, the Run panel's device). Crafted frames only:
jobs/evaluate.py's end to end run is checked in tests/test_evaluate_job.py's fixture."""

from __future__ import annotations

import datetime as dt
import itertools
import re

import numpy as np
import pandas as pd
import pytest

from evals.cost import call_bootstrap_ci, calls, cost_metrics, cost_warnings, flag_comparable
from evals.fid import RefStats
from evals.metrics_table import comparison_warnings, group_metrics, RowFeatures
from evals.provenance import run_provenance
from evals.report.format import config_labels
from evals.report.page import write_report
from evals.report.plots import figure_png, label_extent, plot_clip_vs_fid, plot_fid_vs_steps
from evals.report.tables import metrics_markdown, metrics_table_html

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def result_rows(sizes: list[int], seconds: list[float], device="cpu:x86_64", config=("ddim", 20)) -> pd.DataFrame:
    """Result rows of one configuration run in calls of `sizes` images, each call's images
    carrying that call's per-image seconds (as the worker writes them)."""
    rows = []
    for i, (size, sec) in enumerate(zip(sizes, seconds)):
        rows += [dict(scheduler=config[0], steps=config[1], guidance=7.5, prompt=f"p{j % 4}", gen_seconds=sec,
                      batch_size=size, worker="w0", device=device, dtype="float32",
                      created_at=T0 + dt.timedelta(seconds=i), diffusers_version="0.42.0", torch_version="2.13.0",
                      model_digest="abc123", status="ok") for j in range(size)]
    return pd.DataFrame(rows)


def test_calls_are_found_and_the_interval_resamples_them():
    rows = result_rows([8, 8, 8, 4], [0.10, 0.12, 0.11, 0.20])
    c = calls(rows)
    assert list(c.images) == [8, 8, 8, 4] and list(c.batch_size) == [8, 8, 8, 4]
    m = cost_metrics(rows, n_boot=400, level=0.95)
    assert m["gen_seconds"] == pytest.approx((8 * 0.33 + 4 * 0.20) / 28)  # per image, not per call
    assert m["n_calls"] == 4 and m["batch_sizes"] == "4, 8" and m["device"] == "cpu:x86_64"
    assert 0.10 <= m["gen_seconds_ci_lo"] < m["gen_seconds"] < m["gen_seconds_ci_hi"] <= 0.20
    one = cost_metrics(result_rows([8], [0.1]), n_boot=50, level=0.95)  # one call: no spread to resample
    assert one["n_calls"] == 1 and np.isnan([one["gen_seconds_ci_lo"], one["gen_seconds_ci_hi"]]).all()
    assert call_bootstrap_ci(np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]), 50, 0.95) == (1.0, 1.0)


def test_configurations_split_across_calls_of_different_sizes_are_flagged():
    """ddim 20 ran as 8 + 8 + 4 (split), euler 20 at batch 8 like the majority, euler 4 at 16."""
    parts = [result_rows([8, 8, 4], [0.1, 0.1, 0.2]), result_rows([8, 8], [0.1, 0.1], config=("euler", 20)),
             result_rows([8, 8], [0.1, 0.1], config=("dpmpp_2m", 20)),
             result_rows([16], [0.05], config=("euler", 4))]
    table = pd.DataFrame([{"scheduler": p.scheduler[0], "steps": p.steps[0], **cost_metrics(p, 50, 0.95)}
                          for p in parts])
    table["cost_comparable"] = flag_comparable(table)
    assert list(table.cost_comparable) == [False, True, True, False]
    (note,) = cost_warnings(table, config_labels(table, ["scheduler", "steps"]))
    assert note.startswith("cost: 2 configuration(s) marked † do not compare")
    assert "1 split across calls of different sizes: ddim 20 steps (calls of 4, 8)" in note
    assert "euler 4 steps (batch 16, cpu:x86_64, float32)" in note
    md = metrics_markdown(table, ["scheduler", "steps"])
    flagged = [line for line in md.splitlines() if "†" in line]
    assert len(flagged) == 2 and flagged[0].startswith("| ddim | 20 |") and "| 4, 8 |" in flagged[0]
    assert cost_warnings(table.assign(cost_comparable=True), config_labels(table)) == []


def test_group_metrics_of_rows_without_call_columns():
    """Older results (or hand-made frames) without batch_size/worker: each distinct seconds
    value is a call, nothing is flagged."""
    rows = pd.DataFrame({"prompt": ["a", "a", "b", "b"], "gen_seconds": [0.1, 0.1, 0.3, 0.3]})
    m = group_metrics(rows, RowFeatures(np.random.default_rng(0).normal(size=(4, 2))), None, n_boot=20)
    assert m["gen_seconds"] == pytest.approx(0.2) and m["n_calls"] == 2 and m["batch_sizes"] == ""
    assert flag_comparable(pd.DataFrame([m])).all()


@pytest.mark.parametrize("device, kind", [("cpu:x86_64", "CPU"), ("cuda:NVIDIA H200", "GPU"),
                                          ("cpu:x86_64, cuda:NVIDIA H200", "device")])
def test_the_cost_header_names_the_device(device, kind):
    table = pd.DataFrame([{"scheduler": "ddim", **cost_metrics(result_rows([8, 8], [0.1, 0.12]), 50, 0.95)}])
    table["device"], table["cost_comparable"] = device, True
    header = metrics_markdown(table, ["scheduler"]).splitlines()[0]
    assert f"| {kind} s / image [95% CI] | images / {kind} s | batch |" in header
    assert kind == "GPU" or "GPU" not in header
    html = metrics_table_html(table, ["scheduler"], 0.95)
    assert f">{kind} s / img<" in html and f"cost: {device}, float32" in html


def test_run_panel_lists_device_dtype_and_versions(tmp_path):
    rows = pd.concat([result_rows([8], [0.1]), result_rows([4], [0.1], device="cuda:NVIDIA H200")])
    meta = run_provenance(rows)
    assert meta["device"] == "cpu:x86_64 (8 images), cuda:NVIDIA H200 (4 images)"
    assert (meta["dtype"], meta["diffusers"], meta["torch"], meta["workers"]) == ("float32", "0.42.0", "2.13.0", "1")
    page = write_report(pd.DataFrame(), None, tmp_path, meta=meta, save_plots=False).read_text()
    run = page.split('<section id="meta">', 1)[1].split("</section>", 1)[0]
    for label, value in meta.items():
        assert f"<th>{label}</th><td>{value}</td>" in run


def test_warnings_name_groups_by_readable_labels_and_count_them():
    keys = ["model", "height", "width", "scheduler", "steps", "guidance"]
    metrics = pd.DataFrame([dict(model="embedded", height=64, width=64, scheduler=s, steps=st, guidance=7.5, n=16)
                            for s, st in itertools.product(["ddim", "euler"], [4, 20, 50])])
    ref = RefStats(np.zeros(64), np.eye(64), n=500)
    notes = comparison_warnings(metrics, keys, 64, ref, labels=config_labels(metrics, keys))
    note = next(n for n in notes if n.startswith("FID-infinity"))
    assert note.startswith("FID-infinity: 6 group(s) have fewer images than the feature dimension 64: ")
    assert "ddim 4 steps (n=16), ddim 20 steps (n=16)" in note and "and 1 more" in note
    assert "embedded 64 64" not in note and "7.5" not in note  # only the keys that vary


def clustered_metrics() -> pd.DataFrame:
    """8 configurations whose points nearly coincide: fixed label offsets would stack them."""
    rows = []
    for i, (sch, st, g) in enumerate(itertools.product(["ddim", "euler_a"], [10, 20], [1.0, 7.5])):
        rows.append(dict(model="embedded", scheduler=sch, steps=st, guidance=g, n=64, fid_inf=10 + 0.02 * i,
                         fid_inf_lo=9.0, fid_inf_hi=11.0, clip_score=80 + 0.01 * i, clip_score_ci_lo=79.0,
                         clip_score_ci_hi=81.0))
    return pd.DataFrame(rows)


def test_scatter_labels_do_not_overlap():
    fig = plot_clip_vs_fid(clustered_metrics(), keys=["model", "scheduler", "steps", "guidance"])
    figure_png(fig)  # drawn as the report draws it: the extents below are those of the saved PNG
    ax = fig.axes[0]
    labels = [t for t in ax.texts if re.search(r"\d+ steps", t.get_text())]
    boxes = [label_extent(t) for t in labels]
    assert len(labels) == 8
    assert not [(a.get_text(), b.get_text()) for (a, p), (b, q) in itertools.combinations(zip(labels, boxes), 2)
                if p.overlaps(q)]
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_error_bars_at_one_step_are_dodged_apart():
    fig = plot_fid_vs_steps(clustered_metrics(), keys=["model", "scheduler", "steps", "guidance"])
    figure_png(fig)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        xs = [ax.transData.transform(np.c_[c.lines[0].get_xdata(), c.lines[0].get_ydata()])[:, 0]
              for c in ax.containers]  # per scheduler: its points' x in pixels, one per step
        assert len(xs) == 2
        gap = np.abs(xs[0] - xs[1])
        cap = 2 * 3 * fig.dpi / 72  # two caps of capsize 3 points side by side
        assert (gap > cap).all() and (gap < 0.2 * ax.get_window_extent().width).all()
        ticks = ax.get_xticks()
        assert list(ticks) == [10, 20]  # ticks stay at the true steps, between the dodged bars
        assert ((xs[0] < ax.transData.transform([[t, 0] for t in ticks])[:, 0]).all())


def test_kid_is_the_headline_when_every_fid_is_invalid():
    """Every group below the feature dimension: the plots and the Pareto front lead with KID."""
    from evals.metrics_table import headline_fid

    m = clustered_metrics().assign(feature_dim=64, kid=np.linspace(1, 2, 8), kid_ci_lo=0.5, kid_ci_hi=2.5)
    assert headline_fid(m) == "fid_inf"
    small = m.assign(n=16)
    assert headline_fid(small) == "kid" and headline_fid(small.drop(columns="kid")) == "fid_inf"
    fig = plot_clip_vs_fid(small, keys=["model", "scheduler", "steps", "guidance"])
    assert fig.axes[0].get_xlabel().startswith("KID") and fig.axes[0].get_title() == "CLIP score vs KID"
