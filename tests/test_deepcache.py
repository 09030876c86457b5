"""DeepCache-style feature reuse (`cache_interval`): the split forward is the UNet's own,
reuse runs only the shallow level, and the pixels change knowingly (a little), not wildly."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import UNet2DConditionModel

from pipelines.generation.deepcache import deep_cache, unet_forward
from pipelines.generation.grouped import generate
from pipelines.registry.models import ModelRegistry
from pipelines.validation import validate_manifest

REG = ModelRegistry()


def sdxl_like_unet():
    """A toy UNet with SDXL's conditioning (added text and time-id embeddings), 3 levels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()


def unet_inputs(batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor([500.0, 20.0][:batch]),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


@pytest.mark.parametrize("size", [16, 12])  # 12: not a multiple of 4, the UNet's upsample-size branch
def test_full_split_forward_is_the_unets_forward(size):
    unet = sdxl_like_unet()
    x = unet_inputs(size=size)
    with torch.no_grad():
        want = unet(**x, return_dict=False)[0]
        got, deep = unet_forward(unet, x["sample"], x["timestep"], x["encoder_hidden_states"], x["added_cond_kwargs"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert deep.shape[-2:] == (size, size) and deep.shape[1] == unet.config.block_out_channels[1]  # up_blocks[-2] out


def test_reuse_runs_only_the_shallow_level_and_restores_the_unet():
    unet = sdxl_like_unet()
    x = unet_inputs()
    ran = []
    hooks = [block.register_forward_hook(lambda m, a, o, name=name: ran.append(name))
             for name, block in [("mid", unet.mid_block), ("down0", unet.down_blocks[0]), ("down1", unet.down_blocks[1])]]
    with torch.no_grad(), deep_cache(unet, 3) as state:
        outs = [unet(**x, return_dict=False)[0] for _ in range(4)]
    for h in hooks:
        h.remove()
    # calls 0 and 3 full (down0, down1, mid), 1 and 2 shallow (down0 only)
    assert ran == ["down0", "down1", "mid", "down0", "down0", "down0", "down1", "mid"]
    assert state["calls"] == 4 and "forward" not in vars(unet)
    with torch.no_grad():
        plain = unet(**x, return_dict=False)[0]
    torch.testing.assert_close(outs[0], plain, rtol=0, atol=1e-6)  # a full call is the plain UNet
    torch.testing.assert_close(outs[3], plain, rtol=0, atol=1e-6)
    # same inputs, so the cached deep features are exact here and the shallow calls agree too
    torch.testing.assert_close(outs[1], plain, rtol=0, atol=1e-5)


def rows_for(**cols):
    return validate_manifest(pa.table(cols), REG, default_model="tiny-random").to_pylist()


@pytest.fixture(scope="module")
def embedded_model():
    """The shipped trained model: feature reuse relies on features that change slowly from
    step to step, which a trained UNet has and a random one does not."""
    from pipelines.registry.loading import load_model

    return load_model(REG.get("embedded"))


def embedded_rows(**cols):
    return validate_manifest(pa.table(cols), REG, default_model="embedded").to_pylist()


def test_cache_interval_changes_pixels_a_little_and_only_for_its_rows(embedded_model):
    from evals import shapes as domain

    n = 4
    base = dict(prompt=domain.sample_captions(n, seed=5), steps=[20] * n, scheduler=["ddim"] * n)
    plain = embedded_rows(**base)
    cached = embedded_rows(**base, cache_interval=[2] * n)
    assert all(a["sample_id"] != b["sample_id"] for a, b in zip(plain, cached))  # another image is asked for
    out = generate(embedded_model, plain + cached, 8)
    assert [r.status for r in out] == ["ok"] * (2 * n), [r.error for r in out]
    a = np.stack([r.pixels for r in out[:n]]).astype(float)
    b = np.stack([r.pixels for r in out[n:]]).astype(float)
    diff = np.abs(a - b).mean()
    assert diff > 0  # reuse really happened
    # ... but it is the same picture: far closer than the same captions with other seeds
    other_seed = generate(embedded_model, embedded_rows(**base, seed=list(range(100, 100 + n))), 8)
    seed_diff = np.abs(a - np.stack([r.pixels for r in other_seed]).astype(float)).mean()
    assert diff < 0.5 * seed_diff, (diff, seed_diff)
    # the plain rows are untouched by their neighbours' cache_interval
    alone = generate(embedded_model, plain, 8)
    assert max(np.abs(x.pixels.astype(int) - y.pixels.astype(int)).max() for x, y in zip(alone, out[:n])) <= 1
    assert "forward" not in vars(embedded_model.pipe.unet)


def test_interval_one_is_the_default_and_keeps_sample_ids():
    plain = rows_for(prompt=["a"], seed=[1])
    explicit = rows_for(prompt=["a"], seed=[1], cache_interval=[1])
    assert plain[0]["cache_interval"] == 1 and plain[0]["sample_id"] == explicit[0]["sample_id"]


def test_unsupported_unet_is_a_clear_error(tiny_model):
    model = copy.copy(tiny_model)
    model.pipe = copy.deepcopy(tiny_model.pipe)
    model.pipe.unet.register_to_config(class_embed_type="timestep")  # as a class-conditioned UNet says
    rows = rows_for(prompt=["a"], steps=[2], cache_interval=[2])
    out = generate(model, rows, 1)
    assert out[0].status == "error" and "cache_interval > 1" in out[0].error


def test_flops_of_a_reused_step_are_counted(tiny_model):
    from pipelines.benchmarking.flops import count_flops, flops_per_image

    counts = count_flops(tiny_model.pipe, 32, 32)
    assert 0 < counts["unet_shallow_step"] < counts["unet_step"]
    full = flops_per_image(counts, 10)
    assert flops_per_image(counts, 10, cache_interval=1) == full
    # interval 3 over 10 steps: full steps 0, 3, 6, 9; six shallow ones
    want = full - 6 * (counts["unet_step"] - counts["unet_shallow_step"])
    assert flops_per_image(counts, 10, cache_interval=3) == want
