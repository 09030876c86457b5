"""A negative prompt a row's pipeline would not read is refused in a manifest and left out by a
sweep (issue 15): SD/SDXL/SD3 read it only with classifier-free guidance (guidance > 1), FLUX
only with true CFG (true_cfg_scale > 1). Built-in registry entries: nothing is loaded."""

import pandas as pd
import pyarrow as pa
import pytest

from jobs import generate as gen_job
from jobs import make_manifest
from pipelines.registry.models import ModelRegistry
from pipelines.validation import ManifestError, validate_manifest
from tests.conftest import write_parquet

CFG_MODELS = ("embedded", "sd21", "sdxl", "sd35-medium")  # SD 1.x, SD 2.x, SDXL, SD 3.x
GUIDANCE = (0.0, 1.0, 1.01, 7.5)


def test_a_negative_prompt_without_cfg_is_refused_naming_row_column_and_value():
    rows = [dict(prompt="a cat", negative_prompt="blurry", model=m, guidance=g, true_cfg_scale=1.0)
            for m in CFG_MODELS for g in GUIDANCE]
    rows += [dict(prompt="a cat", negative_prompt="blurry", model=m, guidance=g, true_cfg_scale=c)
             for m, g in (("flux-dev", 0.0), ("flux-dev", 1.0), ("flux-dev", 3.5), ("flux-schnell", 0.0))
             for c in (1.0, 1.01)]
    rows += [dict(prompt="a cat", negative_prompt="", model="embedded", guidance=0.0, true_cfg_scale=1.0)]  # no negative prompt: fine
    with pytest.raises(ManifestError) as e:
        validate_manifest(pa.Table.from_pylist(rows), ModelRegistry(), max_problems=100)
    refused = {p.row for p in e.value.problems}
    assert refused == {i for i, r in enumerate(rows) if r["negative_prompt"] and (
        r.get("true_cfg_scale", 1.0) <= 1 if r["model"].startswith("flux") else r["guidance"] <= 1)}
    assert {p.column for p in e.value.problems} == {"negative_prompt"}
    text = str(e.value)
    assert ("row 1, column 'negative_prompt': got 'blurry'; expected '' for model 'embedded' at guidance 1 (<= 1): "
            "StableDiffusionPipeline runs no classifier-free guidance") in text
    assert "model 'sd35-medium' at guidance 0 (<= 1): StableDiffusion3Pipeline" in text
    assert "model 'flux-dev' at true_cfg_scale 1 (<= 1): FluxPipeline uses a negative prompt only for true CFG" in text


def test_the_generate_job_refuses_it_with_exit_2_and_one_line(tmp_path, capsys):
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="a cat", negative_prompt="blurry", guidance=1.0),
                                                      dict(prompt="a dog", negative_prompt="blurry", guidance=4.0)])
    capsys.readouterr()
    assert gen_job.main([str(manifest), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 problem(s): row 0, column 'negative_prompt': got 'blurry'" in err, err


def make(tmp_path, capsys, spec: str, *flags) -> tuple[pd.DataFrame, str]:
    (tmp_path / "s.yaml").write_text(spec)
    out = tmp_path / "m.parquet"
    capsys.readouterr()
    code = make_manifest.main(["--spec", str(tmp_path / "s.yaml"), "--out", str(out), *flags])
    err = capsys.readouterr().err
    return (pd.read_parquet(out) if code == 0 else None), err


def test_a_sweep_leaves_the_negative_prompt_out_where_no_cfg_runs(tmp_path, capsys):
    """guidance 0, 1 and 1.01 (and a model default) on every CFG family; true CFG 1 and 4 on FLUX."""
    df, err = make(tmp_path, capsys, "prompts: [a cat, a dog]\nnegative_prompt: blurry\nsizes: [64]\n"
                   "models: [embedded, sd21, sdxl, sd35-medium]\nguidance: [0.0, 1.0, 1.01, 7.5]\n")
    assert df is not None, err
    assert (df.negative_prompt == df.guidance.map(lambda g: "blurry" if g > 1 else "")).all()
    assert err.splitlines()[0] == ("note: negative_prompt left out ('') of 16 of 32 rows whose pipeline does not read "
                                   "it (guidance <= 1 on SD/SDXL/SD3, true_cfg_scale <= 1 on FLUX): their images are "
                                   "the same without it, and their sample_ids say so")
    plain, _ = make(tmp_path, capsys, "prompts: [a cat, a dog]\nsizes: [64]\n"
                    "models: [embedded, sd21, sdxl, sd35-medium]\nguidance: [0.0, 1.0, 1.01, 7.5]\n")
    same = df.guidance <= 1  # the rows without a read negative prompt are the sweep without one
    assert sorted(df.sample_id[same]) == sorted(plain.sample_id[plain.guidance <= 1])
    assert not set(df.sample_id[~same]) & set(plain.sample_id)

    df, err = make(tmp_path, capsys, "prompts: [a cat]\nnegative_prompt: blurry\nmodels: [flux-dev, flux-schnell]\n"
                   "true_cfg_scales: [1.0, 4.0]\nsizes: [64]\n")
    assert df is not None, err
    assert (df.negative_prompt == df.true_cfg_scale.map(lambda c: "blurry" if c > 1 else "")).all()
    assert "left out ('') of 2 of 4 rows" in err


def test_a_prompts_file_s_negative_prompts_are_left_out_likewise(tmp_path, capsys):
    pd.DataFrame({"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", ""]}).to_csv(tmp_path / "p.csv")
    df, err = make(tmp_path, capsys, f"prompts: {tmp_path / 'p.csv'}\nguidance: [1.0, 4.0]\n")
    assert df is not None, err
    got = set(zip(df.prompt, df.guidance, df.negative_prompt))
    assert got == {("a cat", 1.0, ""), ("a cat", 4.0, "blurry"), ("a dog", 1.0, ""), ("a dog", 4.0, "")}
    assert "left out ('') of 1 of 4 rows" in err


@pytest.mark.parametrize("spec, names", [
    ("prompts: [a cat]\nnegative_prompt: blurry\nguidance: [0.0, 1.0]\n",
     ["key 'negative_prompt': got 'blurry'", "no row does (model 'embedded' at guidance 0 (<= 1)"]),
    ("prompts: [a cat]\nnegative_prompt: blurry\nmodels: [flux-schnell]\n",
     ["key 'negative_prompt': got 'blurry'", "at true_cfg_scale 1 (<= 1): FluxPipeline"]),
])
def test_a_negative_prompt_no_row_reads_is_refused(tmp_path, capsys, spec, names):
    df, err = make(tmp_path, capsys, spec)
    assert df is None and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(n in err for n in names), err
    assert not (tmp_path / "m.parquet").exists()
