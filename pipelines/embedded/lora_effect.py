"""What the shipped `black_background` LoRA does, read back by the domain's exact judge.

For each `lora_scale` the same captions and seeds are generated through the project's
generation step with the adapter switched in (`pipelines.registry.loras.Adapters`), and
`evals.shapes.attribute_scores` reads each image: the background (is it black, for the
captions that ask for another colour: the targeted attribute) and every shape attribute
(colour, kind, size, place: the ones that must keep their accuracy). docs/lora.md has
the numbers; tests/test_lora.py asserts them on fewer captions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from evals import shapes as domain
from pipelines.embedded.measure import caption_rows
from pipelines.generation.grouped import generate
from pipelines.registry.loras import BUILTIN_LORAS, Adapters
from pipelines.registry.loading import LoadedModel

NAME = "black_background"


def captions_to_change(n: int, seed: int = 0) -> list[str]:
    """`n` grammar captions whose background is not black (so the adapter must change it)."""
    out, k = [], 0
    while len(out) < n:
        out += [c for c in domain.sample_captions(4 * n, seed=seed + k) if not c.endswith("black background")]
        k += 1
    return out[:n]


def images_at(model: LoadedModel, captions, scale: float | None, seed: int = 0, steps: int = 25,
              guidance: float = 7.5, scheduler: str | None = None, batch_size: int = 32,
              loras: dict | None = None) -> np.ndarray:
    """uint8 images of `captions` with the adapter at `scale` (None: no adapter, the base model).
    `loras`: where the adapter's name resolves (default: the built-in registry)."""
    adapters = model.extras.setdefault("adapters", Adapters(model.pipe, loras or BUILTIN_LORAS))
    lora = "" if scale is None else NAME
    adapters.use(lora, 1.0 if scale is None else scale)
    rows = [dataclasses.replace(r, lora=lora, lora_scale=1.0 if scale is None else scale)
            for r in caption_rows(model, captions, seed, steps, guidance, scheduler)]
    results = generate(model, rows, batch_size)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} images failed; first: {failed[0].error}")
    return np.stack([r.pixels for r in results])


def read_back(images: np.ndarray, captions) -> dict[str, float]:
    """black: share of images on a black background; shapes: accuracy of the shape attributes
    the caption names (colour, kind, size, in the region its relation names)."""
    black, shape_scores = [], []
    for image, text in zip(images, captions):
        scene = domain.parse_caption(text)
        black.append(domain.attribute_scores(image, domain.caption(dataclasses.replace(scene, background="black")))
                     ["background"])
        scores = domain.attribute_scores(image, text)
        shape_scores += [v for k, v in scores.items() if k != "background"]
    return {"black": float(np.mean(black)), "shapes": float(np.mean(shape_scores))}
