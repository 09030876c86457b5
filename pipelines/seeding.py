"""Per-row randomness.

A row's image must depend only on the row, so each row gets its own `torch.Generator`
seeded from its seed, whatever batch it lands in. (The seed itself, and the sample_id,
are pure functions of the row: pipelines/contract.py.)
"""

from __future__ import annotations

import torch


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row. CPU generators make the initial noise identical on
    every device (diffusers draws on the generator's device, then moves the tensor)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
