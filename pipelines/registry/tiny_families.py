"""Tiny randomly initialised pipelines of every family the registry names, saved as diffusers directories.

SD 2.x (v-prediction), SDXL, SD3 and FLUX, each with the real architecture at toy width
(the component configs are those of diffusers' own unit tests, `get_dummy_components`),
so the generation path of each family runs on a CPU in seconds with no download. They
are saved with `save_pretrained` (safetensors) and loaded the normal way, through a
models YAML entry (`write_tiny_models`): what runs is what a user's local model runs.

Tokenizers cannot be downloaded: CLIP tokenizers are written by
`pipelines.registry.tokenizer.write_clip_tokenizer` and the T5 tokenizer is a Unigram
vocabulary of single characters plus a few words (`t5_tokenizer`). Images are noise-like;
these exist for tests and for timing the machinery.
"""

from __future__ import annotations

import string
import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from pipelines.registry.tokenizer import write_clip_tokenizer

_WORDS = ["a", "an", "the", "of", "red", "blue", "green", "circle", "square", "triangle", "painting", "photo", "cat"]


def clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, _WORDS))


def t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A SentencePiece-style Unigram tokenizer (transformers' T5Tokenizer, a `tokenizers` model):
    pad 0, eos 1, unk 2, then single characters (any ASCII text tokenizes) and whole words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer: CLIPTokenizer, projection_dim: int = 32) -> CLIPTextConfig:
    """diffusers' test CLIP text encoder, with the ids of our tokenizer (its EOS pools the text)."""
    return CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                          hidden_act="gelu", projection_dim=projection_dim)


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """The size of hf-internal-testing/tiny-random-t5 (d_model 32), built from a config."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=5,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   decoder_start_token_id=tokenizer.pad_token_id))


def _sd_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         sample_size=128)


def _transformer_vae(latent_channels: int) -> AutoencoderKL:
    """SD3/FLUX's VAE shape: no quant convs, a shift factor; one level (scale factor 1)."""
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


# Stable Diffusion 2.1's scheduler config (stabilityai/stable-diffusion-2-1): v-prediction.
SD2V_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1, prediction_type="v_prediction", timestep_spacing="leading")


def build_tiny_sd2v_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 2.x: linear-projection attention, per-level head dims, a v-prediction DDIM scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True)
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(vae=_sd_vae(), text_encoder=CLIPTextModel(_clip_config(tokenizer, 512)),
                                   tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD2V_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL: two CLIP encoders (the second with projection: the pooled text) and `text_time` added conditioning."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
                                cross_attention_dim=64, norm_num_groups=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tokenizer = clip_tokenizer()
    config = _clip_config(tokenizer)
    return StableDiffusionXLPipeline(vae=_sd_vae(), text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=clip_tokenizer(),
                                     unet=unet, scheduler=scheduler)


def build_tiny_sdxl_refiner_pipeline(seed: int = 0) -> StableDiffusionXLImg2ImgPipeline:
    """SDXL's refiner: an img2img pipeline with only the second (pooled) text encoder and an
    aesthetic-score conditioning (5 time ids); like SDXL 1.0's refiner it shares the base's
    VAE and second text encoder (the same weights: built from the base of the same seed)."""
    base = build_tiny_sdxl_pipeline(seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=72,  # 5 time ids x 8 + 32 pooled
                                cross_attention_dim=32, norm_num_groups=1)
    return StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, tokenizer=None,
                                            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                                            unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3: an MMDiT (SD3Transformer2DModel), two CLIP-with-projection encoders and a T5 encoder."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    tokenizer, t5 = clip_tokenizer(), t5_tokenizer(256)
    config = _clip_config(tokenizer)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_transformer_vae(latent_channels=4),
                                    text_encoder=CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                    text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=_t5_encoder(t5), tokenizer_3=t5)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """FLUX: a FluxTransformer2DModel with CLIP (pooled) and T5 (sequence) text; `guidance_embeds`
    False is schnell's shape (guidance ignored), True dev's (the guidance scale is an input)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    tokenizer, t5 = clip_tokenizer(), t5_tokenizer(512)
    # FLUX.1's scheduler config: resolution-dependent shift (mu from the image's token count)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_transformer_vae(latent_channels=1),
                        text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=_t5_encoder(t5), tokenizer_2=t5)


# name -> (builder, models YAML entry without 'source'): the family's pipeline class and defaults
TINY_FAMILIES: dict[str, tuple] = {
    "tiny-sd2v": (build_tiny_sd2v_pipeline, dict(pipeline="StableDiffusionPipeline", family="eps", scheduler="ddim",
                                                 steps=4, guidance=7.5, height=32, width=32)),
    "tiny-sdxl": (build_tiny_sdxl_pipeline, dict(pipeline="StableDiffusionXLPipeline", family="eps",
                                                 scheduler="euler", steps=4, guidance=5.0, height=32, width=32,
                                                 refiner="tiny-sdxl-refiner")),
    "tiny-sdxl-refiner": (build_tiny_sdxl_refiner_pipeline, dict(pipeline="StableDiffusionXLImg2ImgPipeline",
                                                                 family="eps", scheduler="euler", steps=4,
                                                                 guidance=5.0, height=32, width=32)),
    "tiny-sd3": (build_tiny_sd3_pipeline, dict(pipeline="StableDiffusion3Pipeline", family="flow",
                                               scheduler="flow_match_euler", steps=4, guidance=4.5, height=32,
                                               width=32, size_factor=16)),
    "tiny-flux": (build_tiny_flux_pipeline, dict(pipeline="FluxPipeline", family="flow", scheduler="flow_match_euler",
                                                 steps=4, guidance=0.0, height=32, width=32, size_factor=16)),
    "tiny-flux-dev": (partial(build_tiny_flux_pipeline, guidance_embeds=True),
                      dict(pipeline="FluxPipeline", family="flow", scheduler="flow_match_euler", steps=4, guidance=3.5,
                           height=32, width=32, size_factor=16)),
}


def save_tiny(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Build tiny model `name` (a key of TINY_FAMILIES) and save it as a diffusers directory (safetensors)."""
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model {name!r}; tiny models: {', '.join(TINY_FAMILIES)}")
    directory = Path(directory)
    TINY_FAMILIES[name][0](seed).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_models(directory: str | Path, names=None) -> Path:
    """Save tiny models `names` (default: all) under `directory`/<name> and write `directory`/models.yaml
    registering each under its name; returns the YAML's path (pass it as --models)."""
    import yaml

    directory = Path(directory)
    entries = {}
    for name in names or TINY_FAMILIES:
        path = save_tiny(name, directory / name)
        entries[name] = {"source": str(path), **TINY_FAMILIES[name][1]}
    for entry in entries.values():  # a refiner not written here is not registered: base only
        if entry.get("refiner") not in entries:
            entry.pop("refiner", None)
    out = directory / "models.yaml"
    out.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return out
