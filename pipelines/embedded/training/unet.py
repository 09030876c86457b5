"""The UNet: a small UNet2DConditionModel denoising the frozen VAE's latents, conditioned
on the frozen CLIP text tower, trained the way every diffusers scheduler expects."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evals import shapes as domain
from pipelines.embedded.training.clip import TEXT_DIM, tokenize
from pipelines.embedded.training.data import all_captions, batches, images_to_model_input
from pipelines.embedded.training.settings import Settings, warmup_cosine


def build_unet(channels: tuple[int, ...]):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=domain.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=16,
    )


def build_scheduler():
    """The shipped pipeline's scheduler; its betas (SD's scaled-linear) are the noise schedule the UNet learns."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.no_grad()
def text_table(text_encoder, tokenizer, device) -> tuple[dict[str, int], torch.Tensor]:
    """Frozen text-tower states of every caption plus "" (the unconditional prompt)."""
    captions = [""] + all_captions()
    states = []
    for i in tqdm(range(0, len(captions), 512), desc="text states", mininterval=5):
        states.append(text_encoder(tokenize(tokenizer, captions[i : i + 512], device))[0])
    return {c: i for i, c in enumerate(captions)}, torch.cat(states)


@torch.no_grad()
def encode_dataset(vae, s: Settings, seed: int, device) -> tuple[list[str], torch.Tensor]:
    """Render and VAE-encode the UNet's training set once (the encoder would otherwise
    cost a third of every step on CPU); returns captions and scaled latent means (the
    VAE is trained to decode means, see train_vae)."""
    captions, means = [], []
    data = batches(seed + 4, 256)
    for _ in tqdm(range(math.ceil(s.unet_dataset / 256)), desc="encode", mininterval=5):
        caps, images = next(data)
        posterior = vae.encode(images_to_model_input(images, device)).latent_dist
        captions += caps
        means.append(posterior.mean * vae.config.scaling_factor)
    return captions, torch.cat(means)


def train_unet(unet, vae, text_encoder, tokenizer, s: Settings, seed: int, device, checkpoint=None):
    """Epsilon-prediction DDPM training (1000 steps, SD betas), which is what every
    diffusers scheduler expects; `caption_dropout` of captions become "" so classifier-free
    guidance has an unconditional model to push away from. The EMA weights are kept."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    index, states = text_table(text_encoder, tokenizer, device)
    captions, means = encode_dataset(vae, s, seed, device)
    caption_ids = torch.tensor([index[c] for c in captions], device=device)
    unet.to(device).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.unet_steps, warmup=200))
    gen = torch.Generator(device=device).manual_seed(seed + 5)
    bar = tqdm(range(s.unet_steps), desc="unet", mininterval=5)
    for step in bar:
        pick = torch.randint(0, len(captions), (s.unet_batch,), generator=gen, device=device)
        latents = means[pick]
        keep = torch.rand(s.unet_batch, generator=gen, device=device) >= s.caption_dropout
        cond = states[torch.where(keep, caption_ids[pick], torch.zeros_like(pick))]  # row 0 is ""
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.unet_batch,), generator=gen,
                          device=device)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = min_snr_loss(pred, noise, snr[t], s.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        update_ema(ema, unet, decay=min(s.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.unet_steps:
            checkpoint(ema, step + 1)
    unet.load_state_dict(ema)
    return unet.eval()


def min_snr_loss(pred, noise, snr, gamma: float) -> torch.Tensor:
    """Epsilon MSE per image, weighted min(SNR, gamma) / SNR (Min-SNR-gamma; gamma 0: plain MSE).
    Low-noise steps (high SNR) only polish detail; capping their weight spends the gradient
    on the noisy steps that decide colour and layout."""
    loss = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
    if gamma > 0:
        loss = loss * snr.clamp(max=gamma) / snr
    return loss.mean()


@torch.no_grad()
def update_ema(ema: dict, model, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
