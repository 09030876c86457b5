"""Continuous batching: rows of different scheduler, steps and guidance share UNet calls.

`pipelines.generation.grouped.generate` runs one diffusers call per configuration, so a sweep of 36
configurations x 4 prompts never fills a batch of 16, and a 10-step row waits for nobody
but also helps nobody. Here every row carries its own scheduler instance, timestep list,
guidance scale, latents and generator (`pipelines.generation.denoise`); each UNet call
takes the current timestep of every active row and, for rows with guidance > 1, their
unconditional twins. A row that has run all its timesteps is decoded and its slot goes to
the next waiting row, like continuous batching in LLM serving.

Each row's pixels equal the grouped path's up to floating-point differences from batch
composition (tested: <= 1/255 on CPU float32). Models outside the plain Stable Diffusion
family (SDXL's added conditioning, flow-matching transformers, LCM's guidance embedding)
keep the grouped path, and so do rows with feature reuse (`cache_interval > 1`), whose
cache belongs to one diffusers call.

Text embeddings are cached per string (prompt or negative prompt) on the device, since a
sweep repeats each prompt in every configuration.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from pipelines.contract import Row
from pipelines.generation.batch_size import BatchSizes
from pipelines.generation.denoise import RowState, decode, denoise_step, start_row
from pipelines.generation.grouped import as_rows, generate
from pipelines.generation.results import RowResult, image_result, prompts_truncated
from pipelines.generation.retry import run_with_split, sync
from pipelines.registry.loading import LoadedModel
from pipelines.registry.schedulers import make_scheduler
from pipelines.seeding import row_generators


def supports_continuous(model: LoadedModel) -> bool:
    """Whether the model's pipeline is the plain Stable Diffusion loop `denoise` is made of."""
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
class ContinuousStats:
    """What a run of the loop did, for the benchmark and the logs."""

    unet_calls: int = 0
    unet_rows: int = 0  # sum of UNet batch sizes (CFG rows count twice)
    max_active: int = 0
    decodes: int = 0
    text_cache_hits: int = 0
    text_cache_misses: int = 0
    extra: dict = field(default_factory=dict)


def generate_continuous(model: LoadedModel, rows: Sequence[Row | Mapping], max_batch_size: int = 8,
                        text_cache: TextCache | None = None, stats: ContinuousStats | None = None) -> list[RowResult]:
    """Results in the order of `rows`. Rows must share height and width (the caller groups
    by size); `max_batch_size` bounds the active rows, so a UNet call sees at most twice
    that many latents (with CFG)."""
    rows = as_rows(rows)
    sizes = {(r.height, r.width) for r in rows}
    if len(sizes) > 1:
        raise ValueError(f"generate_continuous needs rows of one size, got {sorted(sizes)}")
    if not rows:
        return []
    pipe = model.pipe
    text_cache = text_cache if text_cache is not None else TextCache()
    stats = stats if stats is not None else ContinuousStats()
    truncated = prompts_truncated(pipe, [r.prompt for r in rows], model.spec.max_prompt_tokens)
    negatives = prompts_truncated(pipe, [r.negative_prompt or "" for r in rows], model.spec.max_prompt_tokens)
    truncated = [t or (n and r.guidance > 1) for t, n, r in zip(truncated, negatives, rows)]  # read only with CFG
    # Longest rows first: they start together and short rows fill the slots they free.
    waiting = deque(sorted(range(len(rows)), key=lambda i: -rows[i].steps))
    active: list[RowState] = []
    results: dict[int, RowResult] = {}
    sync(model.device)
    clock = time.perf_counter()

    def read_clock():
        """Split the wall time since the last read over active rows by their UNet rows."""
        nonlocal clock
        sync(model.device)
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
                active += _start(model, [(i, rows[i]) for i in starting], text_cache, stats)
            stats.max_active = max(stats.max_active, len(active))
            stats.unet_rows += denoise_step(pipe.unet, active)
            stats.unet_calls += 1
            if any(r.finished for r in active):
                read_clock()
                finished = [r for r in active if r.finished]
                active = [r for r in active if not r.finished]
                t0 = time.perf_counter()
                pixels, finite = decode(pipe, finished)  # ends with a copy to the host: synced
                share = (time.perf_counter() - t0) / len(finished)
                clock = time.perf_counter()
                stats.decodes += 1
                for r, px, ok in zip(finished, pixels, finite):
                    r.seconds += share
                    results[r.index] = image_result(r.row, px, ok, r.seconds, max_batch_size, truncated[r.index])
    return [results[i] for i in range(len(rows))]


def _start(model: LoadedModel, indexed_rows: list[tuple[int, Row]], text_cache: TextCache,
           stats: ContinuousStats) -> list[RowState]:
    """Text states (one encoder call for the strings not cached), a fresh scheduler and a
    seeded generator for each row joining the batch."""
    pipe, device = model.pipe, torch.device(model.device)
    texts = [t for _, row in indexed_rows for t in (row.prompt, row.negative_prompt or "")]
    hits = sum(t in text_cache for t in set(texts))
    states = text_cache.get(pipe, texts, device)
    stats.text_cache_hits += hits
    stats.text_cache_misses += len(set(texts)) - hits
    out = []
    for k, (index, row) in enumerate(indexed_rows):
        scheduler = make_scheduler(row.scheduler, model.scheduler_config, model.spec.family, seeds=[row.seed])
        generator = row_generators([row.seed])[0]
        out.append(start_row(pipe, index, row, scheduler, generator, states[2 * k], states[2 * k + 1], device))
    return out


def generate_mixed(model: LoadedModel, rows: Sequence[Row | Mapping], batch_sizes: BatchSizes | int = 8,
                   text_cache: TextCache | None = None, stats: ContinuousStats | None = None) -> list[RowResult]:
    """Continuous batching per image size, with that size's batch size as the slot count;
    out-of-memory errors and failing rows are split and retried as in the grouped path
    (`pipelines.generation.retry`). Unsupported pipelines and rows with feature reuse take
    the grouped path."""
    rows = as_rows(rows)
    sizes = batch_sizes if isinstance(batch_sizes, BatchSizes) else BatchSizes(model, batch_sizes)
    if not supports_continuous(model):
        return generate(model, rows, sizes)
    results: dict[int, RowResult] = {}
    by_size: dict[tuple, list[int]] = {}
    grouped = [i for i, r in enumerate(rows) if r.cache_interval > 1]  # the cache is per diffusers call
    for i, r in enumerate(rows):
        if r.cache_interval == 1:
            by_size.setdefault((r.height, r.width), []).append(i)
    if grouped:
        results.update(zip(grouped, generate(model, [rows[i] for i in grouped], sizes)))
    for (height, width), indices in by_size.items():
        def run(part: list[Row]) -> list[RowResult]:
            return generate_continuous(model, part, sizes.get(height, width), text_cache, stats)

        results.update(zip(indices, run_with_split(run, [rows[i] for i in indices], sizes)))
    return [results[i] for i in range(len(rows))]
