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
from pipelines.registry.models import ModelRegistry
from pipelines.registry.loading import load_model
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


@pytest.fixture(scope="module")
def loaded(registry):
    """Each tiny model loaded once for the module's in-process tests, as a worker loads it (with its
    refiner). Tests may swap its scheduler (every generate call builds its own) but leave no hooks."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_with_refiner(registry, name)
        return cache[name]
    return get


# SDXL base+refiner rows (the ensemble-of-experts handoff at 60 % of 5 steps), in the same job
REFINED_ROWS = [dict(prompt="a red circle", model="tiny-sdxl", scheduler="euler", steps=5, guidance=4.0, seed=s,
                     true_cfg_scale=1.0, denoising_end=0.6, height=32, width=32, negative_prompt=n,
                     tag=f"tiny-sdxl|euler|32|refined|{s}") for s, n in ((1, ""), (2, "blue"))]


def sweep_rows(model: str) -> list[dict]:
    schedulers, sizes, axis, negatives = SWEEPS[model]
    rows = []
    for sched in schedulers:
        for size in sizes:
            for steps in (2, 3):
                for scale in (1.0, 4.0):
                    for seed in (1, 2):
                        negative = negatives and seed == 2 and scale > 1  # read only with (true) CFG
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
    rows += REFINED_ROWS
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
    assert len(mine) == 16 + (len(REFINED_ROWS) if model == "tiny-sdxl" else 0)
    df = df[df.model == model]
    assert_complete(df, mine)
    assert df.model_digest.nunique() == 1
    for col in ("scheduler", "steps", "guidance", "true_cfg_scale", "seed", "negative_prompt", "denoising_end"):
        assert sorted(df[col]) == sorted(r.get(col, 1.0) for r in mine), col


def test_mixed_family_manifest_finishes_every_row(family_sweep):
    rows, df = family_sweep
    assert_complete(df, rows)
    assert df.model_digest.nunique() == len(SWEEPS) + 1


def test_v_prediction_is_kept_by_every_scheduler_swap(loaded):
    model = loaded("tiny-sd2v")
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    for name in scheduler_names("eps"):
        assert make_scheduler(name, model.scheduler_config, "eps").config.prediction_type == "v_prediction", name


def test_v_prediction_rows_match_diffusers_own_call(registry, loaded):
    """The job's path (scheduler built from the registry name) gives diffusers' pixels for that scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler

    model = loaded("tiny-sd2v")
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


def test_transformer_families_run_in_process_with_long_prompts(loaded):
    """SD3 and FLUX through the grouped path (no `pipe.unet` touched at cache_interval 1), and a
    prompt longer than CLIP's 77 tokens recorded as truncated by a pipeline with several tokenizers."""
    long_prompt = " ".join(["a red circle"] * 40)
    for name in ("tiny-sd3", "tiny-flux", "tiny-sdxl"):
        model = loaded(name)
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
    ("tiny-flux", "guidance", 4.0, "no guidance embedding (guidance_embeds false"),
    ("tiny-flux", "negative_prompt", "blue", "a negative prompt only for true CFG"),
    ("tiny-flux-dev", "negative_prompt", "blue", "a negative prompt only for true CFG"),
    ("tiny-sdxl", "true_cfg_scale", 2.0, "FluxPipeline's true CFG"),
    ("tiny-sd3", "denoising_end", 0.5, "it has no refiner"),
    ("tiny-sdxl", "denoising_end", 0.0, "a fraction in (0, 1]"),
    ("tiny-sdxl-refiner", "model", "tiny-sdxl-refiner", "is an img2img refiner"),
])
def test_bad_family_combinations_are_refused_at_validation(registry, model, column, value, expected):
    row = {"prompt": "a red circle", "model": model, column: value}
    with pytest.raises(ManifestError) as e:
        validate_manifest(pa.Table.from_pylist([row]), registry)
    assert f"row 0, column {column!r}" in str(e.value) and expected in str(e.value), str(e.value)


