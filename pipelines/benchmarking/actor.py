"""The "actor" timed path: the generation step (GenerateActor) called in this process on
the pandas batches Ray would feed it, with nothing of Ray around it."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from pipelines.benchmarking.busy import device_busy
from pipelines.benchmarking.memory import PeakMemory, sync


def time_actor(spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, repeats: int = 1,
               batching: str = "config", speed: dict | None = None, profile_busy: bool = False):
    """Returns (median pass seconds, pixels by sample_id, error messages, peak bytes, warm-up
    seconds: model load, the actor's own warm-up (compile, if on) and one batch,
    (device busy, profiled pass seconds) or None)."""
    from pipelines.generation.blocks import call_blocks
    from pipelines.generation.worker import CALL_ROWS_CONTINUOUS, GenerateActor

    actor = GenerateActor(specs={spec.name: spec}, dtype=dtype, batch_size=batch, torch_threads=None,
                          batching=batching, speed=speed)
    call_rows = batch * (CALL_ROWS_CONTINUOUS if batching == "continuous" else 1)  # as jobs/generate.py
    t0 = time.perf_counter()
    actor(rows.iloc[:batch])  # warm-up (and model load)
    sync(device)
    warmup_s = time.perf_counter() - t0

    def one_pass():
        return [actor(block) for block in call_blocks(rows, batch, call_rows, by_config=batching != "continuous")]

    passes = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = one_pass()
            passes.append(time.perf_counter() - t0)
    busy = device_busy(one_pass, device) if profile_busy else None  # after the clock: profiling slows it
    out = pd.concat(outs, ignore_index=True)
    pixels = {sid: (None if raw is None else np.frombuffer(raw, np.uint8).reshape(int(h), int(w), 3))
              for sid, raw, h, w in zip(out.sample_id, out.pixels, out.height, out.width)}
    errors = out.error[out.status != "ok"].tolist()
    return float(np.median(passes)), pixels, errors, mem.peak, warmup_s, busy
