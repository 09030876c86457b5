"""Continuous batching on a real tiny diffusers pipeline: every row's pixels equal the
grouped path's, whatever configurations share its UNet calls."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.generation.continuous import ContinuousStats, TextCache, generate_continuous, generate_mixed, supports_continuous
from pipelines.generation.grouped import generate
from pipelines.registry.models import ModelRegistry
from pipelines.registry.schedulers import scheduler_names
from pipelines.validation import validate_manifest

REG = ModelRegistry()


def rows_for(**cols):
    return validate_manifest(pa.table(cols), REG, default_model="tiny-random").to_pylist()


def max_diff(a, b):
    return max(int(np.abs(x.pixels.astype(int) - y.pixels.astype(int)).max()) for x, y in zip(a, b))


def mixed_sweep(schedulers, steps=(2, 3, 5), guidance=(1.0, 3.0, 7.5), prompts=("a red circle", "a blue square")):
    cols = {"prompt": [], "negative_prompt": [], "seed": [], "scheduler": [], "steps": [], "guidance": []}
    for s in schedulers:
        for n in steps:
            for g in guidance:
                for k, p in enumerate(prompts):
                    cols["prompt"].append(p)
                    cols["negative_prompt"].append("blurry" if k and g > 1 else "")
                    cols["seed"].append(100 + k)
                    cols["scheduler"].append(s)
                    cols["steps"].append(n)
                    cols["guidance"].append(g)
    return rows_for(**cols)


def test_tiny_sd_pipeline_is_supported(tiny_model):
    assert supports_continuous(tiny_model)


def test_mixed_sweep_matches_the_grouped_path(tiny_model):
    rows = mixed_sweep(["ddim", "euler_a", "dpmpp_2m", "heun"])  # 72 rows, 36 configurations
    stats = ContinuousStats()
    continuous = generate_continuous(tiny_model, rows, max_batch_size=8, stats=stats)
    grouped = generate(tiny_model, rows, batch_sizes=8)
    assert [r.sample_id for r in continuous] == [r["sample_id"] for r in rows]
    assert all(r.status == "ok" for r in continuous), [r.error for r in continuous if r.error]
    assert max_diff(continuous, grouped) <= 1
    # rows of different configurations really shared calls: 36 configurations would need
    # at least sum(len(timesteps)) calls grouped, far more than with 8 slots kept full
    assert stats.max_active == 8
    assert stats.unet_rows / stats.unet_calls > 8
    # the prompt cache encoded each distinct string once
    assert stats.text_cache_misses == 4  # two prompts, "" and "blurry"
    assert all(r.gen_seconds > 0 for r in continuous)


@pytest.mark.parametrize("scheduler", scheduler_names("eps"))
def test_every_eps_scheduler_matches(tiny_model, scheduler):
    rows = rows_for(prompt=["a green triangle", "a red circle", "x"], seed=[1, 2, 3], scheduler=[scheduler] * 3,
                    steps=[4, 3, 2], guidance=[7.5, 1.0, 4.0])
    # interleave with DDIM rows so every row of `scheduler` shares calls with another configuration
    rows += rows_for(prompt=["filler a", "filler b"], seed=[5, 6], scheduler=["ddim"] * 2, steps=[6, 2],
                     guidance=[7.5, 7.5])
    assert max_diff(generate_continuous(tiny_model, rows, max_batch_size=3), generate(tiny_model, rows)) <= 1


def test_a_row_does_not_depend_on_its_batch(tiny_model):
    rows = mixed_sweep(["ddim", "euler"], steps=(3, 4), guidance=(1.0, 7.5))
    alone = [generate_continuous(tiny_model, [r], max_batch_size=1)[0] for r in rows[:4]]
    together = generate_continuous(tiny_model, rows, max_batch_size=5)[:4]
    assert max_diff(alone, together) <= 1
    assert np.abs(together[0].pixels.astype(int) - together[1].pixels.astype(int)).max() > 1


def test_text_cache_evicts_least_recently_used(tiny_model):
    cache = TextCache(capacity=2)
    a, b = cache.get(tiny_model.pipe, ["a", "b"], "cpu")
    assert a.shape[0] == 1 and len(cache) == 2
    cache.get(tiny_model.pipe, ["a"], "cpu")
    cache.get(tiny_model.pipe, ["c"], "cpu")
    assert "a" in cache and "c" in cache and "b" not in cache
    assert torch.equal(cache.get(tiny_model.pipe, ["a"], "cpu")[0], a)


def test_rows_of_several_sizes_and_nan_rows(tiny_model):
    rows = rows_for(prompt=["a", "b", "c"], steps=[2, 3, 2], height=[32, 64, 32], width=[32, 32, 64])
    out = generate_mixed(tiny_model, rows, batch_sizes=4)
    assert [r.pixels.shape for r in out] == [(32, 32, 3), (64, 32, 3), (32, 64, 3)]
    with pytest.raises(ValueError, match="one size"):
        generate_continuous(tiny_model, rows)
    broken = copy.copy(tiny_model)
    broken.pipe = copy.deepcopy(tiny_model.pipe)
    with torch.no_grad():
        broken.pipe.unet.conv_out.bias.fill_(float("nan"))
    out = generate_mixed(broken, rows[:2] * 1, batch_sizes=4)
    assert [r.status for r in out] == ["error", "error"] and "non-finite" in out[0].error