def test_feature_reuse_runs_on_sdxl_and_names_the_cause_on_a_transformer(loaded):
    """cache_interval 2: SDXL's UNet (text_time added conditioning) reuses features; on SD3 (a
    transformer, refused at validation) a row that gets past it is an error row saying why."""
    def rows(name):
        return [dict(sample_id=f"{name}-{i}", prompt="a cat", negative_prompt="", seed=i, model=name,
                     scheduler=TINY_FAMILIES[name][1]["scheduler"], steps=4, guidance=4.0, height=32, width=32,
                     cache_interval=2) for i in (1, 2)]

    sdxl = generate(loaded("tiny-sdxl"), rows("tiny-sdxl"))
    assert [r.status for r in sdxl] == ["ok", "ok"], [r.error for r in sdxl]
    sd3 = generate(loaded("tiny-sd3"), rows("tiny-sd3"))
    assert [r.status for r in sd3] == ["error", "error"]
    assert all("needs a UNet pipeline" in r.error and "SD3Transformer2DModel" in r.error for r in sd3), sd3[0].error


def as_manifest_rows(rows: list[dict]) -> list[dict]:
    """Sweep rows as validated manifest rows (the job's sample_id is the tag here)."""
    return [dict(r, sample_id=r["tag"], cache_interval=1) for r in rows]


def diffusers_pixels(pipe, **kwargs) -> np.ndarray:
    """The pipeline called directly, as a user would, to uint8 pixels."""
    with torch.inference_mode():
        images = pipe(output_type="np", height=32, width=32, **kwargs).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def flux_rows(name: str, guidance: float, true_cfg: float, negative: str, steps: int = 3) -> list[dict]:
    return [dict(sample_id=f"{name}-{guidance}-{true_cfg}-{i}", prompt="a red circle", negative_prompt=negative, seed=i,
                 model=name, scheduler="flow_match_euler", steps=steps, guidance=guidance, true_cfg_scale=true_cfg,
                 height=32, width=32, cache_interval=1) for i in (1, 2)]


@pytest.mark.parametrize("name, embeds, text_length, cases", [
    # FLUX-dev: `guidance` is the distilled guidance (an input of the transformer); true CFG on top
    ("tiny-flux-dev", True, 512, [(2.0, 1.0, ""), (5.0, 1.0, ""), (2.0, 3.0, "blue"), (2.0, 3.0, "")]),
    # FLUX-schnell: no guidance input; true CFG with or without a negative prompt
    ("tiny-flux", False, 256, [(0.0, 1.0, ""), (0.0, 3.0, "blue")]),
])
def test_flux_guidance_is_fluxpipeline_s(registry, loaded, name, embeds, text_length, cases):
    """Each FLUX row gives the pixels of FluxPipeline called directly with the same seed, guidance_scale,
    true_cfg_scale, negative prompt and max_sequence_length; and each setting changes the image."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.registry.families import guidance_embeds, max_sequence_length

    spec = registry.get(name)
    assert (guidance_embeds(spec), max_sequence_length(spec)) == (embeds, text_length)
    model = loaded(name)
    assert model.pipe.transformer.config.guidance_embeds is embeds
    images = []
    for guidance, true_cfg, negative in cases:
        ours = np.stack([r.pixels for r in generate(model, flux_rows(name, guidance, true_cfg, negative))])
        model.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        ref = diffusers_pixels(model.pipe, prompt=["a red circle"] * 2, num_inference_steps=3, guidance_scale=guidance,
                               true_cfg_scale=true_cfg, negative_prompt=[negative] * 2 if true_cfg > 1 else None,
                               max_sequence_length=text_length, generator=row_generators([1, 2]))
        assert max_diff(ours, ref) <= 1, (guidance, true_cfg, negative)
        images.append(ours)
    for i in range(len(images)):
        for j in range(i):
            assert max_diff(images[i], images[j]) > 1, (cases[i], cases[j])


def test_flux_schnell_ignores_guidance_so_the_manifest_refuses_it(registry, loaded):
    """Why guidance is refused off schnell's default: FluxPipeline gives the same pixels at any guidance_scale."""
    model = loaded("tiny-flux")
    pixels = [diffusers_pixels(model.pipe, prompt="a red circle", num_inference_steps=2, guidance_scale=g,
                               generator=row_generators([1])) for g in (0.0, 7.0)]
    assert max_diff(*pixels) == 0
    keys = ("model", "guidance", "negative_prompt", "true_cfg_scale")
    ok = [dict(zip(keys, v), prompt="a red circle") for v in [("tiny-flux-dev", 4.0, None, None),
                                                             ("tiny-flux", None, "blue", 2.0),
                                                             ("tiny-sdxl", 5.0, "blue", None)]]
    t = validate_manifest(pa.Table.from_pylist(ok), registry)
    assert t.column("true_cfg_scale").to_pylist() == [1.0, 2.0, 1.0]
    assert t.column("guidance").to_pylist() == [4.0, 0.0, 5.0]


