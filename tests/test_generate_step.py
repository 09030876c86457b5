"""The generation step on a real (tiny) diffusers pipeline: schedulers, per-row
determinism, errors as rows."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.generation.grouped import generate
from pipelines.generation.results import to_pixels
from pipelines.registry.models import ModelRegistry
from pipelines.registry.schedulers import SCHEDULERS, UnknownSchedulerError, make_scheduler, scheduler_names
from pipelines.validation import validate_manifest

REG = ModelRegistry()


def rows_for(**cols):
    return validate_manifest(pa.table(cols), REG, default_model="tiny-random").to_pylist()


@pytest.mark.parametrize("name", scheduler_names("eps"))
def test_every_eps_scheduler_runs(tiny_model, name):
    rows = rows_for(prompt=["a red circle", "a blue square"], scheduler=[name] * 2, steps=[3, 3], guidance=[7.5, 7.5])
    results = generate(tiny_model, rows)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert results[0].pixels.shape == (32, 32, 3) and results[0].pixels.dtype == np.uint8
    assert type(tiny_model.pipe.scheduler).__name__ == SCHEDULERS[name].cls


@pytest.mark.parametrize("name", scheduler_names("flow"))
def test_flow_schedulers_build_from_a_flow_config(name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    sched = make_scheduler(name, base, family="flow")
    sched.set_timesteps(4)
    assert len(sched.timesteps) >= 4 and sched.config.shift == 3.0


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(UnknownSchedulerError) as err:
        make_scheduler("eulerr", {}, family="eps")
    for name in ("ddim", "euler_a", "dpmpp_2m_karras", "unipc"):
        assert name in str(err.value)


def test_schedulers_are_built_fresh(tiny_model):
    a = make_scheduler("dpmpp_2m", tiny_model.scheduler_config)
    b = make_scheduler("dpmpp_2m", tiny_model.scheduler_config)
    assert a is not b and a.config.algorithm_type == "dpmsolver++"
    # built from the model's original config, not from whatever ran last
    assert a.config.beta_schedule == tiny_model.scheduler_config["beta_schedule"]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_sde"])
def test_a_row_gives_the_same_image_alone_or_in_a_mixed_batch(tiny_model, scheduler):
    target = rows_for(prompt=["a green triangle"], seed=[42], scheduler=[scheduler], steps=[4], guidance=[7.5])[0]
    others = rows_for(prompt=[f"prompt {i}" for i in range(7)], seed=list(range(7)),
                      scheduler=[scheduler, scheduler, "ddim", "euler", scheduler, "pndm", scheduler],
                      steps=[4, 4, 3, 4, 4, 2, 4], guidance=[7.5, 1.0, 7.5, 7.5, 7.5, 3.0, 7.5])
    alone = generate(tiny_model, [target], batch_sizes=1)[0].pixels
    batch = others[:3] + [target] + others[3:]
    mixed = generate(tiny_model, batch, batch_sizes=8)
    assert [r.sample_id for r in mixed] == [r["sample_id"] for r in batch]
    diff = np.abs(alone.astype(int) - mixed[3].pixels.astype(int)).max()
    assert diff <= 1, diff
    # and the batch is not trivially constant: another seed gives another image
    assert np.abs(mixed[3].pixels.astype(int) - mixed[4].pixels.astype(int)).max() > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixels_converted_on_the_device_equal_the_numpy_conversion(dtype):
    """to_pixels must give the bytes a user gets from output_type="np": clip, x255, round
    (half to even) in float32, including values exactly between two levels and out of range."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g) * 1.2 - 0.1
    images[0, 0, 0, :4] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])
    images[2, 1, 3, 3] = float("nan")
    images = images.to(dtype)
    pixels, finite = to_pixels(images)
    as_np = images[:2].float().permute(0, 2, 3, 1).numpy()  # what diffusers' output_type="np" hands over
    expected = (np.clip(as_np, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # the finite images
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 8, 8, 3)
    assert finite.tolist() == [True, True, False]
    assert np.array_equal(pixels[:2], expected)


def test_non_finite_output_is_an_error_row(tiny_model):
    broken = copy.copy(tiny_model)
    broken.pipe = copy.deepcopy(tiny_model.pipe)
    with torch.no_grad():
        broken.pipe.unet.conv_out.bias.fill_(float("nan"))
    results = generate(broken, rows_for(prompt=["a", "b"], steps=[2, 2]))
    assert [r.status for r in results] == ["error", "error"]
    assert "non-finite" in results[0].error and results[0].pixels is None


def test_long_prompt_is_flagged_truncated(tiny_model):
    results = generate(tiny_model, rows_for(prompt=["short", "word " * 100], steps=[2, 2]))
    assert [r.prompt_truncated for r in results] == [False, True]
    assert all(r.status == "ok" for r in results)
