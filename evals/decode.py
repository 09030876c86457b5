"""Image bytes -> RGB arrays, where an undecodable image is a reason rather than an exception.

Result rows and reference files are decoded one by one; a broken one is counted and named
(an error row, or an InputError listing the bad files), never allowed to fail a batch.
"""

from __future__ import annotations

import io

import numpy as np

from evals.messages import reason


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG/... bytes -> an (H, W, 3) uint8 RGB array; PIL's exception if they are no image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def try_decode(data) -> tuple[np.ndarray | None, str]:
    """(RGB image, "") or (None, why) for bytes that are no decodable image."""
    if data is None or len(data) == 0:
        return None, "no image bytes"
    try:
        return decode_image(bytes(data)), ""
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        return None, reason(e)