def test_t5_text_length_per_model_is_passed_and_recorded(registry, loaded):
    """A registry max_sequence_length reaches the pipeline (the T5 encoder reads that many tokens; same
    pixels as diffusers called with it) and a prompt or a read negative prompt longer is recorded as truncated."""
    from dataclasses import replace

    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = replace(registry.get("tiny-sd3"), max_sequence_length=4)
    model = load_model(spec)
    prompt = "a red circle painting"  # 5 T5 tokens with </s>, well under CLIP's 77
    rows = [dict(sample_id=f"t5-{i}", prompt=p, negative_prompt=n, seed=1, model=spec.name,
                 scheduler="flow_match_euler", steps=2, guidance=4.0, true_cfg_scale=1.0, height=32, width=32,
                 cache_interval=1) for i, (p, n) in enumerate([(prompt, ""), ("a cat", ""), ("a cat", prompt)])]
    def t5_lengths(model, rows) -> set:
        """The token counts the T5 encoder sees in a generate call: the pipeline's max_sequence_length."""
        seen = []
        hook = model.pipe.text_encoder_3.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
        try:
            results.extend(generate(model, rows, batch_sizes=1))
        finally:
            hook.remove()
        return set(seen)

    results = []
    assert t5_lengths(model, rows) == {4}
    assert [r.prompt_truncated for r in results] == [True, False, True]
    model.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    ref = diffusers_pixels(model.pipe, prompt=prompt, negative_prompt="", num_inference_steps=2, guidance_scale=4.0,
                           max_sequence_length=4, generator=row_generators([1]))[0]
    assert max_diff(results[0].pixels, ref) <= 1
    results.clear()
    assert t5_lengths(loaded("tiny-sd3"), rows) == {256}  # the default: diffusers' for SD3
    assert [r.prompt_truncated for r in results] == [False, False, False]


def test_negative_prompts_longer_than_clip_are_recorded_when_read(loaded):
    """prompt_truncated counts a negative prompt that the pipeline reads and cuts (both SDXL CLIPs at 77)."""
    long_text = " ".join(["a red circle"] * 40)
    model = loaded("tiny-sdxl")
    rows = [dict(sample_id=f"neg-{g}", prompt="a cat", negative_prompt=long_text, seed=1, model="tiny-sdxl",
                 scheduler="euler", steps=2, guidance=g, true_cfg_scale=1.0, height=32, width=32, cache_interval=1)
            for g in (1.0, 4.0)]
    assert [r.prompt_truncated for r in generate(model, rows)] == [False, True]  # read only with CFG (guidance > 1)


def test_sdxl_size_conditioning_is_the_rows_size(loaded):
    """SDXL's added time ids are (original_size, crop top-left, target_size) = ((h, w), (0, 0), (h, w)),
    diffusers' defaults for the row's height and width, for every row of a batch."""
    model = loaded("tiny-sdxl")
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        rows = [dict(sample_id=f"xl-{i}", prompt="a cat", negative_prompt="", seed=i, model="tiny-sdxl",
                     scheduler="euler", steps=2, guidance=4.0, true_cfg_scale=1.0, height=32, width=48,
                     cache_interval=1) for i in (1, 2)]
        assert [r.pixels.shape for r in generate(model, rows)] == [(32, 48, 3)] * 2
    finally:
        hook.remove()
    assert len(seen) == 2 and all(t.shape == (4, 6) for t in seen)  # 2 steps; 2 rows x (uncond, cond)
    assert all((t == torch.tensor([32.0, 48.0, 0.0, 0.0, 32.0, 48.0])).all() for t in seen)


