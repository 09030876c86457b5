"""The three training stages in order, and what each reads from and writes to the output directory.

Each stage depends on the one before: the UNet is conditioned on the frozen CLIP text
tower and denoises the frozen VAE's latents. A stage that is not run is loaded from
`<out>/clip` or `<out>/model`, so stages can run in separate processes (`--stages`).
Progress lines go to stdout with the seconds since the start.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from evals import shapes as domain
from pipelines.embedded.training.assemble import save, save_pipeline
from pipelines.embedded.training.clip import TOKEN_LENGTH, build_clip, build_processor, frozen_text_tower, train_clip
from pipelines.embedded.training.settings import Settings
from pipelines.embedded.training.unet import build_unet, train_unet
from pipelines.embedded.training.vae import build_vae, train_vae
from pipelines.registry.tokenizer import write_clip_tokenizer

STAGES = ("clip", "vae", "unet")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(out: Path, settings: Settings, stages: set[str], seed: int, device: torch.device,
          resume_vae: bool = False, vae_decoder_only: bool = False, resume_unet: bool = False) -> Path:
    """Train `stages` (a subset of STAGES) into `out`; returns `out`. Deterministic in `seed`."""
    if not set(stages) <= set(STAGES):
        raise ValueError(f"stages {sorted(stages)}: allowed stages are {', '.join(STAGES)}")
    torch.manual_seed(seed)
    t0 = time.time()
    clip_dir, model_dir = out / "clip", out / "model"
    if "clip" in stages:
        clip_stage(clip_dir, settings, seed, device)
        print(f"clip done at {time.time() - t0:.0f}s", flush=True)
    if "vae" in stages:
        vae = vae_stage(model_dir, settings, seed, device, resume_vae, vae_decoder_only, t0)
        print(f"vae done at {time.time() - t0:.0f}s (scaling_factor={vae.config.scaling_factor:.4f})", flush=True)
    if "unet" not in stages:
        print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)
        return out
    if "vae" not in stages:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(model_dir / "vae").to(device).eval()
    unet_stage(vae, clip_dir, model_dir, settings, seed, device, resume_unet, t0)
    print(f"unet done at {time.time() - t0:.0f}s", flush=True)
    print(f"wrote {model_dir} and {clip_dir} in {time.time() - t0:.0f}s", flush=True)
    return out


def clip_stage(clip_dir: Path, settings: Settings, seed: int, device) -> None:
    """Write the tokenizer (one token per grammar word), train the CLIP, save it with its processor."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(clip_dir, domain.vocabulary(), model_max_length=TOKEN_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    clip = train_clip(build_clip(tokenizer), tokenizer, settings, seed, device)
    save(clip, clip_dir)
    build_processor(tokenizer).save_pretrained(clip_dir)


def vae_stage(model_dir: Path, settings: Settings, seed: int, device, resume: bool, decoder_only: bool, t0: float):
    """Train a new VAE, or (`resume`) the one in `model_dir/vae`; save it there. Only a
    decoder-only run writes checkpoints: with the encoder fixed, the UNet's latents stay valid."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae") if resume else build_vae()

    def checkpoint(vae, step):
        save(vae, model_dir / "vae")
        print(f"checkpoint at vae step {step}, {time.time() - t0:.0f}s", flush=True)

    vae = train_vae(vae, settings, seed, device, decoder_only=decoder_only,
                    checkpoint=checkpoint if decoder_only else None)
    save(vae, model_dir / "vae")
    return vae


def unet_stage(vae, clip_dir: Path, model_dir: Path, settings: Settings, seed: int, device, resume: bool,
               t0: float) -> None:
    """Train a new UNet, or (`resume`) the one in `model_dir/unet`, on the frozen VAE and
    text tower; save the whole pipeline, also every `checkpoint_every` steps (EMA weights),
    so a run cut short still leaves a usable model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    vae.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text_encoder = frozen_text_tower(clip_dir, device)
    unet = build_unet(settings.unet_channels)  # built even when resuming: the seeded RNG stream stays the same
    if resume:
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    spare = build_unet(settings.unet_channels)

    def checkpoint(ema_state, step):
        spare.load_state_dict(ema_state)
        save_pipeline(model_dir, vae, text_encoder, tokenizer, spare)
        print(f"checkpoint at unet step {step}, {time.time() - t0:.0f}s", flush=True)

    unet = train_unet(unet, vae, text_encoder, tokenizer, settings, seed, device, checkpoint)
    save_pipeline(model_dir, vae, text_encoder, tokenizer, unet)
