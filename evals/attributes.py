"""Attribute accuracy of generated images whose prompts may lie outside the embedded grammar.

Generic prompt-faithfulness scores (CLIP score) are noisy proxies. On the embedded model's
rendered-shapes domain the truth is checkable: the judge in `evals.shapes` reads the
background and each shape's colour, shape and size back from the pixels. A sweep may mix
grammar captions with free text, so evaluation scores each image on its own and leaves
NaN where the caption is not one the judge can read.
"""

from __future__ import annotations

import numpy as np

from evals.shapes import attribute_accuracy


def attribute_accuracy_or_nan(images, prompts) -> np.ndarray:
    """Per image, the share of its prompt's attributes it shows (0..1); NaN where the prompt is
    outside the embedded grammar (`evals.shapes.attribute_accuracy` raises ValueError there)."""
    out = np.full(len(images), np.nan)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        try:
            out[i] = attribute_accuracy([image], [prompt])[0]
        except ValueError:
            pass
    return out
