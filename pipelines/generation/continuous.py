"""Continuous batching: rows of different scheduler, steps and guidance share UNet calls.

`pipelines.generation.grouped.generate` runs one diffusers call per configuration, so a sweep of 36
configurations x 4 prompts never fills a batch of 16, and a 10-step row waits for nobody
but also helps nobody. Here every row carries its own scheduler instance, timestep list,
guidance scale, latents and generator; each UNet call takes the current timestep of every
active row (the UNet accepts one timestep per row) and, for rows with guidance > 1, their
unconditional twins. A row that has run all its timesteps is decoded and its slot goes to
the next waiting row, like continuous batching in LLM serving.

The loop is StableDiffusionPipeline.__call__ (diffusers 0.42) written per row: same
latent draw from the row's generator, same `scale_model_input` / `step` calls with that
generator, same CFG formula, same decode and postprocessing. Each row's pixels therefore
equal the grouped path's up to floating-point differences from batch composition
(tested: <= 1/255 on CPU float32). Models outside that family (SDXL's added conditioning,
flow-matching transformers, LCM's guidance embedding) keep the grouped path.

Text embeddings are cached per string (prompt or negative prompt) on the device, since a
sweep repeats each prompt in every configuration.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipelines.generation.batch_size import BatchSizes
from pipelines.generation.grouped import RowResult, _free_memory, _sync, image_result, prompts_truncated, to_pixels
from pipelines.registry.models import LoadedModel
from pipelines.registry.schedulers import make_scheduler
from pipelines.seeding import row_generators


def supports_continuous(model: LoadedModel) -> bool:
    """Whether the model's pipeline is the plain Stable Diffusion loop this module re-implements."""
    pipe = model.pipe
    return (type(pipe).__name__ == "StableDiffusionPipeline" and hasattr(pipe, "unet")
            and pipe.unet.config.get("time_cond_proj_dim") is None
            and pipe.unet.config.get("addition_embed_type") is None)


class TextCache:
    """Text-encoder states per string, least recently used evicted first."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, text: str) -> bool:
        return text in self._states

    def get(self, pipe, texts: list[str], device) -> list[torch.Tensor]:
        """(1, tokens, dim) states for each text; the missing ones are encoded in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._states))
        if missing:
            states, _ = pipe.encode_prompt(missing, device, 1, False)
            for text, state in zip(missing, states):
                self._states[text] = state[None]
        out = []
        for text in texts:
            self._states.move_to_end(text)
            out.append(self._states[text])
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)
        return out


@dataclass
class _Row:
    """One image in flight: its scheduler's state, its latents and its share of the clock."""

    index: int  # position in the caller's rows
    row: dict
    scheduler: object
    timesteps: list
    guidance: float
    generator: torch.Generator
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None  # None: no classifier-free guidance (guidance <= 1)
    step_kwargs: dict
    done: int = 0
    units: float = 0.0  # UNet rows used since the last clock read
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.done == len(self.timesteps)


@dataclass
class ContinuousStats:
    """What a run of the loop did, for the benchmark and the logs."""

    unet_calls: int = 0
    unet_rows: int = 0  # sum of UNet batch sizes (CFG rows count twice)
    max_active: int = 0
    decodes: int = 0
    text_cache_hits: int = 0
    text_cache_misses: int = 0
    extra: dict = field(default_factory=dict)


def generate_continuous(model: LoadedModel, rows: list[dict], max_batch_size: int = 8,
                        text_cache: TextCache | None = None, stats: ContinuousStats | None = None) -> list[RowResult]:
    """Results in the order of `rows`. Rows must share height and width (the caller groups
    by size); `max_batch_size` bounds the active rows, so a UNet call sees at most twice
    that many latents (with CFG)."""
    sizes = {(int(r["height"]), int(r["width"])) for r in rows}
    if len(sizes) > 1:
        raise ValueError(f"generate_continuous needs rows of one size, got {sorted(sizes)}")
    if not rows:
        return []
    pipe, device = model.pipe, torch.device(model.device)
    text_cache = text_cache if text_cache is not None else TextCache()
    stats = stats if stats is not None else ContinuousStats()
    truncated = prompts_truncated(pipe, [r["prompt"] for r in rows], model.spec.max_prompt_tokens)
    # Longest rows first: they start together and short rows fill the slots they free.
    waiting = deque(sorted(range(len(rows)), key=lambda i: -int(rows[i]["steps"])))
    active: list[_Row] = []
    results: dict[int, RowResult] = {}
    _sync(model.device)
    clock = time.perf_counter()

    def read_clock():
        """Split the wall time since the last read over active rows by their UNet rows."""
        nonlocal clock
        _sync(model.device)
        now = time.perf_counter()
        total = sum(r.units for r in active)
        for r in active:
            r.seconds += (now - clock) * (r.units / total if total else 1 / len(active))
            r.units = 0.0
        clock = now

    with torch.inference_mode():
        while waiting or active:
            starting = []
            while waiting and len(active) + len(starting) < max_batch_size:
                starting.append(waiting.popleft())
            if starting:
                active += _start(model, [(i, rows[i]) for i in starting], text_cache, device, stats)
            stats.max_active = max(stats.max_active, len(active))
            _denoise_step(pipe, active, stats)
            if any(r.finished for r in active):
                read_clock()
                finished = [r for r in active if r.finished]
                active = [r for r in active if not r.finished]
                t0 = time.perf_counter()
                pixels, finite = _decode(pipe, finished)  # ends with a copy to the host: synced
                share = (time.perf_counter() - t0) / len(finished)
                clock = time.perf_counter()
                stats.decodes += 1
                for r, px, ok in zip(finished, pixels, finite):
                    r.seconds += share
                    results[r.index] = image_result(r.row, px, ok, r.seconds, max_batch_size, truncated[r.index])
    return [results[i] for i in range(len(rows))]


