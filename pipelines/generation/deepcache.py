"""DeepCache-style feature reuse: the UNet's deep features are recomputed every N-th call.

Consecutive denoising steps change the UNet's deep, low-resolution features very little,
while its shallowest level (conv_in, the first down block, the last up block) carries the
detail. DeepCache (Ma, Fang and Wang, CVPR 2024) runs the full UNet every `interval`-th
call and, in between, only the shallowest level, feeding the last up block the deep
features cached from the last full call. At interval 3 that skips the mid block and all
deeper levels two calls out of three.

It changes pixels, so it is a manifest column (`cache_interval`, 1 = off), part of the
row's sample_id and run key, and evaluated like any other configuration: quality per
GPU-second is exactly what a sweep over it measures.

`unet_forward` is UNet2DConditionModel.forward (diffusers 0.42) for the conditioning that
the Stable Diffusion and SDXL pipelines pass (timestep, text states, SDXL's added
text/time embeddings), split at the shallowest level; ControlNet/adapter residuals, class
labels and attention masks are not supported (an error says so). The full call goes
through this eager code too (it has to capture the cached features), so `--compile`
speeds only rows without feature reuse.

`deep_cache` installs it as a diffusers hook (`FeatureReuse`, through `diffusers.hooks`'
HookRegistry) for the length of one pipeline call and takes it out on the way out, also
when the call fails, so no UNet is left running the reuse forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

SUPPORTED_ADDITION_EMBEDS = (None, "text_time")
HOOK_NAME = "diffsweep_feature_reuse"


def check_supported(unet) -> None:
    """Raise ValueError if `unet` has conditioning that `unet_forward` does not reproduce."""
    config = getattr(unet, "_orig_mod", unet).config
    if type(getattr(unet, "_orig_mod", unet)).__name__ != "UNet2DConditionModel":
        raise ValueError(f"cache_interval > 1 needs a UNet2DConditionModel; this model has {type(unet).__name__}")
    if config.class_embed_type is not None or config.addition_embed_type not in SUPPORTED_ADDITION_EMBEDS:
        raise ValueError(f"cache_interval > 1 supports UNets with addition_embed_type in {SUPPORTED_ADDITION_EMBEDS} "
                         f"and no class embedding; this one has addition_embed_type={config.addition_embed_type!r}, "
                         f"class_embed_type={config.class_embed_type!r}")


def unet_forward(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, timestep_cond=None,
                 deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise prediction, deep features). With `deep` given, only the shallowest level runs
    and `deep` stands in for the output of every deeper block."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                added_cond_kwargs=added_cond_kwargs)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    sample = unet.conv_in(sample)
    skips = (sample,)
    levels = unet.down_blocks if deep is None else unet.down_blocks[:1]
    for block in levels:
        sample, res = _down(block, sample, emb, states)
        skips += res
    if deep is None:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=states)
            else:
                sample = unet.mid_block(sample, emb)
        factor = 2 ** unet.num_upsamplers
        odd_size = any(d % factor for d in skips[0].shape[-2:])  # as forward_upsample_size in diffusers
        for block in unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            sample = _up(block, sample, emb, states, res, skips[-1].shape[2:] if odd_size else None)
        deep = sample
    else:
        skips = skips[: len(unet.up_blocks[-1].resnets)]  # conv_in and the first level, before its downsampler
    sample = _up(unet.up_blocks[-1], deep, emb, states, skips, None)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), deep


def _down(block, sample, emb, states):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=states)
    return block(hidden_states=sample, temb=emb)


def _up(block, sample, emb, states, res, upsample_size):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=states,
                     upsample_size=upsample_size)
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


class FeatureReuse(ModelHook):
    """The UNet's forward with feature reuse, as a diffusers hook (`diffusers.hooks`): the
    hook registry chains it with the UNet's other diffusers hooks (offloading, layerwise
    casting) and takes it out again, instead of this module replacing `forward` by hand."""

    _is_stateful = True

    def __init__(self, interval: int):
        super().__init__()
        self.interval = interval
        self.state = {"calls": 0, "deep": None}

    def new_forward(self, unet, sample, timestep, encoder_hidden_states=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True,
                    **extra):
        given = [k for k, v in dict(extra, attention_mask=attention_mask,
                                    cross_attention_kwargs=cross_attention_kwargs).items() if v is not None]
        if given:
            raise ValueError(f"cache_interval > 1 does not support UNet arguments {given}")
        state = self.state
        reuse = state["calls"] % self.interval != 0 and state["deep"] is not None
        inner = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper: run the module's own blocks
        noise, state["deep"] = unet_forward(inner, sample, timestep, encoder_hidden_states, added_cond_kwargs,
                                            timestep_cond, deep=state["deep"] if reuse else None)
        state["calls"] += 1
        return (noise,) if not return_dict else _output(noise)

    def reset_state(self, module):
        self.state.update(calls=0, deep=None)
        return module


@contextmanager
def deep_cache(unet, interval: int):
    """While active, calls of `unet` run the full network every `interval`-th call (the
    first included) and only the shallowest level in between; yields the call count and
    cache. Use one context per pipeline call: the cache belongs to that call's batch. On
    exit, also after an error, the UNet is as it was before."""
    if interval <= 1:
        yield None
        return
    check_supported(unet)
    # torch.compile's wrapper keeps `forward` itself and hands other attributes (the
    # registry) to its module: note what both hold, to leave them as they were.
    modules = [unet] + ([unet._orig_mod] if hasattr(unet, "_orig_mod") else [])
    before = [set(vars(m)) for m in modules]
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    hook = FeatureReuse(interval)
    registry.register_hook(hook, HOOK_NAME)
    try:
        yield hook.state
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
        if not registry.hooks:  # the registry puts the bound forward back into the instance: drop what it added
            for module, had in zip(modules, before):
                for name in ("forward", "_diffusers_hook"):
                    if name not in had:
                        vars(module).pop(name, None)


def _output(noise):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=noise)
