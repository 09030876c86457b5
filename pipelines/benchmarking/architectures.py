"""Real architectures with random weights, for throughput benchmarks.

Timing a diffusion model does not depend on its weights, and nothing can be downloaded
here, so the benchmark builds SD 1.5, SDXL, SD 3.5-medium and FLUX.1 (dev, schnell) from
their published configs (values as in the `unet/` or `transformer/`, `vae/`,
`text_encoder*/` and `scheduler/` config.json files of stable-diffusion-v1-5,
stable-diffusion-xl-base-1.0, stable-diffusion-3.5-medium, FLUX.1-dev and FLUX.1-schnell;
T5 is google/t5-v1_1-xxl's encoder) with random weights. The one deliberate difference is
the tokenizers: a byte-level CLIP tokenizer written locally (pipelines/registry/tokenizer.py),
whose ids all fit the real 49408-entry embedding, and a small Unigram T5 tokenizer
(pipelines/registry/tiny_families.py) whose ids fit T5's 32128; every prompt is padded to
77 CLIP tokens and to `max_sequence_length` T5 tokens anyway, so the compute is the real one.

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

_CLIP_G = dict(  # OpenCLIP ViT-bigG/14 text tower, with projection: SDXL's and SD3's second encoder
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
)

_T5_XXL = dict(  # google/t5-v1_1-xxl, encoder only: SD3's text_encoder_3, FLUX.1's text_encoder_2
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
)

_VAE_16 = dict(  # SD3's and FLUX.1's 16-channel VAE: no quant convs, a shift factor
    _VAE, latent_channels=16, sample_size=1024, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)

_FLUX_TRANSFORMER = dict(  # FLUX.1-dev/-schnell transformer/config.json (schnell: guidance_embeds False)
    attention_head_dim=128,
    axes_dims_rope=[16, 56, 56],
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    patch_size=1,
    pooled_projection_dim=768,
)

_FLUX_SCHEDULER = dict(num_train_timesteps=1000, base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                       max_shift=1.15)

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
        text_encoder_2=dict(_CLIP_G),
        scheduler=("EulerDiscreteScheduler", dict(
            _SCHEDULER, interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False,
            sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
        )),
    ),
    "sd35-medium": dict(
        pipeline="StableDiffusion3Pipeline",
        height=1024,
        width=1024,
        transformer=("SD3Transformer2DModel", dict(  # MMDiT-X: dual attention in blocks 0-12, RMS q/k norm
            attention_head_dim=64,
            caption_projection_dim=1536,
            dual_attention_layers=list(range(13)),
            in_channels=16,
            joint_attention_dim=4096,
            num_attention_heads=24,
            num_layers=24,
            out_channels=16,
            patch_size=2,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            sample_size=128,
        )),
        vae=dict(_VAE_16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=dict(_CLIP_L),  # all three with projection (pooled text from both CLIPs)
        text_encoder_2=dict(_CLIP_G),
        text_encoder_3=dict(_T5_XXL),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    ),
    "flux-dev": dict(
        pipeline="FluxPipeline",
        height=1024,
        width=1024,
        transformer=("FluxTransformer2DModel", dict(_FLUX_TRANSFORMER, guidance_embeds=True)),
        vae=dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=dict(_CLIP_L),  # CLIP-L without projection (pooled output), T5 for the sequence
        text_encoder_2=dict(_T5_XXL),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(_FLUX_SCHEDULER, shift=3.0, use_dynamic_shifting=True)),
    ),
    "flux-schnell": dict(
        pipeline="FluxPipeline",
        height=1024,
        width=1024,
        transformer=("FluxTransformer2DModel", dict(_FLUX_TRANSFORMER, guidance_embeds=False)),
        vae=dict(_VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=dict(_CLIP_L),
        text_encoder_2=dict(_T5_XXL),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(_FLUX_SCHEDULER, shift=1.0, use_dynamic_shifting=False)),
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
    """A diffusers pipeline of architecture `arch` (a key of ARCHITECTURES) with random weights.

    Weights are created directly on `device` in `dtype` (fast on a GPU, and FLUX's 12B
    transformer never exists in float32; "meta" allocates nothing, for counting parameters
    and FLOPs). Same seed -> same weights on a device.
    """
    import diffusers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(architecture_names())}")
    cfg = ARCHITECTURES[arch]
    torch_dtype = _torch_dtype(dtype)
    if device != "meta":
        torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            parts = _components(cfg)
    finally:
        torch.set_default_dtype(default)
    for name, module in parts.items():
        if isinstance(module, torch.nn.Module):
            parts[name] = (module if torch_dtype == torch.float32 else module.to(dtype=torch_dtype)).eval()
    sched_cls, sched_cfg = cfg["scheduler"]  # from_config, like the hub file: unused keys are ignored
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if cfg["pipeline"] == "StableDiffusionPipeline" else {}
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)
    pipe = getattr(diffusers, cfg["pipeline"])(scheduler=scheduler, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _components(cfg: dict) -> dict:
    """The pipeline's models and tokenizers, built on the current default device and dtype."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, \
        T5EncoderModel

    from pipelines.registry.tiny_families import t5_tokenizer
    from pipelines.registry.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp))
    # The local tokenizer's special ids (not CLIP's 49406/49407): the text model finds the
    # pooled (end-of-text) position by this id.
    special = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                   pad_token_id=clip_tokenizer.pad_token_id)

    def clip(config: dict, projection: bool):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        return cls(CLIPTextConfig(**config, **special)), clip_tokenizer

    def t5(config: dict):
        tokenizer = t5_tokenizer(512)
        return T5EncoderModel(T5Config(**config, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)), tokenizer

    pipeline = cfg["pipeline"]
    if pipeline == "StableDiffusion3Pipeline":  # CLIP-L and CLIP-G (both projected), T5-XXL
        encoders = [clip(cfg["text_encoder"], True), clip(cfg["text_encoder_2"], True), t5(cfg["text_encoder_3"])]
    elif pipeline == "FluxPipeline":  # CLIP-L (pooled), T5-XXL (sequence)
        encoders = [clip(cfg["text_encoder"], False), t5(cfg["text_encoder_2"])]
    else:  # SD 1.5: CLIP-L; SDXL: + CLIP-G with projection
        encoders = [clip(cfg["text_encoder"], False)]
        if "text_encoder_2" in cfg:
            encoders.append(clip(cfg["text_encoder_2"], True))
    parts = {}
    for i, (encoder, tokenizer) in enumerate(encoders):
        suffix = f"_{i + 1}" if i else ""
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
    parts["vae"] = AutoencoderKL(**cfg["vae"])
    if "transformer" in cfg:
        cls, config = cfg["transformer"]
        parts["transformer"] = getattr(diffusers, cls)(**config)
    else:
        parts["unet"] = UNet2DConditionModel(**cfg["unet"])
    return parts


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per neural component (unet or transformer, vae, text_encoder, ...)."""
    return {name: sum(p.numel() for p in m.parameters())
            for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
