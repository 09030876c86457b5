"""jobs/make_manifest.py: sweep spec -> manifest."""

import json

import pandas as pd

from jobs import make_manifest


def test_cross_product_with_shared_seeds(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--prompt", "a red circle", "--prompt", "a blue square", "--schedulers", "ddim,euler",
                               "--steps", "4,8", "--guidance", "1,7.5", "--cache-intervals", "1,3",
                               "--seeds-per-prompt", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    df = pd.read_parquet(out)
    assert len(df) == 2 * 2 * 2 * 2 * 2 * 2 == summary["rows"] and summary["configurations"] == 16
    assert df.sample_id.is_unique and set(df.cache_interval) == {1, 3}
    # every configuration starts from the same noise: the same (prompt, seed) pairs
    pairs = df.groupby(["scheduler", "steps", "guidance", "cache_interval"]).apply(
        lambda g: tuple(sorted(zip(g.prompt, g.seed))), include_groups=False)
    assert pairs.nunique() == 1
    # ordered by run key, so a Ray block rarely mixes configurations
    keys = list(zip(df.scheduler, df.steps, df.guidance, df.cache_interval))
    assert keys == sorted(keys)


def test_yaml_spec_and_its_errors(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("prompts: [a red circle]\nmodels: [tiny-random]\nsteps: [2]\ncache_intervals: [2]\n")
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--spec", str(spec), "--out", str(out)]) == 0
    df = pd.read_parquet(out)
    assert df.model.tolist() == ["tiny-random"] and df.cache_interval.tolist() == [2]
    capsys.readouterr()
    spec.write_text("prompts: [a]\ncache_interval: [2]\n")  # singular: not a sweep key
    assert make_manifest.main(["--spec", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['cache_interval']" in err and "cache_intervals" in err
    assert make_manifest.main(["--prompt", "a", "--cache-intervals", "0", "--out", str(out)]) == 2
    assert "column 'cache_interval': got 0" in capsys.readouterr().err
