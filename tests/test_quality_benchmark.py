"""The scheduled quality benchmark (`jobs/benchmark.py --suite quality`) end to end: three
real runs of the embedded model into one history: a baseline, an unchanged rerun (not
flagged) and a quality drop (1 DDIM step instead of 8: flagged on its metrics, exit 3). A
slowdown is the unchanged run's own record judged again after the earlier good runs'
images/s were multiplied by 10 in the history: as if the machine or the code had become 10x
slower. The runs allow an 80% drop (--tolerance 0.8), so that a loaded CI machine (runs 4x
apart were seen at load 11) does not flag the unchanged run; a fourth real run would only
repeat the second."""

from __future__ import annotations

import contextlib
import io

import pandas as pd
import pytest
from PIL import Image

from jobs import benchmark
from pipelines.benchmarking.quality_history import METRICS, Metric, compare_metric, judge


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("quality")
    history = out / "history.parquet"

    def run(steps: int, *extra: str) -> tuple[int, str]:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = benchmark.main(["--suite", "quality", "--images", "16", "--steps", str(steps), "--reference",
                                 "embedded:64", "--history", str(history), "--out", str(out), "--tolerance", "0.8",
                                 *extra])
        return rc, stdout.getvalue()

    results = [run(8), run(8), run(1, "--plot")]
    return out, pd.read_parquet(history), results


def verdict(text: str) -> str:
    return text[text.index("quality benchmark embedded"):]


def test_three_runs_recorded_and_judged(runs):
    out, history, results = runs
    assert [rc for rc, _ in results] == [0, 0, 3], [verdict(t) for _, t in results]
    assert history.verdict.tolist() == ["baseline", "ok", "regression"]
    assert history.steps.tolist() == [8, 8, 1]
    assert history.n.tolist() == [16] * 3 and history.device_name.nunique() == 1
    assert history.git_commit.notna().all() and history.torch_version.notna().all()
    for m in METRICS[1:]:  # FID-infinity is invalid at n = 16 < 64 features: recorded as NaN, never judged
        assert history[[m.name, m.lo, m.hi]].notna().all().all(), m.name  # the embedded CLIP gives CMMD too
        assert (history[m.lo] <= history[m.name]).all() and (history[m.name] <= history[m.hi]).all(), m.name
    assert history.fid_inf.isna().all()


def test_an_unchanged_run_reproduces_its_metrics_and_is_not_flagged(runs):
    _, history, results = runs
    first, second = history.iloc[0], history.iloc[1]
    for m in METRICS[1:]:
        assert second[m.name] == pytest.approx(first[m.name], rel=1e-6, abs=1e-9), m.name
    assert second.regressed == "" and second.baseline_run_id == first.run_id
    assert "verdict: ok" in results[1][1] and "WORSE" not in results[1][1]


def test_a_quality_drop_is_flagged_on_its_metrics_and_names_the_change(runs):
    _, history, results = runs
    drop = history.iloc[2]
    assert "attribute accuracy" in drop.regressed.split(","), drop.regressed
    assert "images/s" not in drop.regressed  # fewer steps are faster
    text = verdict(results[2][1])
    assert "changed since: steps 8 -> 1" in text and "attribute accuracy" in text and "WORSE" in text
    assert "verdict: REGRESSION in" in text


def test_a_slowdown_is_flagged_on_throughput_against_the_last_good_runs(runs):
    out, history, _ = runs
    earlier = history.copy()
    earlier.loc[:1, "images_per_s"] *= 10
    slow = {**history.iloc[1].to_dict(), "run_id": "slow", "created_at": "9999-01-01T00:00:00"}
    lines = "\n".join(judge(slow, earlier, tolerance=0.8, window=5))
    assert slow["regressed"] == "images/s", lines  # the same images as the baseline's
    assert slow["baseline_run_id"] == history.iloc[1].run_id  # the drop is not a baseline
    assert "SLOWER beyond 80%" in lines and "verdict: REGRESSION in images/s" in lines
    assert "WORSE" not in lines and "changed since" not in lines
    with Image.open(out / "quality_history.png") as im:
        assert im.width > 100 and im.height > 100


@pytest.mark.parametrize("higher, new, base, want", [
    (True, (0.5, 0.6), (0.7, 0.8), "worse"), (True, (0.7, 0.9), (0.5, 0.6), "better"),
    (True, (0.5, 0.75), (0.7, 0.8), "same"), (False, (0.5, 0.6), (0.7, 0.8), "better"),
    (False, (0.9, 1.0), (0.7, 0.8), "worse"), (False, (float("nan"), 1.0), (0.7, 0.8), "n/a")])
def test_worse_means_intervals_apart_in_the_metric_s_direction(higher, new, base, want):
    m = Metric("x", "lo", "hi", higher, "x")
    assert compare_metric(m, dict(lo=new[0], hi=new[1]), dict(lo=base[0], hi=base[1])) == want


@pytest.mark.parametrize("argv, named", [
    (["--images", "0"], "--images"),
    (["--model", "sd15"], "--prompts"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
])
def test_bad_quality_flags_exit_2_with_one_line(tmp_path, capsys, argv, named):
    with contextlib.suppress(SystemExit):
        rc = benchmark.main(["--suite", "quality", "--out", str(tmp_path / "out")] + argv)
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
