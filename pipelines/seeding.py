"""Stable identities and per-row randomness.

A row's image must depend only on the row. So the seed and the sample_id are pure
functions of the row's content, and each row gets its own `torch.Generator` seeded from
its seed, whatever batch it lands in.
"""

from __future__ import annotations

import hashlib
import json

import torch

SEED_LIMIT = 2**63  # seeds are int64 and non-negative

# The fields that decide a row's pixels, in the order they are hashed into its sample_id.
PIXEL_FIELDS = ("model", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "height", "width")
# Pixel fields added later, with their "off" value: hashed only when set to something else,
# so the sample_ids of manifests written before they existed stay the same.
OPTIONAL_PIXEL_FIELDS = {"cache_interval": 1}


def default_seed(prompt: str, index_within_prompt: int) -> int:
    """Seed for a row that gave none: the k-th row of a prompt gets the k-th seed."""
    digest = hashlib.sha256(f"{prompt}\x00{index_within_prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def sample_id(row: dict) -> str:
    """Content hash of a row's pixel fields: equal ids <=> the same image is asked for."""
    values = [row[f] for f in PIXEL_FIELDS]
    values[PIXEL_FIELDS.index("guidance")] = float(values[PIXEL_FIELDS.index("guidance")]).hex()
    values += [[f, row[f]] for f, off in OPTIONAL_PIXEL_FIELDS.items() if row.get(f, off) != off]
    blob = json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=int)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row. CPU generators make the initial noise identical on
    every device (diffusers draws on the generator's device, then moves the tensor)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
