"""generate(model, rows) -> one result per row: pixels, status, timing.

Rows are grouped by configuration (`Row.config()`: size, scheduler, steps, guidance,
cache_interval), because one diffusers call runs one configuration
(`pipelines.generation.pipeline_call.run_batch`); each group runs in batches of the
model's batch size for its image size, split and retried on out-of-memory errors
(`pipelines.generation.retry`).
"""

from __future__ import annotations

from itertools import groupby
from typing import Mapping, Sequence

from pipelines.contract import Row
from pipelines.generation.batch_size import BatchSizes
from pipelines.generation.pipeline_call import probe_row, run_batch
from pipelines.generation.results import RowResult
from pipelines.generation.retry import run_with_split
from pipelines.registry.loading import LoadedModel


def as_rows(rows: Sequence[Row | Mapping]) -> list[Row]:
    """Rows as `Row`s: a plain mapping (a manifest row as a dict) is converted at the door."""
    return [r if isinstance(r, Row) else Row.of(r) for r in rows]


def generate(model: LoadedModel, rows: Sequence[Row | Mapping], batch_sizes: BatchSizes | int = 8) -> list[RowResult]:
    """Results in the order of `rows`. Non-finite images and rows that fail even alone
    (e.g. out of memory at batch size 1) become status="error" results, not exceptions.

    `batch_sizes` is a fixed batch size or the model's BatchSizes, which gives one per
    image size and is lowered by an out-of-memory error for the batches that follow."""
    rows = as_rows(rows)
    sizes = batch_sizes if isinstance(batch_sizes, BatchSizes) else BatchSizes(model, batch_sizes)
    order = sorted(range(len(rows)), key=lambda i: rows[i].config())
    results: dict[int, RowResult] = {}
    for _, group in groupby(order, key=lambda i: rows[i].config()):
        pending = list(group)
        while pending:
            n = sizes.get(rows[pending[0]].height, rows[pending[0]].width)
            chunk, pending = pending[:n], pending[n:]
            out = run_with_split(lambda part: run_batch(model, part), [rows[i] for i in chunk], sizes)
            results.update(zip(chunk, out))
    return [results[i] for i in range(len(rows))]


def warm_up(model: LoadedModel) -> None:
    """One throwaway 2-step call at the model's default size, so that one-time costs (lazy
    initialisation, kernel selection, allocator growth) are not billed to the first batch's
    gen_seconds."""
    run_batch(model, [probe_row(model.spec, model.spec.height, model.spec.width)])
