"""What each family's pipeline does with `guidance`, a negative prompt and long text.

The manifest's columns mean what the row's pipeline means by them, and a row never asks for
something its pipeline would silently ignore (that makes identical images under different
sample_ids):

- SD 1.x/2.x, SDXL, SD 3.x: `guidance` is the classifier-free guidance scale (`guidance_scale`,
  > 1 on: a second, negative-prompt forward per step); `true_cfg_scale` must stay 1. A negative
  prompt at `guidance` <= 1 is refused: these pipelines run no unconditional pass there
  (`do_classifier_free_guidance` is `guidance_scale > 1`), so it would change nothing but the sample_id.
- FLUX-dev (transformer config `guidance_embeds: true`): `guidance` is the distilled guidance
  scale, an input of the transformer (one forward per step). FLUX-schnell (`guidance_embeds:
  false`): FluxPipeline ignores `guidance_scale`, so only the model's default is accepted.
- Which FLUX it is comes from the transformer's config.json (`guidance_embeds`) where it is on
  disk before the run (a local directory, the Hugging Face cache), else from the registry's
  `guidance_embeds`; a registry value the config contradicts is refused, at validation or (a
  hub model downloaded by the worker) at load; with neither, FLUX rows are refused.
- FLUX, both: `true_cfg_scale` > 1 is diffusers' true CFG (`true_cfg_scale` plus the negative
  prompt, two forwards per step); a negative prompt at `true_cfg_scale` <= 1 is refused,
  since FluxPipeline reads it only for true CFG.

T5 text (SD3, FLUX) is cut at `max_sequence_length` tokens: the registry's value, else
diffusers' default for the family (SD3 256, FLUX.1-dev 512, FLUX.1-schnell 256: schnell was
trained with 256 and its model card runs it so). Needs no torch: validation uses it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pipelines.errors import InputError

FLUX = "FluxPipeline"
T5_DEFAULT = {"StableDiffusion3Pipeline": 256, "StableDiffusion3Img2ImgPipeline": 256}
FLUX_DEV_T5, FLUX_SCHNELL_T5 = 512, 256


def pipeline_name(spec) -> str:
    """The model's pipeline class name: its registry entry's, else (auto) a local model_index.json's."""
    if spec.pipeline != "auto":
        return spec.pipeline
    try:
        return str(json.loads((Path(spec.source).expanduser() / "model_index.json").read_text()).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return "auto"


LABELS = {"StableDiffusionPipeline": "SD 1.x/2.x", "StableDiffusionXLPipeline": "SDXL",
          "StableDiffusionXLImg2ImgPipeline": "SDXL refiner", "StableDiffusion3Pipeline": "SD 3.x", FLUX: "FLUX"}


def family_label(spec) -> str:
    """The family as users name it (for messages): 'SDXL', 'SD 3.x', 'FLUX', ..."""
    name = pipeline_name(spec)
    return LABELS.get(name, name)


class FluxVariantError(InputError):
    """A registry `guidance_embeds` that the FLUX transformer's config contradicts."""


def _variant(embeds: bool) -> str:
    return "FLUX.1-dev: guidance is the distilled guidance scale" if embeds else "FLUX.1-schnell: guidance is ignored"


@lru_cache(maxsize=256)
def guidance_embeds(spec) -> bool | None:
    """FLUX only: True for a guidance-distilled (dev) transformer, False for schnell; None where not
    FLUX, or where neither the registry nor a config on disk says. The transformer's config.json (a
    local directory's, else the Hugging Face cache's) decides; a registry `guidance_embeds` that
    contradicts it is refused (FluxVariantError), since rows would be checked for the wrong variant."""
    if pipeline_name(spec) != FLUX:
        return None
    config = component_config(spec, "transformer")
    if config is None:
        return spec.guidance_embeds
    return _config_variant(spec, config, f"{spec.source}'s transformer/config.json")


def _config_variant(spec, config, where: str) -> bool:
    """The transformer config's `guidance_embeds`; FluxVariantError where the registry's contradicts it."""
    actual = bool(config.get("guidance_embeds", False))
    if spec.guidance_embeds is not None and spec.guidance_embeds != actual:
        raise FluxVariantError(
            f"model {spec.name!r}, key 'guidance_embeds': the registry says {str(spec.guidance_embeds).lower()} "
            f"({_variant(spec.guidance_embeds)}), but {where} has guidance_embeds {str(actual).lower()} "
            f"({_variant(actual)}); set 'guidance_embeds: {str(actual).lower()}' in the models YAML, or leave it "
            "out to read it from the config")
    return actual


def check_loaded_variant(spec, pipe) -> None:
    """At load, for a model whose config was not on disk before the run (a hub model downloaded by the
    worker): the loaded FLUX transformer must be the variant the rows were validated for."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    if type(pipe).__name__ == FLUX and config is not None:
        _config_variant(spec, config, "the loaded transformer's config")


def component_config(spec, component: str, hub_cache: bool = True) -> dict | None:
    """A component's config.json (e.g. "transformer") read without loading or downloading anything:
    from the local model directory, else (`hub_cache`) from the Hugging Face cache; None if not there."""
    path = Path(spec.source).expanduser() / component / "config.json"
    if not path.is_file() and hub_cache and "/" in spec.source and not Path(spec.source).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(spec.source, f"{component}/config.json", revision=spec.revision)
            path = Path(hit) if isinstance(hit, str) else path
        except Exception:  # noqa: BLE001 - a source that is not a hub id, or no cache: unknown
            return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def max_sequence_length(spec) -> int | None:
    """T5 tokens the pipeline reads (passed as `max_sequence_length`); None for pipelines without T5."""
    if spec.max_sequence_length is not None:
        return spec.max_sequence_length
    name = pipeline_name(spec)
    if name == FLUX:
        return FLUX_SCHNELL_T5 if guidance_embeds(spec) is False else FLUX_DEV_T5
    return T5_DEFAULT.get(name)


def unused_negative_prompt(spec, guidance: float, true_cfg_scale: float) -> str | None:
    """Why the model's pipeline would not read a negative prompt at this guidance / true_cfg_scale
    (the image is the same with or without one), or None when it does read it."""
    name = pipeline_name(spec)
    if name == FLUX:
        return None if true_cfg_scale > 1 else (f"at true_cfg_scale {true_cfg_scale:g} (<= 1): FluxPipeline uses a "
                                                "negative prompt only for true CFG (set true_cfg_scale > 1)")
    name = "its pipeline" if name == "auto" else name
    return None if guidance > 1 else (f"at guidance {guidance:g} (<= 1): {name} runs no classifier-free guidance "
                                      "there, so it never reads the negative prompt (set guidance > 1)")


def guidance_problem(spec, guidance: float, negative_prompt: str, true_cfg_scale: float) -> tuple[str, str] | None:
    """(column, what is expected and why) for the first thing a row asks that the model's pipeline
    would ignore or cannot do; None when the row is fine."""
    name = pipeline_name(spec)
    if name != FLUX and true_cfg_scale > 1:
        return "true_cfg_scale", (f"1 (off) for model {spec.name!r}: true_cfg_scale is FluxPipeline's true CFG; "
                                  f"{name} does classifier-free guidance with the 'guidance' column")
    unused = negative_prompt and unused_negative_prompt(spec, guidance, true_cfg_scale)
    if unused:
        return "negative_prompt", f"'' for model {spec.name!r} {unused}"
    if name != FLUX:
        return None
    embeds = guidance_embeds(spec)
    if embeds is None:
        return "model", (f"a FLUX model whose variant is known before the run: whether {spec.name!r} is FLUX.1-dev "
                         "(guidance embedded) or -schnell (guidance ignored) decides what 'guidance' means, and its "
                         f"transformer/config.json is neither in a local directory nor in the Hugging Face cache; set "
                         "'guidance_embeds: true' (dev) or 'false' (schnell) in the models YAML (checked against the "
                         "config at load), or download the model first")
    if embeds is False and guidance != spec.guidance:
        return "guidance", (f"{spec.guidance:g} (the model's default) for model {spec.name!r}: its transformer has no "
                            "guidance embedding (guidance_embeds false, FLUX.1-schnell), so FluxPipeline ignores "
                            "guidance_scale; for CFG use true_cfg_scale > 1")
    return None
