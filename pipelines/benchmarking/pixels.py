"""The pixel check: does an optimised path make the same images as plain diffusers?

In float32 the actor's pixels must equal plain diffusers' (and the Ray job's the actor's)
within --pixel-tolerance levels. In half precision that is not a property any path has:
batch composition alone moves some images by tens of levels (docs/performance.md). So
there a float32 run of the first batch is the reference (plain.float32_reference), and a
path passes if its mean |difference| to it is at most --half-tolerance x plain diffusers'
own (+ 0.5 level): an optimisation may not make the images less accurate than the
precision does. Pixels are dicts sample_id -> uint8 HxWx3 array (None for an error row).
"""

from __future__ import annotations

import numpy as np


def max_pixel_diff(a: dict, b: dict) -> int | None:
    """Largest |a - b| in 0..255 levels over the sample_ids both hold; None if one lacks pixels."""
    common = [k for k in a if k in b]
    if not common or any(a[k] is None or b[k] is None for k in common):
        return None
    return max(int(np.abs(a[k].astype(np.int16) - b[k].astype(np.int16)).max()) for k in common)


def mean_pixel_diff(a: dict, reference: dict) -> float | None:
    """Mean |a - reference| in 0..255 levels over the reference's sample_ids; None if a lacks one."""
    if any(a.get(k) is None for k in reference):
        return None
    return float(np.mean([np.abs(a[k].astype(np.int16) - reference[k].astype(np.int16)).mean() for k in reference]))


def half_precision_match(path_diff: float | None, plain_diff: float | None, tolerance: float) -> bool:
    """A half-precision path is as accurate as the precision allows if its distance to the
    float32 reference is within `tolerance` x plain diffusers' own, + 0.5 level."""
    return path_diff is not None and plain_diff is not None and path_diff <= tolerance * plain_diff + 0.5


def reference_fields(pixels: dict, reference: dict) -> dict:
    """fp32_mean_diff and reference_images for a path's measurements."""
    return dict(fp32_mean_diff=mean_pixel_diff(pixels, reference), reference_images=len(reference))


def pixels_match(rec: dict, plain_fp32_diff: float | None, half: bool, pixel_tolerance: int,
                 half_tolerance: float) -> bool | None:
    """The record's pixel verdict (module docstring); None where nothing was compared."""
    if rec["path"] == "plain":
        return None
    if half:  # against the float32 reference, relative to plain diffusers' own distance
        if rec.get("fp32_mean_diff") is None:
            return None
        return rec["errors"] == 0 and half_precision_match(rec["fp32_mean_diff"], plain_fp32_diff, half_tolerance)
    if rec.get("pixels_compared") is None:
        return None
    d = rec.get("pixels_max_diff")
    return d is not None and d <= pixel_tolerance and rec["errors"] == 0
