"""The denoising loop of a Stable Diffusion pipeline, one row at a time, from the pipeline's own parts.

Continuous batching (`pipelines.generation.continuous`) runs rows of different
schedulers, step counts and guidance scales through shared UNet calls, so it cannot use
the pipeline's `__call__`, which runs one configuration. It uses the pieces that
`StableDiffusionPipeline.__call__` (diffusers 0.42) is made of instead: the pipeline's
`encode_prompt` (in `TextCache`), `prepare_latents` and `prepare_extra_step_kwargs` with
the row's scheduler, the scheduler's own `scale_model_input` and `step` with the row's
generator, the pipeline's guidance formula, and its VAE decode and postprocessing. Each
row's pixels therefore equal the pipeline call's up to floating-point differences from
batch composition (tested: <= 1/255 on CPU float32).

Each row owns a scheduler (its timesteps and the rule that steps along them) and a
generator; `denoise_step` is one UNet call over every row's current timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.contract import Row
from pipelines.generation.results import to_pixels


@dataclass
class RowState:
    """One image in flight: its scheduler's state, its latents and its share of the clock."""

    index: int  # position in the caller's rows
    row: Row
    scheduler: object
    timesteps: list
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


def start_row(pipe, index: int, row: Row, scheduler, generator: torch.Generator, cond: torch.Tensor,
              uncond: torch.Tensor, device) -> RowState:
    """A row's timesteps, first latents and step arguments, as the pipeline makes them.
    `pipe.prepare_latents` and `pipe.prepare_extra_step_kwargs` read the pipeline's
    scheduler, so the row's scheduler is made the pipeline's first (the diffusers way to
    choose a sampler; the grouped path does the same for every call)."""
    scheduler.set_timesteps(int(row.steps), device=device)
    pipe.scheduler = scheduler
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, row.height, row.width, cond.dtype, device,
                                   generator)
    step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)  # eta 0: the pipeline's default
    return RowState(index, row, scheduler, list(scheduler.timesteps), generator, latents, cond,
                    uncond if row.guidance > 1 else None, step_kwargs)


def guide(noise_cond: torch.Tensor, noise_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, the pipeline's formula."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def denoise_step(unet, active: list[RowState]) -> int:
    """One UNet call over every active row's current timestep (conditional rows, then the
    unconditional twins of guided rows; the UNet takes one timestep per row), then each
    row's scheduler step. Returns the UNet batch size."""
    guided = [r for r in active if r.uncond is not None]
    inputs, timesteps = [], []
    for r in active + guided:
        t = r.timesteps[r.done]
        inputs.append(r.scheduler.scale_model_input(r.latents, t))
        timesteps.append(t)
    states = [r.cond for r in active] + [r.uncond for r in guided]
    t = torch.stack([torch.as_tensor(x, device=inputs[0].device).float() for x in timesteps])
    noise = unet(torch.cat(inputs), t, encoder_hidden_states=torch.cat(states), return_dict=False)[0]
    uncond_of = {id(r): noise[len(active) + k : len(active) + k + 1] for k, r in enumerate(guided)}
    for k, r in enumerate(active):
        pred = noise[k : k + 1]
        if r.uncond is not None:
            pred = guide(pred, uncond_of[id(r)], r.row.guidance)
        r.latents = r.scheduler.step(pred, r.timesteps[r.done], r.latents, **r.step_kwargs, return_dict=False)[0]
        r.done += 1
        r.units += 2 if r.uncond is not None else 1
    return len(inputs)


def decode(pipe, finished: list[RowState]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels and finiteness of the finished rows: the pipeline's VAE decode and
    postprocessing, then `to_pixels`, as for a pipeline call with output_type="pt"."""
    latents = torch.cat([r.latents for r in finished])
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return to_pixels(pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(finished)))
