"""Attribute accuracy: an exact faithfulness metric for the embedded domain.

Generic prompt-faithfulness scores (CLIP score) are noisy proxies. On the embedded model's
rendered-shapes domain the truth is checkable: the judge in `evals.shapes`
reads the background, and each shape's colour, shape and size (in the place the caption
puts it) back from the pixels and scores the share that match the caption. Rendered ground
truth scores 1.0; noise scores about a third.
"""

from __future__ import annotations

import numpy as np

from evals.shapes import attribute_scores, parse_caption  # noqa: F401  (re-exported)
from evals.shapes import attribute_accuracy as _domain_attribute_accuracy


def attribute_accuracy(images_uint8, captions) -> np.ndarray:
    """Per-image share of the caption's attributes shown by the image, in [0, 1].

    `images_uint8`: (N, H, W, 3) uint8 array or a sequence of HxWx3 uint8 arrays / PIL
    images (resized to 64x64 if needed). `captions`: N captions from the embedded grammar
    (ValueError names any caption outside it)."""
    return _domain_attribute_accuracy(images_uint8, captions)
