"""Every model family runs end to end (issue 15): tiny SD 2.x (v-prediction), SDXL, SD3 and FLUX
pipelines, saved as diffusers directories and registered through a models YAML, run a sweep
through jobs/generate.py on local Ray; a manifest mixing families finishes every row."""

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs import generate as gen_job
from pipelines.generation.grouped import generate
from pipelines.registry.models import ModelRegistry, load_model
from pipelines.registry.schedulers import make_scheduler, scheduler_names
from pipelines.registry.tiny_families import TINY_FAMILIES, write_tiny_models
from pipelines.seeding import row_generators
from pipelines.validation import ManifestError, validate_manifest
from tests.conftest import write_parquet

# family -> (schedulers valid for it, image sizes, the guidance axis, whether half the rows get a
# negative prompt). FLUX has one scheduler: FluxPipeline cannot drive flow_match_heun (refused at
# validation), so its sweep's second axis is the image size (FLUX's shift depends on it).
# FLUX-schnell ignores `guidance` (refused off its default): its guidance axis is true CFG,
# with the negative prompts on the true-CFG rows (FluxPipeline reads them only there).
SWEEPS = {
    "tiny-sd2v": (["ddim", "euler_a"], [32], "guidance", True),
    "tiny-sdxl": (["euler", "dpmpp_2m"], [32], "guidance", True),
    "tiny-sd3": (["flow_match_euler", "flow_match_heun"], [32], "guidance", True),
    "tiny-flux": (["flow_match_euler"], [32, 48], "true_cfg_scale", True),
    "tiny-flux-dev": (["flow_match_euler"], [32, 48], "guidance", False),
}


