"""Train the embedded default model from scratch: domain CLIP, VAE, UNet.

    python jobs/train_embedded.py --out pipelines/embedded [--device auto] [--seed 0] [--preset default]

Writes `<out>/clip` (CLIPModel + tokenizer + processor) and `<out>/model` (a
StableDiffusionPipeline whose text encoder is the domain CLIP's text tower). Every image is
rendered on the fly from seeded scene samples (evals/shapes.py), so the run
needs no data and no download. The three stages run in order because each depends on the
previous one: the UNet is conditioned on the frozen CLIP text tower and denoises the frozen
VAE's latents.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from evals import shapes as domain  # noqa: E402
from pipelines.registry.tokenizer import write_clip_tokenizer  # noqa: E402

TOKEN_LENGTH = 32  # longest caption is 18 tokens with BOS/EOS
TEXT_DIM = 128


@dataclass
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_pixels(images_uint8: np.ndarray, device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's and the CLIP processor's range)."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def lr_lambda(total: int, warmup: int = 100):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def batches(rng_seed: int, batch: int):
    """Endless (captions, uint8 images) batches, deterministic in rng_seed."""
    for i in itertools.count():
        scenes = domain.sample_scenes(batch, seed=rng_seed * 1_000_003 + i)
        yield [domain.caption(s) for s in scenes], domain.render(scenes, seed=rng_seed * 7_000_001 + i)


def all_captions() -> list[str]:
    """Every caption the grammar can produce (a few thousand)."""
    phrases = [domain.Shape(sh, c, sz) for sz in domain.SIZES for c in domain.SHAPE_COLOURS for sh in domain.SHAPES]
    scenes = [domain.Scene((p,), bg) for p in phrases for bg in domain.BACKGROUNDS]
    scenes += [domain.Scene((p, q), bg, rel) for p in phrases for q in phrases for rel in domain.RELATIONS
               for bg in domain.BACKGROUNDS]
    return [domain.caption(s) for s in scenes]


# ---------------------------------------------------------------- CLIP


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=TOKEN_LENGTH,
                         projection_dim=64, **ids),
        vision_config=dict(image_size=domain.IMAGE_SIZE, patch_size=8, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=3, num_attention_heads=4, projection_dim=64),
        projection_dim=64,
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids.values()
    return CLIPModel(config)


def build_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    s = domain.IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tokenize(tokenizer, captions, device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def train_clip(clip, tokenizer, s: Settings, seed: int, device):
    clip.to(device).train()
    opt = torch.optim.AdamW(clip.parameters(), lr=s.clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.clip_steps))
    data = batches(seed + 1, s.clip_batch)
    bar = tqdm(range(s.clip_steps), desc="clip", mininterval=5)
    for step in bar:
        captions, images = next(data)
        out = clip(input_ids=tokenize(tokenizer, captions, device), pixel_values=to_pixels(images, device))
        # Identical captions can land in one batch: count every match as a positive.
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device, dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(out.logits_per_image, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(out.logits_per_text, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            acc = (out.logits_per_image.argmax(1) == torch.arange(len(captions), device=device)).float().mean()
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{acc.item():.2f}")
    return clip.eval()


# ---------------------------------------------------------------- VAE


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
    fine-tuned decoders do; it can run while the UNet trains."""
    vae.to(device).train()
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.vae_steps))
    data = batches(seed + 2, s.vae_batch)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    bar = tqdm(range(s.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        _, images = next(data)
        x = to_pixels(images, device)
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
    if decoder_only:
        return vae
    with torch.no_grad():  # SD's convention: scale latents to unit variance
        _, images = next(batches(seed + 3, 256))
        std = vae.encode(to_pixels(images, device)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


# ---------------------------------------------------------------- UNet


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
        posterior = vae.encode(to_pixels(images, device)).latent_dist
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.unet_steps, warmup=200))
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
        loss = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
        if s.snr_gamma > 0:
            # Min-SNR-gamma: low-noise steps (high SNR) only polish detail; capping their
            # weight spends the gradient on the noisy steps that decide colour and layout.
            loss = loss * snr[t].clamp(max=s.snr_gamma) / snr[t]
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.unet_steps:
            checkpoint(ema, step + 1)
    unet.load_state_dict(ema)
    return unet.eval()


# ---------------------------------------------------------------- assembly


def save(obj, directory: Path) -> None:
    """save_pretrained as safetensors, then drop `_name_or_path` (the training machine's
    paths, set when a stage resumed from files) from the configs: shipped files should not
    depend on where they were trained."""
    obj.save_pretrained(directory, safe_serialization=True)
    for config in Path(directory).rglob("config.json"):
        doc = json.loads(config.read_text())
        if doc.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "pipelines" / "embedded")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="smoke: seconds, for tests; default: the shipped recipe (~1.5 h on 2 idle CPU cores)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; on a busy shared CPU 1 is much faster than 2)")
    p.add_argument("--resume-vae", action="store_true",
                   help="start the vae stage from the VAE already in --out (to train it further)")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="with --resume-vae: train only the decoder (keeps the latent space a UNet uses)")
    p.add_argument("--resume-unet", action="store_true",
                   help="start the unet stage from the UNet already in --out (to train a model further)")
    p.add_argument("--stages", default="clip,vae,unet",
                   help="which stages to train; the others are loaded from --out (e.g. --stages unet)")
    for f in fields(Settings):
        if f.type in ("int", "float"):
            p.add_argument("--" + f.name.replace("_", "-"), type=eval(f.type), default=None,
                           help=f"override the preset's {f.name}")
    args = p.parse_args(argv)
    settings = PRESETS[args.preset]
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(settings, f.name, value)

    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    stages = set(args.stages.split(","))
    if not stages <= {"clip", "vae", "unet"}:
        raise SystemExit(f"--stages {args.stages!r}: allowed stages are clip, vae, unet (comma-separated)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    print(f"device={device} preset={args.preset} stages={sorted(stages)} {settings}", flush=True)
    t0 = time.time()
    out = args.out
    clip_dir, model_dir = out / "clip", out / "model"

    if "clip" in stages:
        write_clip_tokenizer(clip_dir, domain.vocabulary(), model_max_length=TOKEN_LENGTH)
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        clip = train_clip(build_clip(tokenizer), tokenizer, settings, args.seed, device)
        save(clip, clip_dir)
        build_processor(tokenizer).save_pretrained(clip_dir)
        print(f"clip done at {time.time() - t0:.0f}s", flush=True)

    if "vae" in stages:
        vae = AutoencoderKL.from_pretrained(model_dir / "vae") if args.resume_vae else build_vae()
        def vae_checkpoint(vae, step):  # only meaningful when the latent space is fixed
            save(vae, model_dir / "vae")
            print(f"checkpoint at vae step {step}, {time.time() - t0:.0f}s", flush=True)

        vae = train_vae(vae, settings, args.seed, device, decoder_only=args.vae_decoder_only,
                        checkpoint=vae_checkpoint if args.vae_decoder_only else None)
        save(vae, model_dir / "vae")
        print(f"vae done at {time.time() - t0:.0f}s (scaling_factor={vae.config.scaling_factor:.4f})", flush=True)
    if "unet" not in stages:
        print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)
        return out
    if "vae" not in stages:
        vae = AutoencoderKL.from_pretrained(model_dir / "vae").to(device).eval()
    vae.requires_grad_(False)
    # The generator's text encoder is the domain CLIP's text tower, frozen.
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.to(device).eval().requires_grad_(False)

    def save_pipeline(unet):
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        save(pipe, model_dir)

    unet = build_unet(settings.unet_channels)
    if args.resume_unet:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    spare = build_unet(settings.unet_channels)

    def checkpoint(ema_state, step):  # a usable model even if the run is cut short
        spare.load_state_dict(ema_state)
        save_pipeline(spare)
        print(f"checkpoint at unet step {step}, {time.time() - t0:.0f}s", flush=True)

    unet = train_unet(unet, vae, text_encoder, tokenizer, settings, args.seed, device, checkpoint)
    save_pipeline(unet)
    print(f"unet done at {time.time() - t0:.0f}s", flush=True)
    print(f"wrote {model_dir} and {clip_dir} in {time.time() - t0:.0f}s", flush=True)
    return out


if __name__ == "__main__":
    main()
