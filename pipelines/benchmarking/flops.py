"""FLOPs of a text-to-image call, and the device peak they are measured against (MFU).

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on meta-device twins
built from the components' configs: no memory, no compute, and the same count on every
device (on CPU, real tensors would route attention through a fused kernel the counter
does not see).
"""

from __future__ import annotations

import time

import numpy as np
import torch

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device name; anything else: --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def _meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """The same architecture on the meta device, rebuilt from the module's config."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if isinstance(module, ModelMixin):
            return type(module).from_config(module.config).eval()
        return type(module)(module.config).eval()  # transformers PreTrainedModel


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops(pipe, height: int, width: int, cfg: bool = True, batch: int = 1,
                max_sequence_length: int | None = None) -> dict[str, int]:
    """FLOPs of the pieces of one text-to-image call for `batch` images.

    unet_step: one denoising step of the denoiser (the UNet, or SD3's / FLUX's transformer),
    on 2*batch latents under classifier-free guidance (for FLUX: true CFG, the same FLOPs as two
    forwards of `batch`); vae_decode; text: every text encoder over prompt (and negative prompt
    under CFG), padded as the pipeline pads: CLIP to its 77 tokens, T5 to `max_sequence_length`
    (default: diffusers' for the family, pipelines.registry.families). Per image: steps *
    unet_step + vae_decode + text, over batch.
    """
    meta = torch.device("meta")
    tokens = _prompt_tokens(pipe)
    t5_tokens = max_sequence_length or _t5_default(pipe)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    n = batch * (2 if cfg else 1)
    h, w = height // factor, width // factor
    if getattr(pipe, "unet", None) is not None:
        out = _unet_flops(pipe, n, h, w, tokens)
    else:
        step = _transformer_step(_meta_twin(pipe.transformer), n, h, w, tokens, t5_tokens)
        out = {"unet_step": _count(step)}
    vae = _meta_twin(pipe.vae)
    z = torch.empty(batch, vae.config.latent_channels, h, w, device=meta)
    out["vae_decode"] = _count(lambda: vae.decode(z))
    text = 0
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            twin = _meta_twin(encoder)
            length = t5_tokens if type(encoder).__name__ == "T5EncoderModel" else tokens
            ids = torch.zeros(n, length, dtype=torch.long, device=meta)
            text += _count(lambda: twin(ids))
    out["text"] = text
    return out


def _unet_flops(pipe, n: int, h: int, w: int, tokens: int) -> dict[str, int]:
    """A full UNet step, and (UNet2DConditionModel) a step that reuses deep features (cache_interval > 1)."""
    meta = torch.device("meta")
    unet = _meta_twin(pipe.unet)
    latents = torch.empty(n, unet.config.in_channels, h, w, device=meta)
    kwargs = dict(encoder_hidden_states=torch.empty(n, tokens, unet.config.cross_attention_dim, device=meta))
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
        n_ids = 6
        pooled = unet.config.projection_class_embeddings_input_dim - n_ids * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = dict(text_embeds=torch.empty(n, pooled, device=meta),
                                           time_ids=torch.empty(n, n_ids, device=meta))
    timestep = torch.full((n,), 500, device=meta)
    out = {"unet_step": _count(lambda: unet(latents, timestep, **kwargs))}
    if type(unet).__name__ == "UNet2DConditionModel":
        from pipelines.generation.deepcache import unet_forward

        args = (unet, latents, timestep, kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs"))
        _, deep = unet_forward(*args)
        out["unet_shallow_step"] = _count(lambda: unet_forward(*args, deep=deep))
    return out


def _transformer_step(model, n: int, h: int, w: int, tokens: int, t5_tokens: int):
    """One forward of SD3's MMDiT or FLUX's transformer on meta inputs shaped as the pipeline
    builds them. SD3: latents (n, C, h, w) patchified inside, text = 77 CLIP tokens (both
    CLIPs side by side, zero-padded to T5's width) followed by the T5 tokens. FLUX: latents
    packed 2x2 into (h/2)*(w/2) tokens of C*4 channels outside the model, text = the T5
    tokens only (CLIP gives the pooled vector), position ids per token, and the guidance
    scale as an input for a guidance-distilled (dev) model."""
    meta = torch.device("meta")
    c = model.config
    timestep = torch.full((n,), 500.0, device=meta)
    pooled = torch.empty(n, c.pooled_projection_dim, device=meta)
    if type(model).__name__ == "FluxTransformer2DModel":
        image_tokens = (h // 2) * (w // 2)
        kwargs = dict(hidden_states=torch.empty(n, image_tokens, c.in_channels, device=meta),
                      encoder_hidden_states=torch.empty(n, t5_tokens, c.joint_attention_dim, device=meta),
                      pooled_projections=pooled, timestep=timestep / 1000,
                      img_ids=torch.zeros(image_tokens, 3, device=meta), txt_ids=torch.zeros(t5_tokens, 3, device=meta),
                      guidance=torch.full((n,), 3.5, device=meta) if c.guidance_embeds else None)
    else:
        kwargs = dict(hidden_states=torch.empty(n, c.in_channels, h, w, device=meta),
                      encoder_hidden_states=torch.empty(n, tokens + t5_tokens, c.joint_attention_dim, device=meta),
                      pooled_projections=pooled, timestep=timestep)
    return lambda: model(**kwargs, return_dict=False)


def _prompt_tokens(pipe) -> int:
    """Diffusers pads every prompt to the CLIP tokenizer's length (77 for CLIP; shorter for small models)."""
    limit = pipe.text_encoder.config.max_position_embeddings
    tokenizer = getattr(pipe, "tokenizer", None)
    return min(limit, getattr(tokenizer, "model_max_length", limit) or limit)


def _t5_default(pipe) -> int:
    """diffusers' default T5 length for the pipeline (FLUX: 512 for dev, 256 for schnell; SD3: 256)."""
    from pipelines.registry.families import FLUX, FLUX_DEV_T5, FLUX_SCHNELL_T5, T5_DEFAULT

    name = type(pipe).__name__
    if name == FLUX:
        return FLUX_DEV_T5 if pipe.transformer.config.guidance_embeds else FLUX_SCHNELL_T5
    return T5_DEFAULT.get(name, 256)


def flops_per_image(counts: dict[str, int], steps: int, batch: int = 1, cache_interval: int = 1) -> float:
    """Per-image FLOPs from `count_flops` output (same `batch`) and a step count; with
    feature reuse every `cache_interval`-th step is a full UNet step, the others shallow."""
    full = -(-steps // cache_interval)
    unet = full * counts["unet_step"] + (steps - full) * counts.get("unet_shallow_step", counts["unet_step"])
    return (unet + counts["vae_decode"] + counts["text"]) / batch


def mean_flops_per_image(rows, counts: dict[str, int], no_cfg: dict[str, int], cache_interval: int) -> float:
    """Per-image FLOPs averaged over benchmark rows: a row at guidance <= 1 runs no
    unconditional pass (`no_cfg` counts), each row runs its own step count."""
    return float(np.mean([flops_per_image(counts if g > 1 else no_cfg, int(k), cache_interval=cache_interval)
                          for g, k in zip(rows.guidance, rows.steps)]))


def measure_cpu_matmul_tflops(n: int = 1024, seconds: float = 0.5) -> float:
    """What this CPU sustains on an fp32 matmul: the practical ceiling MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(given: float | None, device: str, device_name: str, dtype: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where the figure comes from): `given` (--peak-tflops), a known GPU's
    dense half-precision spec, or on CPU a measured fp32 matmul. None if unknown."""
    if given:
        return given, "--peak-tflops"
    if device == "cuda":
        for key, value in PEAK_TFLOPS.items():
            if key in device_name and dtype in ("float16", "bfloat16"):
                return value, f"{key} dense {dtype} spec"
        return None, "unknown device peak (pass --peak-tflops)"
    return measure_cpu_matmul_tflops(), "measured fp32 matmul on this CPU"
