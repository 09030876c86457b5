"""The VAE: a small AutoencoderKL (64x64x3 <-> 16x16x4) trained to reconstruct renders."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evals import shapes as domain
from pipelines.embedded.training.data import batches, images_to_model_input
from pipelines.embedded.training.settings import Settings, warmup_cosine


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                         sample_size=domain.IMAGE_SIZE, mid_block_add_attention=False, force_upcast=False)


def shape_pixels(images_uint8: np.ndarray, device) -> torch.Tensor:
    """(N, 1, H, W) float mask of pixels that are not a background colour."""
    backgrounds = np.array(list(domain.BACKGROUNDS.values()), dtype=np.uint8)
    is_bg = (images_uint8[:, :, :, None, :] == backgrounds).all(-1).any(-1)
    return torch.from_numpy(~is_bg).to(device).float()[:, None]


def train_vae(vae, s: Settings, seed: int, device, decoder_only: bool = False, checkpoint=None):
    """Train the VAE on renders. `decoder_only` keeps the encoder (and so the latent space
    and scaling_factor a UNet was trained on) fixed and sharpens the decoder, as SD's
    fine-tuned decoders do; it can run while the UNet trains. Otherwise the latents'
    scaling_factor is measured afterwards."""
    vae.to(device).train()
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.vae_steps))
    data = batches(seed + 2, s.vae_batch)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    bar = tqdm(range(s.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        _, images = next(data)
        x = images_to_model_input(images, device)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(x).latent_dist
        # Decode the mean plus a little fixed-scale noise: sampling with the untrained
        # variance (std ~1 at init) drowns the signal, and the decoder then learns only the
        # average colour for hundreds of steps. The noise keeps the latent space smooth
        # enough for imperfect UNet outputs.
        z = posterior.mean + s.vae_latent_noise * torch.randn(posterior.mean.shape, generator=gen, device=device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        # Shapes cover a tenth of the pixels but carry most of the caption (their hue is
        # what a plain loss learns last), so their pixels weigh `vae_shape_weight` times more.
        weight = 1 + (s.vae_shape_weight - 1) * shape_pixels(images, device)
        loss = (weight * ((recon - x) ** 2 + (recon - x).abs())).mean() + s.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")
        if checkpoint is not None and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.vae_steps:
            checkpoint(vae, step + 1)
    vae.eval()
    if not decoder_only:
        set_scaling_factor(vae, seed, device)
    return vae


@torch.no_grad()
def set_scaling_factor(vae, seed: int, device) -> None:
    """Stable Diffusion's convention: scale latents to unit variance (measured on 256 renders)."""
    _, images = next(batches(seed + 3, 256))
    std = vae.encode(images_to_model_input(images, device)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
