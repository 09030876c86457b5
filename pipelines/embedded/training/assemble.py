"""The trained parts as one diffusers StableDiffusionPipeline, and how parts are saved."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.embedded.training.unet import build_scheduler


def save(obj, directory: Path) -> None:
    """save_pretrained as safetensors, then drop `_name_or_path` (the training machine's
    paths, set when a stage resumed from files) from the configs: shipped files should not
    depend on where they were trained."""
    obj.save_pretrained(directory, safe_serialization=True)
    for config in Path(directory).rglob("config.json"):
        doc = json.loads(config.read_text())
        if doc.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def save_pipeline(model_dir: Path, vae, text_encoder, tokenizer, unet) -> None:
    """Write the pipeline the registry loads as model `embedded`: DDIM, no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save(pipe, model_dir)
