"""The "plain diffusers" timed path: the loop a user writes, kept that plain on purpose.

It is the baseline the actor and the Ray job are measured against, in speed and in
pixels, so it uses nothing of diffsweep's generation code but the float -> uint8
conversion: one pipeline, per configuration set its scheduler, call it per batch with
output_type="np".
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from pipelines.benchmarking.busy import device_busy
from pipelines.benchmarking.memory import PeakMemory, free, sync
from pipelines.contract import CONFIG_KEY

# One diffusers call's configuration: the contract's run key without the model.
CONFIG_COLUMNS = list(CONFIG_KEY)
REFERENCE_ROWS = 8  # float32 reference images per model and batch size (half precision only)


def time_plain(spec, rows: pd.DataFrame, batch: int, device: str, dtype: str, repeats: int = 1,
               profile_busy: bool = False):
    """A user's loop: one pipeline; per configuration, set its scheduler and call it per
    batch. Returns (median pass seconds, pixels of the first batch by sample_id, peak bytes,
    (device busy, profiled pass seconds) or None)."""
    from pipelines.registry.loading import load_model

    loaded = load_model(spec, device, dtype)  # from_pretrained + .to(device), safety checker off
    groups = [g for _, g in rows.groupby(CONFIG_COLUMNS, sort=False)]

    first = {}

    def one_pass():
        for group in groups:
            for start in range(0, len(group), batch):
                chunk = group.iloc[start:start + batch]
                images = plain_call(loaded, chunk, device)
                if not first:
                    first.update(zip(chunk.sample_id, uint8_pixels(images)))

    plain_call(loaded, groups[0].iloc[:batch], device)  # warm-up
    passes = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            one_pass()
            passes.append(time.perf_counter() - t0)
    busy = device_busy(one_pass, device) if profile_busy else None  # after the clock: profiling slows it
    return float(np.median(passes)), first, mem.peak, busy


def plain_call(loaded, chunk: pd.DataFrame, device: str) -> np.ndarray:
    """One diffusers call for rows of one configuration, as a user writes it."""
    import torch

    from pipelines.registry.schedulers import make_scheduler

    pipe, r0 = loaded.pipe, chunk.iloc[0]
    pipe.scheduler = make_scheduler(r0.scheduler, loaded.scheduler_config, loaded.spec.family)
    kwargs = dict(prompt=list(chunk.prompt), num_inference_steps=int(r0.steps), guidance_scale=float(r0.guidance),
                  height=int(r0.height), width=int(r0.width), output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk.seed])
    if float(r0.guidance) > 1:
        kwargs["negative_prompt"] = list(chunk.negative_prompt)
    with torch.inference_mode():
        images = pipe(**kwargs).images
    sync(device)
    return images


def uint8_pixels(images: np.ndarray) -> list[np.ndarray]:
    """output_type="np" images (B x H x W x 3 floats in [0, 1]) as uint8 pixels, by the
    generation step's own conversion (clip, x255, round), so equal floats give equal pixels."""
    import torch

    from pipelines.generation.results import to_pixels

    return list(to_pixels(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2))[0])


def float32_reference(spec, rows: pd.DataFrame, first_batch: dict, device: str) -> dict:
    """Pixels by sample_id of the first REFERENCE_ROWS rows of plain diffusers' first batch
    (`first_batch`: its pixels by sample_id), made in float32 with TF32 off (so the reference
    is not itself a 10-bit-mantissa computation). float32 pixels do not depend on batch
    composition (<= 1/255, tested), so a smaller batch than the timed one is fine."""
    import torch

    from pipelines.registry.loading import load_model

    chunk = rows[rows.sample_id.isin(list(first_batch)[:REFERENCE_ROWS])]  # rows' order: the batch's
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        images = plain_call(load_model(spec, device, "float32"), chunk, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    free(device)
    return dict(zip(chunk.sample_id, uint8_pixels(images)))
