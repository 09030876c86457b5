"""Real architectures with random weights, for throughput benchmarks.

Timing a diffusion model does not depend on its weights, and nothing can be downloaded
here, so the benchmark builds SD 1.5 and SDXL from their published configs (values as in
the `unet/`, `vae/`, `text_encoder*/` and `scheduler/` config.json files of
stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0) with random weights. The one
deliberate difference is the tokenizer: a byte-level CLIP tokenizer written locally
(pipelines/registry/tokenizer.py), whose ids all fit the real 49408-entry embedding; every prompt
is padded to 77 tokens anyway, so the compute is the real one.

Their FLOPs are counted in pipelines/benchmarking/flops.py.
"""

from __future__ import annotations

import tempfile

import torch

# --------------------------------------------------------------------------- configs

_SCHEDULER = dict(  # the DDPM noise schedule both models were trained with
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)

_VAE = dict(  # shared by SD 1.5 (scaling 0.18215) and SDXL (0.13025, force_upcast)
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
)

_CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower: SD 1.5's encoder, SDXL's first
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

ARCHITECTURES: dict[str, dict] = {
    "sd15": dict(
        pipeline="StableDiffusionPipeline",
        height=512,
        width=512,
        unet=dict(
            act_fn="silu",
            attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280],
            center_input_sample=False,
            cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            in_channels=4,
            layers_per_block=2,
            mid_block_scale_factor=1,
            norm_eps=1e-5,
            norm_num_groups=32,
            out_channels=4,
            sample_size=64,
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        ),
        vae=dict(_VAE, sample_size=512, scaling_factor=0.18215),
        text_encoder=dict(_CLIP_L),
        scheduler=("PNDMScheduler", dict(_SCHEDULER, set_alpha_to_one=False, skip_prk_steps=True)),
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        height=1024,
        width=1024,
        unet=dict(
            act_fn="silu",
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=256,
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            center_input_sample=False,
            cross_attention_dim=2048,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            in_channels=4,
            layers_per_block=2,
            mid_block_type="UNetMidBlock2DCrossAttn",
            norm_eps=1e-5,
            norm_num_groups=32,
            out_channels=4,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
            transformer_layers_per_block=[1, 2, 10],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            use_linear_projection=True,
        ),
        vae=dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=dict(_CLIP_L),
        text_encoder_2=dict(  # OpenCLIP ViT-bigG/14 text tower, with projection
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=1280,
        ),
        scheduler=("EulerDiscreteScheduler", dict(
            _SCHEDULER, interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False,
            sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
        )),
    ),
}


def architecture_names() -> list[str]:
    return sorted(ARCHITECTURES)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype {dtype!r}: expected float16, bfloat16 or float32")
    return getattr(torch, dtype)


def build_random_pipeline(arch: str, dtype="float32", device="cpu", seed: int = 0):
    """A diffusers pipeline of architecture `arch` ("sd15", "sdxl") with random weights.

    Weights are created directly on `device` (fast on a GPU; "meta" allocates nothing, for
    counting parameters and FLOPs) and cast to `dtype`. Same seed -> same weights on a device.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipelines.registry.tokenizer import write_clip_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(architecture_names())}")
    cfg = ARCHITECTURES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))
    # The local tokenizer's special ids (not CLIP's 49406/49407): the text model finds the
    # pooled (end-of-text) position by this id.
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if device != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel(**cfg["unet"]),
            vae=AutoencoderKL(**cfg["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **special)),
        )
        if "text_encoder_2" in cfg:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **special))
            parts["tokenizer_2"] = tokenizer
    torch_dtype = _torch_dtype(dtype)
    for name, module in parts.items():
        if isinstance(module, torch.nn.Module):
            parts[name] = (module if torch_dtype == torch.float32 else module.to(dtype=torch_dtype)).eval()
    sched_cls, sched_cfg = cfg["scheduler"]  # from_config, like the hub file: unused keys are ignored
    pipe_cls = getattr(diffusers, cfg["pipeline"])
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if cfg["pipeline"] == "StableDiffusionPipeline" else {}
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)
    pipe = pipe_cls(tokenizer=tokenizer, scheduler=scheduler, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per neural component (unet, vae, text_encoder, ...)."""
    return {name: sum(p.numel() for p in m.parameters())
            for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
