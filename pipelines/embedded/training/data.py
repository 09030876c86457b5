"""Training data: rendered scenes and their captions, made on the fly from seeds.

Every image comes from the shapes domain (`evals/shapes.py`), so training needs no data set
and no download, and a batch is a pure function of its seed.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from evals import shapes as domain


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


def images_to_model_input(images_uint8: np.ndarray, device) -> torch.Tensor:
    """Rendered uint8 NHWC images -> float NCHW in [-1, 1], the input range of the VAE and
    of the CLIP vision tower (its processor's mean and std are 0.5)."""
    x = torch.from_numpy(images_uint8).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
