"""The embedded model's training recipe: every hyperparameter, its presets, and the
learning-rate schedule all three stages share."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Settings:
    clip_steps: int = 250
    clip_batch: int = 64
    clip_lr: float = 1e-3
    vae_steps: int = 300
    vae_batch: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_latent_noise: float = 0.1
    vae_shape_weight: float = 5.0
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_dataset: int = 16000  # rendered and VAE-encoded once, then sampled per step
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off
    ema_decay: float = 0.995
    checkpoint_every: int = 250


PRESETS = {
    "smoke": Settings(clip_steps=10, clip_batch=16, vae_steps=10, vae_batch=8, unet_steps=10, unet_batch=8,
                      unet_dataset=64),
    "default": Settings(),
    "large": Settings(clip_steps=4000, clip_batch=128, vae_steps=3000, vae_batch=32, unet_steps=30000,
                      unet_batch=128, unet_dataset=200000),
}


def number_fields() -> dict[str, type]:
    """The Settings fields a command-line flag can override (the numbers), with their type."""
    types = {"int": int, "float": float}
    return {f.name: types[f.type] for f in fields(Settings) if f.type in types}


def with_overrides(preset: str, overrides: dict) -> Settings:
    """The preset's settings with the given fields changed (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def warmup_cosine(total: int, warmup: int = 100):
    """LambdaLR factor: linear warmup over `warmup` steps, then cosine decay to 0.1 at `total`."""

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
