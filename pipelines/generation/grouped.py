"""generate(model, rows) -> one result per row: pixels, status, timing.

Rows are grouped by configuration (scheduler, steps, guidance, size), because one
diffusers call runs one configuration; each row brings its own prompt, negative prompt
and seeded generator, so its image does not depend on its batch neighbours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from pipelines.generation.batch_size import BatchSizes
from pipelines.generation.deepcache import deep_cache
from pipelines.registry.models import LoadedModel
from pipelines.registry.schedulers import make_scheduler
from pipelines.contract import CONFIG_KEY, LATER_PIXEL_FIELDS
from pipelines.seeding import row_generators


@dataclass
class RowResult:
    sample_id: str
    pixels: np.ndarray | None  # uint8 [H, W, 3], None on error
    status: str  # "ok" | "error"
    error: str | None
    gen_seconds: float  # this image's share of its batch's wall time
    batch_size: int
    prompt_truncated: bool


def config_of(row: dict) -> tuple:
    return tuple(row[k] if k in row else LATER_PIXEL_FIELDS[k] for k in CONFIG_KEY)


def generate(model: LoadedModel, rows: list[dict], batch_sizes: BatchSizes | int = 8) -> list[RowResult]:
    """Results in the order of `rows`. Non-finite images and rows that fail even alone
    (e.g. out of memory at batch size 1) become status="error" results, not exceptions.

    `batch_sizes` is a fixed batch size or the model's BatchSizes, which gives one per
    image size and is lowered by an out-of-memory error for the batches that follow."""
    sizes = batch_sizes if isinstance(batch_sizes, BatchSizes) else BatchSizes(model, batch_sizes)
    order = sorted(range(len(rows)), key=lambda i: config_of(rows[i]))
    results: dict[int, RowResult] = {}
    for _, group in groupby(order, key=lambda i: config_of(rows[i])):
        pending = list(group)
        while pending:
            n = sizes.get(rows[pending[0]]["height"], rows[pending[0]]["width"])
            chunk, pending = pending[:n], pending[n:]
            for i, res in zip(chunk, _run_with_split(model, [rows[i] for i in chunk], sizes)):
                results[i] = res
    return [results[i] for i in range(len(rows))]


def _run_with_split(model: LoadedModel, rows: list[dict], sizes: BatchSizes) -> list[RowResult]:
    """Run a batch; on out-of-memory halve the batch size for this image size (down to single
    rows) and run the rows again in batches of the new size."""
    try:
        return run_batch(model, rows)
    except torch.OutOfMemoryError as e:
        _free_memory()
        if len(rows) == 1:
            return [_error(rows[0], f"out of memory at batch size 1: {str(e).splitlines()[0]}")]
        height, width = rows[0]["height"], rows[0]["width"]
        sizes.lower(height, width, len(rows))
        out: list[RowResult] = []
        while len(out) < len(rows):  # re-read the limit: a failing first part lowers it for the rest
            part = rows[len(out) : len(out) + sizes.get(height, width)]
            out += _run_with_split(model, part, sizes)
        return out
    except Exception as e:  # isolate the row that fails, keep the others
        if len(rows) == 1:
            return [_error(rows[0], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
        return [r for row in rows for r in _run_with_split(model, [row], sizes)]


def run_batch(model: LoadedModel, rows: list[dict]) -> list[RowResult]:
    """One diffusers call for rows that share a configuration."""
    height, width, scheduler, steps, guidance, cache_interval = config_of(rows[0])
    pipe = model.pipe
    seeds = [int(r["seed"]) for r in rows]
    pipe.scheduler = make_scheduler(scheduler, model.scheduler_config, model.spec.family, seeds=seeds)
    prompts = [r["prompt"] for r in rows]
    negatives = [r.get("negative_prompt") or "" for r in rows]
    truncated = prompts_truncated(pipe, prompts, model.spec.max_prompt_tokens)
    kwargs = dict(
        prompt=prompts,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        height=int(height),
        width=int(width),
        generator=row_generators(seeds),
        output_type="pt",  # stays on the device: to_pixels converts there
    )
    if guidance > 1 or any(negatives):
        kwargs["negative_prompt"] = negatives
    _sync(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), deep_cache(pipe.unet, int(cache_interval)):
        pixels, finite = to_pixels(pipe(**kwargs).images)
    per_image = (time.perf_counter() - t0) / len(rows)  # to_pixels ends with a copy to the host: synced
    return [image_result(row, px, ok, per_image, len(rows), trunc)
            for row, px, ok, trunc in zip(rows, pixels, finite, truncated)]


def to_pixels(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images [B, 3, H, W] in [0, 1] (diffusers' output_type="pt") -> uint8 pixels
    [B, H, W, 3] and whether each image was finite. Clip, x255 and round run in float32 on
    the device, the same operations as a numpy conversion of output_type="np" (so the same
    pixels), but only the uint8 result, a quarter of the bytes, crosses to the host, and the
    host does no per-pixel work while the GPU waits for the next batch."""
    images = images.float()
    finite = torch.isfinite(images).flatten(1).all(1)
    pixels = images.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.cpu().numpy(), finite.cpu().numpy()


def image_result(row: dict, pixels: np.ndarray, finite: bool, seconds: float, batch_size: int,
                 truncated: bool) -> RowResult:
    """An ok result, or an error result if the decoded image had NaN/inf pixels."""
    if not finite:
        return _error(row, "non-finite pixels in the decoded image (NaN/inf)", seconds, batch_size, truncated)
    return RowResult(row["sample_id"], pixels, "ok", None, seconds, batch_size, truncated)


def warm_up(model: LoadedModel) -> None:
    """One throwaway 2-step call at the model's default size, so that one-time costs (lazy
    initialisation, kernel selection, allocator growth) are not billed to the first batch's
    gen_seconds."""
    run_batch(model, [probe_row(model.spec, model.spec.height, model.spec.width)])


def probe_row(spec, height: int, width: int, seed: int = 0) -> dict:
    """A throwaway row for warm-up and memory probes: 2 steps of the model's scheduler, with CFG."""
    return {"sample_id": f"probe-{seed}", "prompt": "probe", "negative_prompt": "", "seed": seed,
            "scheduler": spec.scheduler, "steps": 2, "guidance": max(spec.guidance, 2.0), "height": height,
            "width": width, "cache_interval": 1}


def prompts_truncated(pipe, prompts: list[str], max_tokens: int) -> list[bool]:
    """Whether each prompt is longer than the text encoder reads (diffusers cuts it)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return [False] * len(prompts)
    limit = min(max_tokens, getattr(tokenizer, "model_max_length", max_tokens))
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
    return [n > limit for n in lengths]


def _error(row, message, seconds=0.0, batch_size=1, truncated=False) -> RowResult:
    return RowResult(row["sample_id"], None, "error", message, seconds, batch_size, truncated)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
