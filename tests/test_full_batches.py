"""Blocks cut along configurations: each configuration's rows fill whole diffusers calls."""

import json
import re
from collections import Counter

import pandas as pd
import pytest

from jobs import generate as gen_job
from pipelines.generation.blocks import CallSizes, block_lengths, call_blocks
from tests.conftest import write_parquet

SIZES = {2: 6, 3: 8, 4: 11}  # steps -> rows of that configuration


@pytest.mark.parametrize("groups, batch, block, expected", [
    ([6, 8, 11], 8, 8, [6, 8, 8, 3]),  # fixed slices of 8 would give 6+2, 6+2, 8, 1
    ([3, 3, 2], 8, 8, [8]),  # small configurations share a call's block, each whole
    ([3, 6], 8, 8, [3, 6]),  # 3 + 6 does not fit in 8: not split
    ([20], 8, 32, [20]),
    ([40], 8, 32, [32, 8]),
])
def test_block_lengths(groups, batch, block, expected):
    assert block_lengths(groups, batch, block) == expected


def test_call_blocks_bring_a_configurations_rows_together():
    rows = pd.DataFrame({"model": "m", "steps": [2, 3, 2, 3, 2], "sample_id": list("abcde")})
    blocks = call_blocks(rows, batch_size=3, block_rows=3)
    assert [b.sample_id.tolist() for b in blocks] == [["a", "c", "e"], ["b", "d"]]
    flat = call_blocks(rows, batch_size=3, block_rows=3, by_config=False)  # continuous batching: plain slices
    assert [b.sample_id.tolist() for b in flat] == [["a", "b", "c"], ["d", "e"]]


def test_call_sizes_mean_is_images_per_call():
    sizes = CallSizes()
    sizes.add([8] * 8 + [3] * 3 + [0])  # two calls (8 and 3) and a row that never ran
    assert sizes.mean() == 5.5 and CallSizes().mean() is None


def test_configurations_run_as_full_calls(tmp_path, ray_local, capsys):
    rows = [dict(prompt=f"shape {i}", seed=i, steps=steps, scheduler="ddim", guidance=1.0, model="tiny-random")
            for steps, n in SIZES.items() for i in range(n)]
    manifest = write_parquet(tmp_path / "manifest.parquet", rows)
    out = tmp_path / "results"
    assert gen_job.main([str(manifest), "--out", str(out), "--batch-size", "8", "--no-progress"]) == 0
    df = pd.read_parquet(out)
    assert (df.status == "ok").all(), df.error.dropna().unique()
    calls = {steps: sorted((size for size, n in Counter(part.batch_size).items() for _ in range(n // size)),
                           reverse=True)
             for steps, part in df.groupby("steps")}
    assert calls == {2: [6], 3: [8], 4: [8, 3]}
    mean = round(len(df) / sum(1 / b for b in df.batch_size), 2)
    assert mean == 6.25  # 25 images in 4 calls
    assert json.loads((out / "_run.json").read_text())["runs"][-1]["mean_batch_size"] == mean
    line = re.search(r"mean batch size ([\d.]+) \(images per diffusers call\)", capsys.readouterr().err)
    assert line and float(line.group(1)) == mean
