"""The output stage's ceiling: how many images per second one job can write, whatever the
GPUs do. The inputs are pre-made: rows of a real manifest and result rows that look exactly
like a generation actor's (raw 512x512 pixels plus provenance), so that what is timed is
PNG encoding, moving the results and committing shards, and nothing of the model.

The pixels are a smooth pattern plus a little noise, which PNG compresses to about 0.4 MB
at 512x512 like a real image (pure noise would not compress; a flat image would compress
to nothing). Nothing here imports ray: the Ray path is jobs/raydata/output_bench.py.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

NOISE = 10  # 0..NOISE-1 added to each channel: ~0.37 MB per 512x512 PNG at compress_level 6


def image(size: int, seed: int) -> np.ndarray:
    """One (size, size, 3) uint8 image that PNG-encodes to about a real image's size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x // 2) % 256, (y // 2) % 256, ((x + y) // 4) % 256], -1).astype(np.int16)
    return np.clip(base + rng.integers(0, NOISE, base.shape), 0, 255).astype(np.uint8)


def manifest_rows(n: int, size: int) -> list[dict]:
    return [dict(prompt=f"output benchmark {i}", seed=i, model="tiny-random", steps=1, height=size, width=size)
            for i in range(n)]


def actor_blocks(sample_ids: list[str], size: int, block_rows: int, distinct: int = 8) -> list[pd.DataFrame]:
    """What the generation actors would hand the output stage for these rows, one frame per
    actor call: the columns of GenerateActor.__call__'s result. `distinct` different images
    are cycled (encoding one costs the same as encoding any)."""
    pixels = [image(size, s).tobytes() for s in range(distinct)]
    now = dt.datetime.now(dt.timezone.utc)
    rows = [dict(sample_id=sid, pixels=pixels[i % distinct], status="ok", error=None, prompt_truncated=False,
                 gen_seconds=0.0, batch_size=block_rows, dtype="float32", model_digest="benchmark", lora_digest=None,
                 quant_backend=None, quant_scheme=None, quant_version=None, worker="benchmark", device="cpu:benchmark",
                 created_at=now, diffusers_version="-", torch_version="-", load_seconds=None, peak_mem_bytes=None,
                 weights_bytes=None, height=size, width=size)
            for i, sid in enumerate(sample_ids)]
    return [pd.DataFrame(rows[i:i + block_rows]) for i in range(0, len(rows), block_rows)]


def summary(n: int, wall_s: float, driver_cpu_s: float, png_bytes: int) -> dict:
    return {"images": n, "wall_s": round(wall_s, 2), "images_per_s": round(n / wall_s, 1),
            "driver_cpu_s_per_image": round(driver_cpu_s / n, 5), "mean_png_mb": round(png_bytes / n / 1e6, 3)}