def _start(model: LoadedModel, indexed_rows, text_cache: TextCache, device, stats) -> list[_Row]:
    """Scheduler, timesteps, first latents and text states for rows joining the batch."""
    pipe = model.pipe
    texts = []
    for _, row in indexed_rows:
        texts += [row["prompt"], row.get("negative_prompt") or ""]
    hits = sum(t in text_cache for t in set(texts))
    states = text_cache.get(pipe, texts, device)
    stats.text_cache_hits += hits
    stats.text_cache_misses += len(set(texts)) - hits
    height, width = int(indexed_rows[0][1]["height"]), int(indexed_rows[0][1]["width"])
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    out = []
    for k, (index, row) in enumerate(indexed_rows):
        seed = int(row["seed"])
        scheduler = make_scheduler(row["scheduler"], model.scheduler_config, model.spec.family, seeds=[seed])
        scheduler.set_timesteps(int(row["steps"]), device=device)
        generator = row_generators([seed])[0]
        cond = states[2 * k]
        latents = randn_tensor(shape, generator=generator, device=device, dtype=cond.dtype) * scheduler.init_noise_sigma
        guidance = float(row["guidance"])
        out.append(_Row(index, row, scheduler, list(scheduler.timesteps), guidance, generator, latents, cond,
                        states[2 * k + 1] if guidance > 1 else None, _step_kwargs(scheduler, generator)))
    return out


def _step_kwargs(scheduler, generator) -> dict:
    """What StableDiffusionPipeline.prepare_extra_step_kwargs passes (eta 0, the generator)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _denoise_step(pipe, active: list[_Row], stats: ContinuousStats) -> None:
    """One UNet call over every active row's current timestep, then each row's scheduler step."""
    guided = [r for r in active if r.uncond is not None]
    inputs, timesteps = [], []
    for r in active + guided:  # conditional rows, then the unconditional twins of guided rows
        t = r.timesteps[r.done]
        inputs.append(r.scheduler.scale_model_input(r.latents, t))
        timesteps.append(t)
    states = [r.cond for r in active] + [r.uncond for r in guided]
    t = torch.stack([torch.as_tensor(x, device=inputs[0].device).float() for x in timesteps])
    noise = pipe.unet(torch.cat(inputs), t, encoder_hidden_states=torch.cat(states), return_dict=False)[0]
    stats.unet_calls += 1
    stats.unet_rows += len(inputs)
    uncond_of = {id(r): noise[len(active) + k : len(active) + k + 1] for k, r in enumerate(guided)}
    for k, r in enumerate(active):
        pred = noise[k : k + 1]
        if r.uncond is not None:
            u = uncond_of[id(r)]
            pred = u + r.guidance * (pred - u)
        r.latents = r.scheduler.step(pred, r.timesteps[r.done], r.latents, **r.step_kwargs, return_dict=False)[0]
        r.done += 1
        r.units += 2 if r.uncond is not None else 1


def _decode(pipe, finished: list[_Row]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels and finiteness of the finished rows, as the grouped path makes them."""
    latents = torch.cat([r.latents for r in finished])
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return to_pixels(pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(finished)))


def generate_mixed(model: LoadedModel, rows: list[dict], batch_sizes: BatchSizes | int = 8,
                   text_cache: TextCache | None = None, stats: ContinuousStats | None = None) -> list[RowResult]:
    """Continuous batching per image size (with that size's batch size as the slot count),
    falling back to the grouped path where it cannot run: unsupported pipelines, and any
    failure (out of memory, a row that raises), which the grouped path isolates row by row
    and halves batches for."""
    from pipelines.generation.grouped import generate

    sizes = batch_sizes if isinstance(batch_sizes, BatchSizes) else BatchSizes(model, batch_sizes)
    if not supports_continuous(model):
        return generate(model, rows, sizes)
    results: dict[int, RowResult] = {}
    by_size: dict[tuple, list[int]] = {}
    grouped = []  # feature reuse (cache_interval > 1) caches per diffusers call: grouped path
    for i, r in enumerate(rows):
        if r.get("cache_interval", 1) > 1:
            grouped.append(i)
        else:
            by_size.setdefault((int(r["height"]), int(r["width"])), []).append(i)
    if grouped:
        results.update(zip(grouped, generate(model, [rows[i] for i in grouped], sizes)))
    for (height, width), indices in by_size.items():
        part = [rows[i] for i in indices]
        slots = sizes.get(height, width)
        try:
            out = generate_continuous(model, part, slots, text_cache, stats)
        except torch.OutOfMemoryError:
            _free_memory()
            sizes.lower(height, width, slots)
            out = generate(model, part, sizes)
        except Exception:
            _free_memory()
            out = generate(model, part, sizes)
        results.update(zip(indices, out))
    return [results[i] for i in range(len(rows))]