def batch_rows(model: str) -> list[dict]:
    """Eight rows of one configuration (so batch size 8 is one call of 8), half with a negative prompt
    where the family reads one; "tiny-sdxl+refiner": SDXL rows handed to the refiner at 60 %."""
    name, refined = model.split("+")[0], model.endswith("+refiner")
    flux = name.startswith("tiny-flux")
    return [dict(sample_id=f"{model}-{seed}", prompt="a red circle", negative_prompt="blue" if seed % 2 else "",
                 seed=seed, model=name, scheduler=TINY_FAMILIES[name][1]["scheduler"] if name in TINY_FAMILIES
                 else "euler_a", steps=3, guidance=TINY_FAMILIES[name][1]["guidance"] if flux else 4.0,
                 true_cfg_scale=2.0 if flux else 1.0, denoising_end=0.6 if refined else 1.0, height=32, width=32,
                 cache_interval=1) for seed in range(8)]


@pytest.mark.parametrize("model", sorted(SWEEPS) + ["tiny-sdxl+refiner", "tiny-random"])
def test_batch_size_does_not_change_pixels(registry, loaded, model):
    """Acceptance: the same rows at batch size 1 and 8 give the same pixels within 1/255, for every
    family (stochastic euler_a on SD 1.x, true CFG on FLUX, the refiner's handoff on SDXL)."""
    rows = batch_rows(model)
    pipe = loaded(rows[0]["model"]) if rows[0]["model"] in TINY_FAMILIES else load_model(registry.get("tiny-random"))
    one, eight = (generate(pipe, rows, batch_sizes=n) for n in (1, 8))
    assert [r.batch_size for r in one] == [1] * 8 and [r.batch_size for r in eight] == [8] * 8
    for r, a, b in zip(rows, one, eight):
        assert a.status == b.status == "ok", (a.error, b.error)
        assert max_diff(a.pixels, b.pixels) <= 1, r["sample_id"]


@pytest.mark.parametrize("models, expected", [
    ("a: {base: sd15, refiner: b}", "a refiner finishes SDXL base models only"),
    ("a: {base: sdxl, refiner: zz}", "expected a model registered in this file or built in"),
    ("a: {base: sdxl, refiner: sd15}", "expected an SDXL img2img model"),
])
def test_bad_refiner_settings_are_refused(tmp_path, models, expected):
    from pipelines.registry.models import ModelConfigError, load_models_yaml

    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  {models}\n  b: {{base: sdxl, pipeline: StableDiffusionXLImg2ImgPipeline}}\n")
    with pytest.raises(ModelConfigError) as e:
        load_models_yaml(path)
    assert "model 'a', key 'refiner'" in str(e.value) and expected in str(e.value), str(e.value)


def load_with_refiner(registry, name: str):
    """A model as the worker loads it: with its refiner, if the registry gives it one."""
    model = load_model(registry.get(name))
    if model.spec.refiner:
        model.extras["refiner"] = load_model(registry.get(model.spec.refiner))
    return model


def test_sdxl_base_and_refiner_rows_match_diffusers_recipe(registry, loaded, family_sweep):
    """Rows with denoising_end < 1 give the pixels of diffusers' documented ensemble of experts called
    directly (base with denoising_end and output_type="latent", the refiner img2img from denoising_start),
    in process and through the job (whose workers load the refiner named by the models YAML)."""
    from diffusers import EulerDiscreteScheduler

    assert set(registry.with_refiners(["tiny-sdxl"])) == {"tiny-sdxl", "tiny-sdxl-refiner"}
    model = loaded("tiny-sdxl")
    rows = as_manifest_rows(REFINED_ROWS)
    ours = np.stack([r.pixels for r in generate(model, rows)])
    base, refiner = model.pipe, model.extras["refiner"].pipe
    base.scheduler = EulerDiscreteScheduler.from_config(model.scheduler_config)
    refiner.scheduler = EulerDiscreteScheduler.from_config(model.extras["refiner"].scheduler_config)
    prompts, negatives = [r["prompt"] for r in rows], [r["negative_prompt"] for r in rows]
    with torch.inference_mode():
        latents = base(prompt=prompts, negative_prompt=negatives, num_inference_steps=5, guidance_scale=4.0,
                       denoising_end=0.6, output_type="latent", height=32, width=32,
                       generator=row_generators([1, 2])).images
        images = refiner(prompt=prompts, negative_prompt=negatives, num_inference_steps=5, guidance_scale=4.0,
                         denoising_start=0.6, image=latents, generator=row_generators([1, 2]), output_type="np").images
    ref = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    assert max_diff(ours, ref) <= 1
    base_only = as_manifest_rows([dict(r, denoising_end=1.0, tag=r["tag"] + "-base") for r in REFINED_ROWS])
    assert max_diff(ours, np.stack([r.pixels for r in generate(model, base_only)])) > 1  # the refiner ran
    _, df = family_sweep
    job = dict(zip(df.tag, df.image))
    for r, px in zip(REFINED_ROWS, ref):
        assert max_diff(np.asarray(Image.open(io.BytesIO(job[r["tag"]])).convert("RGB")), px) <= 1, r["tag"]


