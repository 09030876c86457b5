"""jobs/make_manifest.py: sweep spec -> manifest."""

import re
import subprocess
import sys

import pandas as pd
import pytest

from jobs import make_manifest
from tests.conftest import ROOT
from tests.test_models_yaml import BILLION_LAUGHS


def summary(capsys) -> dict:
    """The one line a successful run prints (stderr; nothing on stdout)."""
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    m = re.fullmatch(r"wrote (\S+): ([\d,]+) rows, ([\d,]+) configurations \((.*)\)\n", captured.err)
    assert m, captured.err
    return {"out": m[1], "rows": int(m[2].replace(",", "")), "configurations": int(m[3].replace(",", "")),
            "factors": m[4]}


def refused(tmp_path, capsys, argv) -> str:
    """main(argv) exits 2 with one error line, no traceback, and writes nothing; returns the line."""
    out = tmp_path / "new" / "m.parquet"
    capsys.readouterr()
    assert make_manifest.main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "new").exists()
    return captured.err


def test_cross_product_with_shared_seeds(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--prompt", "a red circle", "--prompt", "a blue square", "--schedulers", "ddim,euler",
                               "--steps", "4,8", "--guidance", "1,7.5", "--cache-intervals", "1,3",
                               "--seeds-per-prompt", "2", "--out", str(out)]) == 0
    said = summary(capsys)
    df = pd.read_parquet(out)
    assert len(df) == 2 * 2 * 2 * 2 * 2 * 2 == said["rows"] and said["configurations"] == 16
    assert said["out"] == str(out) and said["factors"].startswith("2 prompts x 2 seeds x 2 schedulers")
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
    assert "--cache-intervals: got 0 (int); expected integers in [1, 1000]" in capsys.readouterr().err


# (spec file text, what the error line must name)
WRONG_SPECS = [
    ("prompts: [a]\nguidance: [high]", ["key 'guidance'", "'high' (str)", "finite numbers >= 0"]),
    ("prompts: [a]\nguidance: [-1]", ["key 'guidance'", "-1 (int)", "finite numbers >= 0"]),
    ("prompts: [a]\nguidance: [.inf]", ["key 'guidance'", "inf (float)"]),
    ("prompts: [a]\nseed: abc", ["key 'seed'", "'abc' (str)", "an integer >= 0"]),
    ("prompts: [a]\nseed: -3", ["key 'seed'", "-3 (int)"]),
    ("prompts: [a]\nseed: 9223372036854775807\nseeds_per_prompt: 2", ["key 'seed'", "< 2**63"]),
    ("prompts: 5", ["key 'prompts'", "5 (int)", "list of prompts"]),
    ("prompts: {a red circle: 1}", ["key 'prompts'", "(mapping)", "list of prompts"]),
    ("prompts: [a, 1984, null, '']", ["key 'prompts'", "item 1: 1984 (int)", "item 2: None (null)", "item 3: ''",
                                      "quote numbers"]),
    ("prompts: []", ["key 'prompts'", "at least one prompt"]),
    ("steps: [4]", ["key 'prompts'", "required"]),
    ("prompts: [a]\ncache_intervals: [1.7]", ["key 'cache_intervals'", "1.7 (float)", "integers in [1, 1000]"]),
    ("prompts: [a]\nsteps: [2.5]", ["key 'steps'", "2.5 (float)", "integers in [1, 1000]"]),
    ("prompts: [a]\nsteps: [4, 4]", ["key 'steps'", "4 twice", "each value once"]),
    ("prompts: [a]\nsteps: '10,25'", ["key 'steps'", "'10,25' (str)", "e.g. [10, 25]"]),
    ("prompts: [a]\nsteps: [true]", ["key 'steps'", "True (bool)"]),
    ("prompts: [a]\nsteps: [0, 1001]", ["2 problems", "0 (int)", "1001 (int)", "[1, 1000]"]),
    ("prompts: [a]\nsteps: []", ["key 'steps'", "at least one value"]),
    ("prompts: [a]\nsteps: {ten: 10}", ["key 'steps'", "(mapping)", "a list of values"]),
    ("prompts: [a]\nsizes: [abc]", ["key 'sizes'", "'abc' (str)", "N or HxW"]),
    ("prompts: [a]\nsizes: [64x]", ["key 'sizes'", "'64x' (str)"]),
    ("prompts: [a]\nsizes: [[64, 64.5]]", ["key 'sizes'", "[64, 64.5] (list)"]),
    ("prompts: [a]\nsizes: [4, 64x8192]", ["key 'sizes'", "4 (int)", "'64x8192' (str)", "[8, 4096]"]),
    ("prompts: [a]\nsizes: [64, 64x64]", ["key 'sizes'", "'64x64' twice"]),
    ("prompts: [a]\nseeds_per_prompt: -1", ["key 'seeds_per_prompt'", "-1 (int)", "an integer >= 1"]),
    ("prompts: [a]\nseeds_per_prompt: 2e8", ["key 'seeds_per_prompt'", "'2e8' (str)", "an integer >= 1"]),
    ("prompts: [a]\nseeds_per_prompt: 2.0e+8", ["key 'seeds_per_prompt'", "200000000.0 (float)"]),
    ("prompts: [a]\nseeds_per_prompt: yes", ["key 'seeds_per_prompt'", "True (bool)"]),
    ("prompts: [a]\nmodels: [embeded]", ["key 'models'", "'embeded' (str)", "registered model", "embedded"]),
    ("prompts: [a]\nmodels: [5]", ["key 'models'", "5 (int)"]),
    ("prompts: [a]\nschedulers: [eulr, [ddim]]", ["key 'schedulers'", "'eulr' (str)", "['ddim'] (list)",
                                                   "scheduler name"]),
    ("prompts: [a]\nnegative_prompt: [blurry]", ["key 'negative_prompt'", "['blurry'] (list)", "a string"]),
    ("prompts: [a]\nstepz: [4]", ["unknown keys ['stepz']", "allowed", "steps"]),
    ("prompts: [a]\n7: [4]", ["unknown keys ['7']"]),
    ("[prompts, a]", ["['prompts', 'a'] (list)", "expected a mapping of sweep keys"]),
    ("prompts: [a\n", ["not valid YAML", "line"]),
]


