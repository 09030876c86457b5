"""A LoRA for the embedded model whose effect the domain's judge can measure exactly.

The adapter teaches the UNet one rule: whatever background the caption names, paint it
black (`black_background`). The training images are the domain's renders of the caption
with the background replaced, so the shapes (colour, kind, size, place) stay what the
caption says; `evals.shapes.attribute_scores` then reads back both the targeted attribute
(background) and the ones that must not move. Only low-rank updates of the UNet's
attention projections train (peft `LoraConfig`), the base weights stay frozen, so at
`lora_scale` 0 the pipeline is the base model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from evals import shapes as domain
from pipelines.embedded import LORA_DIR
from pipelines.embedded.training.clip import tokenize
from pipelines.embedded.training.data import images_to_model_input
from pipelines.embedded.training.settings import warmup_cosine
from pipelines.embedded.training.unet import build_scheduler, min_snr_loss

WEIGHT_NAME = "black_background.safetensors"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection of the UNet


@dataclass(frozen=True)
class LoraSettings:
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    rank: int = 4
    dataset: int = 2048  # scenes rendered and VAE-encoded once
    caption_dropout: float = 0.1  # the unconditional branch learns the rule too, so guidance keeps it
    snr_gamma: float = 5.0


def blacken(scene: domain.Scene) -> domain.Scene:
    """The scene the adapter should draw for `scene`'s caption: the same shapes on black."""
    return dataclasses.replace(scene, background="black")


@torch.no_grad()
def encode_dataset(pipe, s: LoraSettings, seed: int, device):
    """(text states of each caption, latents of its black-background render); row 0 of the
    text states is "" (the unconditional prompt)."""
    scenes = domain.sample_scenes(s.dataset, seed=seed)
    captions = [domain.caption(sc) for sc in scenes]
    images = domain.render([blacken(sc) for sc in scenes], seed=seed + 1)
    vae = pipe.vae
    latents = torch.cat([vae.encode(images_to_model_input(images[i:i + 256], device)).latent_dist.mean
                         for i in range(0, len(images), 256)]) * vae.config.scaling_factor
    texts = [""] + captions
    states = torch.cat([pipe.text_encoder(tokenize(pipe.tokenizer, texts[i:i + 512], device))[0]
                        for i in range(0, len(texts), 512)])
    return states, latents


def train_lora(pipe, s: LoraSettings = LoraSettings(), seed: int = 0, device: str = "cpu") -> dict:
    """Train the adapter into `pipe.unet` (as peft adapter "default"); returns its weights in
    diffusers' LoRA format (what `save_lora_weights` writes and `load_lora_weights` reads)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    states, latents = encode_dataset(pipe, s, seed, device)
    unet = pipe.unet.to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.steps, warmup=min(50, s.steps // 4 + 1)))
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    unet.train()
    for step in range(s.steps):
        pick = torch.randint(0, len(latents), (s.batch,), generator=gen, device=device)
        keep = torch.rand(s.batch, generator=gen, device=device) >= s.caption_dropout
        cond = states[torch.where(keep, pick + 1, torch.zeros_like(pick))]
        noise = torch.randn(latents[pick].shape, generator=gen, device=device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.batch,), generator=gen, device=device)
        pred = unet(noise_scheduler.add_noise(latents[pick], noise, t), t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, noise, snr[t.cpu()].to(device), s.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == s.steps - 1:
            print(f"lora step {step}: loss {loss.item():.4f}", flush=True)
    unet.eval()
    return get_peft_model_state_dict(unet)


def save_lora(pipe_cls, weights: dict, out_dir: Path = LORA_DIR, weight_name: str = WEIGHT_NAME) -> Path:
    """Write the adapter as one safetensors file in diffusers' LoRA format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(str(out_dir), unet_lora_layers=weights, weight_name=weight_name,
                               safe_serialization=True)
    return out_dir / weight_name