@pytest.fixture(scope="module")
def models_yaml(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-families"))


@pytest.fixture(scope="module")
def registry(models_yaml):
    return ModelRegistry.with_user_file(models_yaml)


def sweep_rows(model: str) -> list[dict]:
    schedulers, sizes, axis, negatives = SWEEPS[model]
    rows = []
    for sched in schedulers:
        for size in sizes:
            for steps in (2, 3):
                for scale in (1.0, 4.0):
                    for seed in (1, 2):
                        negative = negatives and seed == 2 and (axis == "guidance" or scale > 1)
                        rows.append(dict(prompt="a red circle", model=model, scheduler=sched, steps=steps,
                                         guidance=TINY_FAMILIES[model][1]["guidance"], true_cfg_scale=1.0,
                                         seed=seed, height=size, width=size, negative_prompt="blue" if negative else "",
                                         tag=f"{model}|{sched}|{size}|{steps}|{scale}|{seed}") | {axis: scale})
    return rows


@pytest.fixture(scope="module")
def family_sweep(tmp_path_factory, ray_local, models_yaml):
    """Every family's sweep plus tiny-random (SD 1.x) rows in one job: a manifest mixing families,
    run with --batch-size 4 so batches hold rows of several models."""
    rows = [r for model in sorted(SWEEPS) for r in sweep_rows(model)]
    rows += [dict(prompt="a blue square", model="tiny-random", scheduler="pndm", steps=2, guidance=4.0, seed=s,
                  true_cfg_scale=1.0, height=32, width=32, negative_prompt="", tag=f"tiny-random|pndm|32|{s}")
             for s in (1, 2)]
    tmp = tmp_path_factory.mktemp("family-sweep")
    manifest = write_parquet(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    assert gen_job.main([str(manifest), "--out", str(out), "--models", str(models_yaml), "--no-progress",
                         "--batch-size", "4"]) == 0
    return rows, pd.read_parquet(out)


def assert_complete(df: pd.DataFrame, rows: list[dict]):
    """One ok row per sample_id, PNGs at the requested size, the extra column unchanged."""
    assert len(df) == len(rows) and df.sample_id.is_unique
    assert (df.status == "ok").all(), df.error.dropna().unique()
    assert sorted(df.tag) == sorted(r["tag"] for r in rows)
    for png, h, w, tag in zip(df.image, df.height, df.width, df.tag):
        size = int(tag.split("|")[2])
        assert np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).shape == (h, w, 3) == (size, size, 3)


@pytest.mark.parametrize("model", sorted(SWEEPS))
def test_family_sweep_runs_through_the_job(family_sweep, model):
    rows, df = family_sweep
    mine = [r for r in rows if r["model"] == model]
    assert len(mine) == 16
    df = df[df.model == model]
    assert_complete(df, mine)
    assert df.model_digest.nunique() == 1
    for col in ("scheduler", "steps", "guidance", "true_cfg_scale", "seed", "negative_prompt"):
        assert sorted(df[col]) == sorted(r[col] for r in mine), col


def test_mixed_family_manifest_finishes_every_row(family_sweep):
    rows, df = family_sweep
    assert_complete(df, rows)
    assert df.model_digest.nunique() == len(SWEEPS) + 1


def test_v_prediction_is_kept_by_every_scheduler_swap(registry):
    model = load_model(registry.get("tiny-sd2v"))
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    for name in scheduler_names("eps"):
        assert make_scheduler(name, model.scheduler_config, "eps").config.prediction_type == "v_prediction", name


def test_v_prediction_rows_match_diffusers_own_call(registry):
    """The job's path (scheduler built from the registry name) gives diffusers' pixels for that scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler

    model = load_model(registry.get("tiny-sd2v"))
    rows = [dict(sample_id=f"s{i}", prompt="a red circle", negative_prompt="", seed=i, model="tiny-sd2v",
                 scheduler="euler_a", steps=3, guidance=4.0, height=32, width=32, cache_interval=1) for i in (1, 2)]
    ours = np.stack([r.pixels for r in generate(model, rows)])
    pipe = model.pipe
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(model.scheduler_config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.inference_mode():
        ref = pipe(prompt=["a red circle"] * 2, negative_prompt=["", ""], num_inference_steps=3, guidance_scale=4.0,
                   height=32, width=32, generator=row_generators([1, 2]), output_type="np").images
    ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_transformer_families_run_in_process_with_long_prompts(registry):
    """SD3 and FLUX through the grouped path (no `pipe.unet` touched at cache_interval 1), and a
    prompt longer than CLIP's 77 tokens recorded as truncated by a pipeline with several tokenizers."""
    long_prompt = " ".join(["a red circle"] * 40)
    for name in ("tiny-sd3", "tiny-flux", "tiny-sdxl"):
        model = load_model(registry.get(name))
        rows = [dict(sample_id=f"{name}-{i}", prompt=p, negative_prompt="", seed=i, model=name,
                     scheduler=TINY_FAMILIES[name][1]["scheduler"], steps=2, guidance=4.0, height=32, width=32,
                     cache_interval=1) for i, p in enumerate(["a cat", long_prompt])]
        results = generate(model, rows)
        assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
        assert [r.prompt_truncated for r in results] == [False, True], name


@pytest.mark.parametrize("model, column, value, expected", [
    ("tiny-flux", "scheduler", "flow_match_heun", "FluxPipeline passes its own sigmas"),
    ("tiny-sd3", "scheduler", "euler", "one of: flow_match_euler"),
    ("tiny-sdxl", "scheduler", "flow_match_euler", "one of: ddim"),
    ("tiny-sd3", "cache_interval", 2, "needs a UNet model"),
    ("tiny-flux", "height", 40, "a multiple of 16"),
])
def test_bad_family_combinations_are_refused_at_validation(registry, model, column, value, expected):
    row = {"prompt": "a red circle", "model": model, column: value}
    with pytest.raises(ManifestError) as e:
        validate_manifest(pa.Table.from_pylist([row]), registry)
    assert f"row 0, column {column!r}" in str(e.value) and expected in str(e.value), str(e.value)


def test_feature_reuse_runs_on_sdxl_and_names_the_cause_on_a_transformer(registry):
    """cache_interval 2: SDXL's UNet (text_time added conditioning) reuses features; on SD3 (a
    transformer, refused at validation) a row that gets past it is an error row saying why."""
    def rows(name):
        return [dict(sample_id=f"{name}-{i}", prompt="a cat", negative_prompt="", seed=i, model=name,
                     scheduler=TINY_FAMILIES[name][1]["scheduler"], steps=4, guidance=4.0, height=32, width=32,
                     cache_interval=2) for i in (1, 2)]

    sdxl = generate(load_model(registry.get("tiny-sdxl")), rows("tiny-sdxl"))
    assert [r.status for r in sdxl] == ["ok", "ok"], [r.error for r in sdxl]
    sd3 = generate(load_model(registry.get("tiny-sd3")), rows("tiny-sd3"))
    assert [r.status for r in sd3] == ["error", "error"]
    assert all("needs a UNet pipeline" in r.error and "SD3Transformer2DModel" in r.error for r in sd3), sd3[0].error