@pytest.mark.parametrize("text, names", WRONG_SPECS, ids=[f"{i}-{t.splitlines()[-1][:20]}" for i, (t, _) in
                                                          enumerate(WRONG_SPECS)])
def test_wrong_spec_values_name_key_value_and_what_is_allowed(tmp_path, capsys, text, names):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(text + "\n")
    err = refused(tmp_path, capsys, ["--spec", str(spec)])
    assert str(spec) in err or "unknown keys" in err or "'prompts': required" in err
    for name in names:
        assert name in err, (name, err)


WRONG_FLAGS = [
    (["--steps", "10,2.5"], ["--steps: got '2.5'", "comma-separated integers"]),
    (["--steps", "0"], ["--steps: got 0 (int)", "[1, 1000]"]),
    (["--steps", ","], ["--steps: got ','"]),
    (["--guidance", "high"], ["--guidance: got 'high'", "comma-separated numbers"]),
    (["--guidance", "nan"], ["--guidance: got nan (float)", "finite numbers"]),
    (["--cache-intervals", "1.7"], ["--cache-intervals: got '1.7'", "integers"]),
    (["--sizes", "64,abc"], ["--sizes: got 'abc' (str)", "N or HxW"]),
    (["--seeds-per-prompt", "abc"], ["--seeds-per-prompt: got 'abc'", "an integer >= 1"]),
    (["--seeds-per-prompt", "-1"], ["--seeds-per-prompt: got -1 (int)", "an integer >= 1"]),
    (["--seeds-per-prompt", "2e8"], ["--seeds-per-prompt: got '2e8'"]),
    (["--seed", "x"], ["--seed: got 'x'", "an integer >= 0"]),
    (["--models", "nope"], ["--models: got 'nope' (str)", "registered model"]),
    (["--schedulers", "ddim,eulr"], ["--schedulers: got 'eulr' (str)"]),
    (["--max-rows", "0"], ["--max-rows", "must be >= 1"]),
    (["--max-rows", "lots"], ["--max-rows", "expected an integer"]),
    (["--stepz", "4"], ["unrecognized arguments: --stepz"]),
]


@pytest.mark.parametrize("flags, names", WRONG_FLAGS, ids=[" ".join(f) for f, _ in WRONG_FLAGS])
def test_wrong_flag_values_name_the_flag(tmp_path, capsys, flags, names):
    err = refused(tmp_path, capsys, ["--prompt", "a red circle", *flags])
    for name in names:
        assert name in err, (name, err)