# Speed options per family (issue 15): each applies to the family's denoiser (`unet` or `transformer`),
# VAE and refiner with the pixels unchanged, or is refused before the run with the reason.

def with_speed(model, options):
    """A copy of a loaded model (and its refiner) with speed options applied to deep copies of the pipelines."""
    import copy

    from pipelines.generation.speed import apply_speed_options

    fast = copy.copy(model)
    fast.pipe = apply_speed_options(copy.deepcopy(model.pipe), options)
    fast.extras = dict(model.extras)
    if "refiner" in model.extras:
        fast.extras["refiner"] = with_speed(model.extras["refiner"], options)
    return fast


@pytest.mark.parametrize("model", ["tiny-sd2v", "tiny-sdxl+refiner", "tiny-sd3", "tiny-flux-dev"])
def test_channels_last_and_fused_qkv_keep_pixels_per_family(loaded, model):
    """--channels-last and --fuse-qkv on every family: the denoiser's attention fused (SD3/FLUX joint
    attention included), the VAE in NHWC, the SDXL refiner too; pixels within 1/255 of the eager model."""
    from pipelines.generation.speed import SpeedOptions, denoiser_name

    rows = batch_rows(model)[:2]
    base = loaded(rows[0]["model"])
    fast = with_speed(base, SpeedOptions(channels_last=True, fuse_qkv=True))
    for pipe in [fast.pipe] + ([fast.extras["refiner"].pipe] if "refiner" in fast.extras else []):
        denoiser = getattr(pipe, denoiser_name(pipe))
        attention = [m for m in denoiser.modules() if hasattr(m, "fused_projections")]
        assert attention and all(m.fused_projections for m in attention), type(denoiser).__name__
        assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ours, eager = generate(fast, rows), generate(base, rows)
    assert [r.status for r in ours] == ["ok", "ok"], [r.error for r in ours]
    assert max(max_diff(a.pixels, b.pixels) for a, b in zip(ours, eager)) <= 1


def test_compile_wraps_the_transformer_and_the_vae_decoder(loaded):
    """--compile on FLUX compiles the denoiser it has (`transformer`, no `unet`) and the VAE decoder; the
    compiled pipeline still reads the transformer's config through the wrapper. (Compiling is slow on a
    CPU: the SD 1.x compiled generation is tests/test_speed.py's.)"""
    from pipelines.generation.speed import SpeedOptions

    model = loaded("tiny-flux-dev")
    pipe = with_speed(model, SpeedOptions(compile="default")).pipe
    assert type(pipe.transformer).__name__ == "OptimizedModule" and getattr(pipe, "unet", None) is None
    assert type(pipe.transformer._orig_mod).__name__ == "FluxTransformer2DModel"
    assert type(pipe.vae.decoder).__name__ == "OptimizedModule"
    assert pipe.transformer.config.guidance_embeds is True


