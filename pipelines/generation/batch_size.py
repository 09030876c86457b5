"""Batch size per image size: fixed, or fitted to the accelerator's free memory.

The batch that keeps an H100 busy at 512x512 runs out of memory at 1024x1024, and a
fixed `--batch-size` is either wasteful at the small size or fatal at the large one. With
`--batch-size auto` the actor measures, once per model and image size, what one and two
rows cost at peak (a 2-step call with guidance: UNet with the CFG twin, then the VAE
decode, which is the peak at large sizes) and fits the batch to the free memory:

    peak(n) ~ overhead + n * per_row          (measured at n = 1 and n = 2)
    n = floor((HEADROOM * available - overhead) / per_row), clamped to [1, AUTO_CAP]

Whatever the size came from, an out-of-memory error halves the batch that hit it
(`pipelines.generation.retry`) and lowers the size used for later batches of that image size, so
one bad guess costs one failed call, not one per batch.

On a CPU there is no device memory to fit: `auto` means CPU_BATCH_SIZE.
"""

from __future__ import annotations

AUTO_CAP = 64  # beyond this the GPU is saturated and a batch only adds latency
HEADROOM = 0.85  # of the available memory: allocator fragmentation, cuDNN workspaces
CPU_BATCH_SIZE = 8


def fit_batch_size(available: int, overhead: int, per_row: int, cap: int = AUTO_CAP) -> int:
    """The largest batch whose predicted peak stays within HEADROOM of `available` bytes."""
    if per_row <= 0:
        return cap
    return max(1, min(cap, int((HEADROOM * available - overhead) // per_row)))


class BatchSizes:
    """The batch size for each (height, width) of one loaded model.

    `requested` is a number (used as given) or None (auto: probed from free memory on CUDA,
    CPU_BATCH_SIZE elsewhere). `lower` records that a batch ran out of memory."""

    def __init__(self, model, requested: int | None):
        self.model, self.requested = model, requested
        self._sizes: dict[tuple[int, int], int] = {}

    def get(self, height: int, width: int) -> int:
        key = (int(height), int(width))
        if key not in self._sizes:
            self._sizes[key] = self.requested or self._auto(*key)
        return self._sizes[key]

    def lower(self, height: int, width: int, failed: int) -> None:
        """A batch of `failed` rows at this size ran out of memory: use at most half from now on."""
        key = (int(height), int(width))
        self._sizes[key] = max(1, min(self._sizes.get(key, failed), failed // 2))

    def _auto(self, height: int, width: int) -> int:
        if not self.model.device.startswith("cuda"):
            return CPU_BATCH_SIZE
        # Imported here, not at the top: the driver imports this module and needs no torch.
        # pipeline_call does not import this module, so there is no import circle.
        from pipelines.generation.pipeline_call import measure_peaks

        overhead, per_row, available = measure_peaks(self.model, height, width)
        return fit_batch_size(available, overhead, per_row)