def test_flags_override_the_spec_and_are_named_as_flags(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("prompts: [a]\nsteps: [2.5]\nguidance: [x]\n")
    err = refused(tmp_path, capsys, ["--spec", str(spec), "--steps", "0"])
    assert "--steps: got 0 (int)" in err and f"--spec {spec}, key 'guidance': got 'x' (str)" in err
    assert "2.5" not in err


def test_absurd_cross_products_are_refused_before_anything_is_built(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("prompts: [a, b]\nseeds_per_prompt: 200000000\n")
    err = refused(tmp_path, capsys, ["--spec", str(spec)])
    assert "400,000,000 rows (2 prompts x 200,000,000 seeds)" in err and "--max-rows 1,000,000" in err
    spec.write_text("prompts: [a, b]\nsteps: [%s]\nguidance: [%s]\n"
                    % (", ".join(map(str, range(1, 1001))), ", ".join(str(g / 10) for g in range(1000))))
    err = refused(tmp_path, capsys, ["--spec", str(spec)])
    assert "2,000,000 rows (2 prompts x 1 seeds x 1,000 step counts x 1,000 guidance scales)" in err
    # the limit is a flag
    flags = ["--prompt", "a", "--steps", "2,3", "--seeds-per-prompt", "8"]
    assert "16 rows" in refused(tmp_path, capsys, [*flags, "--max-rows", "15"])
    out = tmp_path / "m.parquet"
    assert make_manifest.main([*flags, "--max-rows", "16", "--out", str(out)]) == 0
    assert summary(capsys)["rows"] == 16 == len(pd.read_parquet(out))


def test_alias_bomb_spec_is_refused_quickly(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text("steps: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "\n".join(
        f"{key}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]"
        for i, key in enumerate(["guidance", "sizes", "models", "schedulers", "cache_intervals", "seed",
                                 "negative_prompt", "prompts"], start=1)) + "\n")
    assert len(spec.read_bytes()) < 1024
    out = tmp_path / "m.parquet"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "make_manifest.py"), "--spec", str(spec), "--out",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "refused" in proc.stderr and "aliases" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_alias_bomb_models_file_is_refused(tmp_path, capsys):
    models = tmp_path / "models.yaml"
    models.write_text(BILLION_LAUGHS + "\nmodels: {m: {base: tiny-random, source: *l9}}\n")
    err = refused(tmp_path, capsys, ["--prompt", "a", "--models-file", str(models)])
    assert "--models" in err and "refused" in err


def test_normal_anchors_work_in_a_spec(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("prompts: [a red circle]\nmodels: [tiny-random]\nsteps: &two [2, 3]\ncache_intervals: *two\n")
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--spec", str(spec), "--out", str(out)]) == 0
    assert summary(capsys)["configurations"] == 4
    df = pd.read_parquet(out)
    assert sorted(set(zip(df.steps, df.cache_interval))) == [(2, 2), (2, 3), (3, 2), (3, 3)]


def test_prompt_files_and_out_paths_that_cannot_work(tmp_path, capsys):
    mixed = tmp_path / "p.jsonl"
    mixed.write_text('{"prompt": "a", "tag": 1}\n{"prompt": "b", "tag": "x"}\n')
    assert "prompts: a column cannot be stored" in refused(tmp_path, capsys, ["--prompts", str(mixed)])
    assert "--prompts: file" in refused(tmp_path, capsys, ["--prompts", str(tmp_path / "nope.txt")])
    capsys.readouterr()
    assert make_manifest.main(["--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_spec_finds_its_prompts_file_beside_it_from_any_directory(tmp_path, capsys, monkeypatch):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "captions.txt").write_text("a red circle\na blue square\n")
    (sweeps / "s.yaml").write_text("prompts: captions.txt\nmodels: [tiny-random]\nsteps: [2]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "captions.txt").write_text("a green triangle\n")  # the cwd's file of that name is not taken
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--spec", "../sweeps/s.yaml", "--out", str(out)]) == 0
    assert sorted(pd.read_parquet(out).prompt) == ["a blue square", "a red circle"]
    capsys.readouterr()
    # a --prompts flag is a path from the current directory, as flags are
    assert make_manifest.main(["--spec", "../sweeps/s.yaml", "--prompts", "captions.txt", "--out", str(out)]) == 0
    assert pd.read_parquet(out).prompt.tolist() == ["a green triangle"]
    (sweeps / "s.yaml").write_text("prompts: missing.txt\n")
    err = refused(tmp_path, capsys, ["--spec", "../sweeps/s.yaml"])
    assert "key 'prompts'" in err and "sweeps/missing.txt" in err, err


def test_sizes_seeds_and_negative_prompt_reach_the_rows(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("prompts: [a]\nmodels: embedded\nsizes: [64, 32x64, [64, 32]]\nseeds_per_prompt: 3\nseed: 10\n"
                    "negative_prompt: blurry\nguidance: 3\n")
    out = tmp_path / "m.parquet"
    assert make_manifest.main(["--spec", str(spec), "--out", str(out)]) == 0
    said = summary(capsys)
    assert said["rows"] == 9 and said["configurations"] == 3 and "3 sizes" in said["factors"]
    df = pd.read_parquet(out)
    assert sorted(set(zip(df.height, df.width))) == [(32, 64), (64, 32), (64, 64)]
    assert sorted(set(df.seed)) == [10, 11, 12] and set(df.negative_prompt) == {"blurry"} and set(df.guidance) == {3.0}
    assert not list(tmp_path.glob(".m.parquet.tmp-*"))
