"""Out-of-memory split-and-retry and row isolation, for both generation paths.

A batch that runs out of device memory is run again in halves (down to single rows), and
the halved size is recorded in the model's BatchSizes so later batches of that image size
start there: one bad guess costs one failed call, not one per batch. A batch that raises
anything else is run again row by row, so the row that fails becomes an error result and
its neighbours are kept.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from pipelines.contract import Row
from pipelines.generation.results import RowResult, error_result

Run = Callable[[list[Row]], list[RowResult]]


def run_with_split(run: Run, rows: Sequence[Row], sizes) -> list[RowResult]:
    """`run(rows)`, retried as described above. `rows` share one image size; `sizes` is the
    model's BatchSizes. The batch that failed holds min(len(rows), the current size) rows:
    all of them for a diffusers call, the active slots for continuous batching."""
    rows = list(rows)
    try:
        return run(rows)
    except torch.OutOfMemoryError as e:
        free_memory()
        if len(rows) == 1:
            return [error_result(rows[0], f"out of memory at batch size 1: {str(e).splitlines()[0]}")]
        height, width = rows[0].height, rows[0].width
        sizes.lower(height, width, min(len(rows), sizes.get(height, width)))
        out: list[RowResult] = []
        while len(out) < len(rows):  # re-read the limit: a failing first part lowers it for the rest
            part = rows[len(out) : len(out) + sizes.get(height, width)]
            out += run_with_split(run, part, sizes)
        return out
    except Exception as e:  # isolate the row that fails, keep the others
        if len(rows) == 1:
            return [error_result(rows[0], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
        return [r for row in rows for r in run_with_split(run, [row], sizes)]


def sync(device: str) -> None:
    """Wait for the device, so that a wall clock read after it has seen the work end."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory() -> None:
    """Hand torch's cached blocks back after an out-of-memory error."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
