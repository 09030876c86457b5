"""jobs/generate.py end to end on a local Ray with the tiny pipeline."""

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs import generate as gen_job
from pipelines.benchmarking.environment import cpu_name
from pipelines.contract import MANIFEST_COLUMNS, RESULT_COLUMNS
from tests.conftest import ROOT, write_parquet


def sweep_rows():
    rows = []
    for p in ["a red circle", "a blue square", "a green triangle"]:
        for sched in ["ddim", "euler_a"]:
            for steps in [2, 3]:
                for g in [1.0, 7.5]:
                    for seed in [1, 2]:
                        rows.append(dict(prompt=p, scheduler=sched, steps=steps, guidance=g, seed=seed,
                                         model="tiny-random", tag=f"{p}|{seed}", weight=seed * 0.5))
    return rows


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("sweep")
    manifest = write_parquet(tmp / "manifest.parquet", sweep_rows())
    out = tmp / "results"
    assert gen_job.main([str(manifest), "--out", str(out), "--batch-size", "auto", "--no-progress"]) == 0
    return manifest, out, pd.read_parquet(out)


def test_sweep_output_is_complete_and_typed(sweep):
    manifest, out, df = sweep
    src = pd.read_parquet(manifest)
    assert len(df) == len(src) == 48 and df.sample_id.is_unique
    assert set(MANIFEST_COLUMNS + RESULT_COLUMNS + ["tag", "weight"]) <= set(df.columns)
    assert (df.status == "ok").all(), df.error.dropna().unique()
    merged = df.merge(src, on=["prompt", "seed", "scheduler", "steps", "guidance"], suffixes=("", "_src"))
    assert len(merged) == 48
    assert (merged.tag == merged.tag_src).all() and (merged.weight == merged.weight_src).all()
    for png, h, w in zip(df.image, df.height, df.width):
        assert decode(png).shape == (h, w, 3) == (32, 32, 3)
    assert (df.gen_seconds > 0).all() and df.batch_size.between(1, 8).all()  # auto on CPU: 8
    assert df.model_digest.nunique() == 1 and df.device.str.startswith("cpu").all()
    assert (df.device == f"cpu:{cpu_name()}").all()  # the CPU model (/proc/cpuinfo), not platform's "cpu"
    assert (df["dtype"] == "float32").all()  # resolved from --dtype auto on CPU
    run = json.loads((out / "_run.json").read_text())
    assert run["runs"][-1]["ok"] == 48 and run["manifest_rows"] == 48
    assert run["versions"]["diffusers"] and run["versions"]["torch"] and run["manifest_digest"]


def test_results_group_by_configuration_out_of_the_box(sweep):
    _, out, _ = sweep
    df = pd.read_parquet(out)  # the README snippet
    summary = df.groupby(["scheduler", "steps", "guidance"]).agg(n=("sample_id", "size"), sec=("gen_seconds", "mean"))
    assert len(summary) == 8 and (summary.n == 6).all()


def test_same_pixels_through_a_pool_of_two_actors(sweep, tmp_path):
    _, _, df = sweep
    subset = df.sort_values("sample_id").head(10)
    manifest = tmp_path / "subset.parquet"
    subset[MANIFEST_COLUMNS].to_parquet(manifest, index=False)
    out = tmp_path / "pool2"
    assert gen_job.main([str(manifest), "--out", str(out), "--pool-size", "2", "--batch-size", "2",
                         "--cpus-per-actor", "0.5", "--no-progress"]) == 0
    again = pd.read_parquet(out).set_index("sample_id")
    assert again.worker.nunique() == 2
    for sid, png in zip(subset.sample_id, subset.image):
        diff = np.abs(decode(png).astype(int) - decode(again.loc[sid, "image"]).astype(int)).max()
        assert diff <= 1, (sid, diff)


def test_continuous_batching_gives_the_same_images(sweep, tmp_path):
    manifest, _, df = sweep
    out = tmp_path / "continuous"
    assert gen_job.main([str(manifest), "--out", str(out), "--batch-size", "6", "--batching", "continuous",
                         "--no-progress"]) == 0
    again = pd.read_parquet(out).set_index("sample_id")
    assert len(again) == 48 and (again.status == "ok").all()
    for sid, png in zip(df.sample_id, df.image):
        diff = np.abs(decode(png).astype(int) - decode(again.loc[sid, "image"]).astype(int)).max()
        assert diff <= 1, (sid, diff)
    assert json.loads((out / "_run.json").read_text())["options"]["batching"] == "continuous"


def test_resume_skips_finished_rows_and_refuses_a_different_manifest(sweep, tmp_path):
    manifest, _, full = sweep
    out = tmp_path / "resume"
    assert gen_job.main([str(manifest), "--out", str(out), "--limit", "5", "--no-progress"]) == 0
    assert len(pd.read_parquet(out)) == 5
    assert gen_job.main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 48 and df.sample_id.is_unique and set(df.sample_id) == set(full.sample_id)
    run = json.loads((out / "_run.json").read_text())
    assert [r["todo"] for r in run["runs"]] == [5, 43] and run["runs"][1]["skipped_done"] == 5

    other = write_parquet(tmp_path / "other.parquet", [dict(prompt="something else", model="tiny-random")])
    before = sorted(p.name for p in out.iterdir())
    assert gen_job.main([str(other), "--out", str(out), "--no-progress"]) == 2
    assert sorted(p.name for p in out.iterdir()) == before


BAD_MANIFESTS = {
    "steps": [dict(prompt="a", model="tiny-random", steps=0)],
    "prompt": [dict(prompt="", model="tiny-random")],
    "scheduler": [dict(prompt="a", model="tiny-random", scheduler="bogus")],
    "model": [dict(prompt="a", model="../../weights")],
    "height": [dict(prompt="a", model="tiny-random", height=30)],
    "guidance": [dict(prompt="a", model="tiny-random", guidance=float("inf"))],
}


@pytest.mark.parametrize("column", sorted(BAD_MANIFESTS))
def test_bad_manifest_exits_2_and_writes_nothing(tmp_path, capsys, column):
    manifest = write_parquet(tmp_path / "bad.parquet", BAD_MANIFESTS[column])
    out = tmp_path / "out"
    assert gen_job.main([str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"row 0, column {column!r}" in err
    assert not out.exists()


def test_not_parquet_file(tmp_path, capsys):
    fake = tmp_path / "manifest.parquet"
    fake.write_text("prompt,steps\na cat,20\n")
    assert gen_job.main([str(fake), "--out", str(tmp_path / "out")]) == 2
    assert "not a Parquet file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path):
    manifest = write_parquet(tmp_path / "bad.parquet", [dict(prompt="a", steps=5), dict(prompt=None, steps=5)])
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "generate.py"), str(manifest), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "row 1, column 'prompt'" in lines[0], proc.stderr
