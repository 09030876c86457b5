"""Speed options keep the pixels: channels_last and torch.compile on the tiny pipeline."""

import copy
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipelines.generation.continuous import generate_continuous
from pipelines.generation.grouped import generate
from pipelines.registry.models import ModelRegistry
from pipelines.validation import validate_manifest
from pipelines.generation.speed import SpeedOptions, apply_speed_options, compiled_graphs

REG = ModelRegistry()


def rows_for(**cols):
    return validate_manifest(pa.table(cols), REG, default_model="tiny-random").to_pylist()


def max_diff(a, b):
    return max(int(np.abs(x.pixels.astype(int) - y.pixels.astype(int)).max()) for x, y in zip(a, b))


def copy_with(model, options):
    fast = copy.copy(model)
    fast.pipe = apply_speed_options(copy.deepcopy(model.pipe), options)
    return fast


ROWS = dict(prompt=["a red circle", "a blue square"], seed=[3, 4], steps=[3, 3])


def test_unknown_compile_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: none, default"):
        SpeedOptions(compile="fastest")


def test_channels_last_keeps_pixels(tiny_model):
    rows = rows_for(**ROWS, scheduler=["ddim", "ddim"], guidance=[7.5, 7.5])
    fast = copy_with(tiny_model, SpeedOptions(channels_last=True))
    assert max_diff(generate(fast, rows), generate(tiny_model, rows)) <= 1


def test_fused_qkv_keeps_pixels_with_and_without_feature_reuse(tiny_model):
    rows = rows_for(**ROWS, scheduler=["ddim", "euler"], guidance=[7.5, 1.0], cache_interval=[1, 2])
    fast = copy_with(tiny_model, SpeedOptions(fuse_qkv=True))
    processors = {type(p).__name__ for p in fast.pipe.unet.attn_processors.values()}
    fused = [m for m in fast.pipe.unet.modules() if type(m).__name__ == "Attention"]
    assert processors == {"FusedAttnProcessor2_0"} and fused and all(m.fused_projections for m in fused)
    assert max_diff(generate(fast, rows), generate(tiny_model, rows)) <= 1


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compile_keeps_pixels_and_does_not_recompile_per_configuration(tiny_model):
    fast = copy_with(tiny_model, SpeedOptions(compile="default"))
    # Guided rows, int and float timesteps (each dtype is a graph); the UNet sees 2 latents per
    # call, as in a CFG batch. An unguided row at batch size 1 would be one more graph (a shape).
    warm = rows_for(**ROWS, scheduler=["ddim", "euler"], guidance=[7.5, 5.0])
    generate(fast, warm, batch_sizes=1)
    graphs = compiled_graphs()
    rows = rows_for(prompt=["a green triangle", "x"], seed=[5, 6], steps=[4, 2], scheduler=["dpmpp_2m", "lms"],
                    guidance=[3.0, 2.0])
    got = generate(fast, rows, batch_sizes=1)
    assert compiled_graphs() == graphs  # new schedulers, step counts and scales: values, not shapes
    assert max_diff(got, generate(tiny_model, rows, batch_sizes=1)) <= 1
    # Continuous batching on the compiled model: per-row timesteps, rows joining freed slots, UNet
    # batches of 3, 4 and 2 latents, CFG and not. The rows are chosen so that every UNet call has
    # at least 2 latents and rows finish one at a time: one more graph, with a dynamic batch size
    # (size 1 is always specialized, and a 2-row VAE decode would be a second dynamic graph), so the
    # test pays one compile here instead of three.
    unguided = rows_for(prompt=["x"], seed=[6], steps=[2], scheduler=["lms"], guidance=[1.0])
    mixed = rows[:1] + unguided + warm[:1] + rows_for(prompt=["a blue square"], seed=[4], steps=[2],
                                                      scheduler=["euler"], guidance=[5.0])
    got = generate_continuous(fast, mixed, max_batch_size=2)
    assert compiled_graphs() == graphs + 1, "the continuous run should add one graph, dynamic in the batch size"
    assert max_diff(got, generate(tiny_model, mixed)) <= 1