@pytest.mark.parametrize("model", ["tiny-sd2v", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux-dev"])
def test_batch_size_auto_probes_each_familys_denoiser_at_its_costliest(registry, loaded, model):
    """--batch-size auto measures peaks of probe calls (pipeline_call.measure_peaks; CUDA only, so here the
    calls themselves): each probe row is one validation accepts for the model, and the family's denoiser
    sees two rows' worth per row and step: CFG's doubled batch (SD, SDXL, SD3), true CFG's second forward (FLUX)."""
    from dataclasses import asdict

    from pipelines.generation.pipeline_call import probe_row, run_batch

    spec = registry.get(model)
    probes = [probe_row(spec, 32, 32, seed=i) for i in (0, 1)]
    validate_manifest(pa.Table.from_pylist([asdict(r) for r in probes]), registry)
    pipe = loaded(model).pipe
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    seen = []
    hook = denoiser.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        results = run_batch(loaded(model), probes)
    finally:
        hook.remove()
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert sum(seen) == 2 * 2 * 2, seen  # 2 steps x 2 rows x 2 (guidance)


@pytest.fixture(scope="module")
def sd35_type(tmp_path_factory, models_yaml):
    """A tiny SD 3.5-type model (transformer with qk_norm and a dual-attention layer) in the models YAML."""
    import yaml
    from diffusers import SD3Transformer2DModel

    from pipelines.registry.tiny_families import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline()
    pipe.transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                             joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                             qk_norm="rms_norm", dual_attention_layers=(0,))
    tmp = tmp_path_factory.mktemp("sd35")
    pipe.save_pretrained(tmp / "tiny-sd35", safe_serialization=True)
    entries = yaml.safe_load(models_yaml.read_text())["models"]
    entries["tiny-sd35"] = dict(entries["tiny-sd3"], source=str(tmp / "tiny-sd35"))
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def test_fuse_qkv_is_refused_for_sd35_type_transformers_before_the_run(sd35_type, tmp_path, capsys):
    """diffusers' fused joint attention skips SD 3.5's q/k norms: the job exits 2 before anything is written,
    naming flag, model, family and why; a worker that gets such a model anyway fails its load, never draws.
    SD 3.0-type (tiny-sd3), FLUX and UNet models take every option; a hub SD3 whose config is not on disk is refused."""
    from pipelines.generation.speed import SpeedOptions, apply_speed_options, speed_problem

    registry = ModelRegistry.with_user_file(sd35_type)
    rows = [dict(prompt="a red circle", model=m, steps=2) for m in ("tiny-sd35", "tiny-flux")]
    manifest = write_parquet(tmp_path / "m.parquet", rows)
    code = gen_job.main([str(manifest), "--out", str(tmp_path / "out"), "--models", str(sd35_type), "--fuse-qkv"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.startswith("error: --fuse-qkv: model 'tiny-sd35' (SD 3.x) cannot use it:") and "q/k norms" in err, err
    assert len(err.splitlines()) == 1
    everything = SpeedOptions(channels_last=True, fuse_qkv=True, compile="default")
    for name in ("tiny-sd2v", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd3", "tiny-flux", "sd15", "sdxl", "flux-dev"):
        assert speed_problem(everything, registry.get(name)) is None, name
    assert "not readable before the run" in speed_problem(everything, registry.get("sd35-medium"))[1]
    assert speed_problem(SpeedOptions(channels_last=True, compile="default"), registry.get("tiny-sd35")) is None
    with pytest.raises(ValueError, match="--fuse-qkv"):
        apply_speed_options(load_model(registry.get("tiny-sd35")).pipe, SpeedOptions(fuse_qkv=True))


@pytest.mark.parametrize("model", ["tiny-sd35", "sd35-medium"])
def test_the_benchmark_refuses_a_speed_option_as_the_generate_job_does(sd35_type, tmp_path, capsys, model):
    """jobs/benchmark.py --fuse-qkv on an SD 3.5-type model: exit 2 with the generate job's line, before any
    model is loaded or built (sd35-medium's random 2.5B architecture is checked against its config, not built)."""
    from jobs import benchmark as bench_job

    code = bench_job.main(["--model", "tiny-flux", "--model", model, "--models", str(sd35_type), "--fuse-qkv",
                           "--paths", "plain,actor", "--rows", "2", "--steps", "2", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --fuse-qkv: model {model!r} (SD 3.x) cannot use it:") and "q/k norms" in err, err
    assert not (tmp_path / "b").exists()
