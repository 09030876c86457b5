"""One diffusers pipeline call for rows that share a configuration.

The pipeline's own `__call__` runs the denoising loop (text encoding, latents, guidance,
scheduler steps, decode) for every pipeline family the registry loads, so its pixels are
the reference the other paths are tested against. Each row brings its own prompt,
negative prompt and seeded generator, so its image does not depend on its batch
neighbours. The memory probe for `--batch-size auto` lives here too: it measures this call.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from pipelines.contract import Row
from pipelines.generation.deepcache import deep_cache
from pipelines.generation.results import RowResult, image_result, prompts_truncated, to_pixels
from pipelines.generation.retry import sync
from pipelines.registry.families import FLUX, max_sequence_length, pipeline_name
from pipelines.registry.loading import LoadedModel
from pipelines.registry.schedulers import make_scheduler
from pipelines.seeding import row_generators


def run_batch(model: LoadedModel, rows: list[Row]) -> list[RowResult]:
    """One diffusers call for rows that share a configuration (`Row.config()`)."""
    first = rows[0]
    pipe = model.pipe
    seeds = [int(r.seed) for r in rows]
    pipe.scheduler = make_scheduler(first.scheduler, model.scheduler_config, model.spec.family, seeds=seeds)
    prompts = [r.prompt for r in rows]
    negatives = [r.negative_prompt or "" for r in rows]
    kwargs = dict(
        prompt=prompts,
        num_inference_steps=int(first.steps),
        guidance_scale=float(first.guidance),
        height=int(first.height),
        width=int(first.width),
        generator=row_generators(seeds),
        output_type="pt",  # stays on the device: to_pixels converts there
        **guidance_kwargs(model, first.guidance, first.true_cfg_scale, negatives),
    )
    text_length = max_sequence_length(model.spec)
    if text_length is not None:
        kwargs["max_sequence_length"] = text_length
    truncated = prompts_truncated(pipe, prompts, model.spec.max_prompt_tokens, text_length)
    if "negative_prompt" in kwargs:  # read by the pipeline, so cut like the prompt
        cut = prompts_truncated(pipe, negatives, model.spec.max_prompt_tokens, text_length)
        truncated = [a or b for a, b in zip(truncated, cut)]
    sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), feature_reuse(pipe, int(first.cache_interval)):
        if first.denoising_end < 1:
            pixels, finite = to_pixels(refine(model, first, kwargs, seeds))
        else:
            pixels, finite = to_pixels(pipe(**kwargs).images)
    per_image = (time.perf_counter() - t0) / len(rows)  # to_pixels ends with a copy to the host: synced
    return [image_result(row, px, ok, per_image, len(rows), trunc)
            for row, px, ok, trunc in zip(rows, pixels, finite, truncated)]


def refine(model: LoadedModel, first: Row, kwargs: dict, seeds: list[int]) -> torch.Tensor:
    """SDXL's ensemble of experts, as diffusers documents it: the base denoises until
    `denoising_end` and hands over its latents (output_type="latent"), the refiner
    (an img2img pipeline, the row's scheduler built from its own config) denoises the rest
    from `denoising_start` = the same fraction, with the same prompts and guidance."""
    refiner = model.extras["refiner"]
    latents = model.pipe(**{**kwargs, "output_type": "latent"}, denoising_end=float(first.denoising_end)).images
    refiner.pipe.scheduler = make_scheduler(first.scheduler, refiner.scheduler_config, refiner.spec.family, seeds=seeds)
    stage = {k: kwargs[k] for k in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale") if k in kwargs}
    return refiner.pipe(**stage, image=latents, denoising_start=float(first.denoising_end),
                        generator=row_generators(seeds), output_type="pt").images


def guidance_kwargs(model: LoadedModel, guidance: float, true_cfg_scale: float, negatives: list[str]) -> dict:
    """What the family's pipeline takes besides `guidance_scale` (pipelines.registry.families):
    FLUX's true CFG (`true_cfg_scale` with the negative prompts, empty ones included) when
    asked for; the negative prompts of a CFG pipeline when it guides (guidance > 1: below, the
    pipeline does not read them). A negative prompt is passed exactly when it is read."""
    if pipeline_name(model.spec) == FLUX:
        return dict(true_cfg_scale=float(true_cfg_scale), negative_prompt=negatives) if true_cfg_scale > 1 else {}
    return dict(negative_prompt=negatives) if guidance > 1 else {}


def feature_reuse(pipe, cache_interval: int):
    """DeepCache feature reuse for one pipeline call, touched only when asked for
    (cache_interval > 1): a transformer pipeline (SD3, FLUX) has no UNet to hook."""
    if cache_interval <= 1:
        return nullcontext()
    unet = getattr(pipe, "unet", None)
    if unet is None:
        denoiser = type(getattr(pipe, "transformer", None)).__name__
        raise ValueError(f"cache_interval {cache_interval} (feature reuse) needs a UNet pipeline; "
                         f"{type(pipe).__name__} denoises with a {denoiser}")
    return deep_cache(unet, cache_interval)


def probe_row(spec, height: int, width: int, seed: int = 0) -> Row:
    """A throwaway row for warm-up and memory probes: 2 steps of the model's scheduler, with the
    family's most expensive guidance, so `--batch-size auto` fits the rows that cost most: CFG
    (the denoiser's batch doubled) for SD 1.x/2.x, SDXL and SD3; for FLUX (where `guidance` is
    the distilled scale, or ignored) the model's guidance and true CFG (a second forward per step,
    negative embeddings held). A row validation would accept for the model."""
    flux = pipeline_name(spec) == FLUX
    return Row.of(dict(sample_id=f"probe-{seed}", prompt="probe", negative_prompt="", seed=seed, model=spec.name,
                       scheduler=spec.scheduler, steps=2, guidance=spec.guidance if flux else max(spec.guidance, 2.0),
                       true_cfg_scale=2.0 if flux else 1.0, height=height,
                       width=width))  # the columns with a constant default (cache_interval, quant) at it


def measure_peaks(model: LoadedModel, height: int, width: int) -> tuple[int, int, int]:
    """(overhead, per_row, available) bytes on the model's CUDA device, from the peaks of
    probe calls of one and two rows: peak(n) ~ overhead + n * per_row."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    peaks = []
    for n in (1, 2):
        torch.cuda.reset_peak_memory_stats()
        run_batch(model, [probe_row(model.spec, height, width, seed=i) for i in range(n)])
        peaks.append(torch.cuda.max_memory_allocated() - base)
    per_row = peaks[1] - peaks[0]
    overhead = max(0, peaks[0] - per_row)
    free, _ = torch.cuda.mem_get_info()
    available = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # torch's cache is ours too
    return overhead, per_row, available
