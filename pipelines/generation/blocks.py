"""Rows -> the blocks the generation actors are called with, and the batch sizes they achieved.

One diffusers call runs one configuration (the run key: the pipeline, the adapters and
`Row.config()`), and the worker splits each block by it. Blocks cut at fixed row counts
split a configuration over several calls whenever its row count is not a multiple of the
batch size: six rows of a configuration at batch size 8 ran as calls of 2 and 4 rows. The
cost per image depends on the call size (issue 18, a flags-only sweep: 0.19 s/image at
batch 2 and 0.45 at batch 4, one configuration, one run), so such a configuration's cost
is not comparable with another's (evals/cost.py marks it), and a GPU runs below its batch.
So blocks are cut along configurations: each configuration in chunks of the batch size
(all full but its last), and chunks of different configurations share a block only when
they fit in it whole.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import pandas as pd

from pipelines.contract import RUN_KEY


def block_lengths(group_sizes: Iterable[int], batch_size: int, block_rows: int) -> list[int]:
    """Row counts of consecutive blocks for groups of `group_sizes` rows (in that order).

    Each group is cut into chunks of `batch_size` rows (the last may be shorter); chunks are
    packed in order into blocks of at most `block_rows` rows, never split across blocks."""
    blocks, current = [], 0
    for size in group_sizes:
        full, rest = divmod(int(size), batch_size)
        for chunk in [batch_size] * full + ([rest] if rest else []):
            if current and current + chunk > block_rows:
                blocks.append(current)
                current = 0
            current += chunk
    if current:
        blocks.append(current)
    return blocks


def call_blocks(rows: pd.DataFrame, batch_size: int, block_rows: int, by_config: bool = True) -> list[pd.DataFrame]:
    """`rows` as actor-call blocks. With `by_config`, rows of one run key are brought together
    (their first-seen order kept) and cut as in `block_lengths`; without it (continuous
    batching, which mixes configurations in one batch) blocks are plain slices of `block_rows`."""
    sizes = [len(rows)]
    if by_config and len(rows):
        codes = rows.groupby([k for k in RUN_KEY if k in rows.columns], sort=False, dropna=False).ngroup().to_numpy()
        rows = rows.iloc[np.argsort(codes, kind="stable")]
        sizes = np.bincount(codes).tolist()  # group numbers follow first appearance, as the sorted rows do
    lengths = block_lengths(sizes, batch_size if by_config else block_rows, block_rows)
    starts = np.cumsum([0] + lengths)
    return [rows.iloc[a:b].reset_index(drop=True) for a, b in zip(starts[:-1], starts[1:])]


class CallSizes:
    """Images per diffusers call, counted from result rows: a row's `batch_size` is the size of
    the call it ran in, so a call of b rows shows up as b rows of b (rows that never ran have 0)."""

    def __init__(self):
        self.rows: Counter[int] = Counter()  # call size -> rows that ran in a call of that size

    def add(self, batch_sizes: Iterable) -> None:
        self.rows.update(int(b) for b in batch_sizes if b == b and b > 0)

    def mean(self) -> float | None:
        """Images per call over the calls seen (None before any), to 2 decimals."""
        calls = sum(n / b for b, n in self.rows.items())
        return round(sum(self.rows.values()) / calls, 2) if calls else None
