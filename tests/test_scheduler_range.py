"""Every registered scheduler over the whole documented step range, 1..1000 (issue 13).

The standard spacings break at the top of the range ("leading" with steps_offset=1 asks
for timestep 1000 of 0..999; the multistep solvers repeat timesteps at 999/1000 steps, a
zero step size, NaN): there make_scheduler falls back to "trailing" spacing, and only
there, so every step count that worked before keeps its timesteps, hence its pixels.
LCM cannot run more than its original_inference_steps: the manifest is refused at the door.
"""

import inspect
import json

import pyarrow as pa
import pytest
import torch

import diffusers
from jobs import generate as gen_job
from pipelines.generation.grouped import generate
from pipelines.registry.models import EMBEDDED_DIR, ModelRegistry
from pipelines.registry.schedulers import (LCM_ORIGINAL_INFERENCE_STEPS, SCHEDULERS, make_scheduler, max_steps,
                                  scheduler_names)
from pipelines.contract import MAX_STEPS
from pipelines.validation import validate_manifest
from pipelines.registry.tiny import SD_SCHEDULER_CONFIG
from tests.conftest import write_parquet

REG = ModelRegistry()
EMBEDDED = json.loads((EMBEDDED_DIR / "scheduler" / "scheduler_config.json").read_text())  # DDIM, leading
TINY = dict(diffusers.PNDMScheduler(**SD_SCHEDULER_CONFIG).config)  # as the loaded tiny-random model has it
EPS = scheduler_names("eps")
# Before the fallback these gave an error row at 1000 steps on tiny-random (whose config is
# stable-diffusion-v1-5's: PNDM, leading, steps_offset=1): IndexError for timestep 1000 in the
# first three, NaN from a repeated timestep in the rest. On the embedded model (DDIM config,
# "leading" named explicitly, so every scheduler inherits it) all but lcm and the Karras ones
# had an invalid list at 1000 steps, and dpmpp_2m*, deis and unipc at 999 too.
USED_TO_FAIL_ON_TINY = ["ddim", "ddpm", "pndm", "deis", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
# end to end at the max: one of each failure kind (~20 s per 1000 steps on 2 CPU cores), and lcm
END_TO_END = ["ddim", "dpmpp_2m", "lcm"]


def top(name):
    return max_steps(name)[0] if max_steps(name) else MAX_STEPS


def raw_scheduler(name, config):
    """What diffusers alone builds, without diffsweep's fallback."""
    return getattr(diffusers, SCHEDULERS[name].cls).from_config(dict(config), **SCHEDULERS[name].overrides)


def random_output_loop(sched, steps, seed=0):
    """The denoising loop with random model outputs: every timestep stepped, final latents."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, generator=g) * getattr(sched, "init_noise_sigma", 1.0)
    kwargs = {"generator": g} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)
        x = sched.step(torch.randn(1, 4, 4, 4, generator=g), t, x, return_dict=False, **kwargs)[0]
    return x


def test_limits():
    assert LCM_ORIGINAL_INFERENCE_STEPS == diffusers.LCMScheduler().config.original_inference_steps
    assert max_steps("lcm")[0] == 50 and "original_inference_steps" in max_steps("lcm")[1]
    assert max_steps("lcm", {"original_inference_steps": 100})[0] == 100
    for name in EPS:
        if name != "lcm":
            assert max_steps(name)[0] == MAX_STEPS
            assert max_steps(name, {"num_train_timesteps": 500})[0] == 500
    assert all(max_steps(name) is None for name in scheduler_names("flow"))


@pytest.mark.parametrize("name", EPS)
def test_timesteps_in_range_and_unchanged_wherever_they_were_valid(name):
    for config in (EMBEDDED, TINY):  # stable-diffusion-v1-5's config gives TINY's timesteps
        ours, theirs = make_scheduler(name, config), raw_scheduler(name, config)
        train = config["num_train_timesteps"]
        for n in (1, 2, 25, 50, 998, 999, 1000):
            if n > top(name):
                continue
            ours.set_timesteps(n)  # the same instance again: each call starts from the model's spacing
            theirs.set_timesteps(n)
            karras = SCHEDULERS[name].overrides.get("use_karras_sigmas")  # rounded timesteps may repeat

            def valid(ts):
                return 0 <= ts.min() and ts.max() < train and (karras or len(torch.unique(ts)) >= n)

            ts, raw = ours.timesteps.double(), theirs.timesteps.double()
            assert valid(ts), (name, n, ts.min(), ts.max(), len(torch.unique(ts)))
            if valid(raw):  # the standard list was valid: kept
                assert torch.equal(ts, raw), (name, n)
                assert ours.config.timestep_spacing == theirs.config.timestep_spacing
            else:
                assert ours.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("name", EPS)
def test_random_output_loop_at_the_max_is_finite(name):
    configs = {"embedded": EMBEDDED, **({"tiny": TINY} if name in USED_TO_FAIL_ON_TINY else {})}
    for label, config in configs.items():  # on tiny the others' standard lists are valid and kept
        x = random_output_loop(make_scheduler(name, config, seeds=[0]), top(name))
        assert torch.isfinite(x).all(), (name, label)


@pytest.mark.parametrize("name", scheduler_names("flow"))
def test_flow_schedulers_run_the_whole_range(name):
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    for n in (1, 2, 999, 1000):
        sched = make_scheduler(name, config, family="flow")
        x = random_output_loop(sched, n)
        assert len(torch.unique(sched.timesteps)) == n and torch.isfinite(x).all()


def test_lcm_beyond_its_limit_really_cannot_run():
    with pytest.raises(ValueError, match="original_steps"):
        make_scheduler("lcm", TINY).set_timesteps(LCM_ORIGINAL_INFERENCE_STEPS + 1)


@pytest.mark.parametrize("name", END_TO_END)
def test_generate_at_the_max_steps_is_ok(tiny_model, name):
    rows = validate_manifest(pa.table({"prompt": ["a red circle"], "scheduler": [name], "steps": [top(name)],
                                       "guidance": [1.0]}), REG, default_model="tiny-random").to_pylist()
    result = generate(tiny_model, rows)[0]
    assert result.status == "ok", result.error
    assert result.pixels.shape == (32, 32, 3)


def test_steps_beyond_a_schedulers_limit_exit_2_and_write_nothing(tmp_path, capsys):
    manifest = write_parquet(tmp_path / "m.parquet", [
        dict(prompt="a", model="tiny-random", scheduler="lcm", steps=50),
        dict(prompt="b", model="tiny-random", scheduler="lcm", steps=51),
        dict(prompt="c", model="embedded", scheduler="ddim", steps=1000),
    ])
    out = tmp_path / "out"
    assert gen_job.main([str(manifest), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 problem(s)" in err, err
    assert "row 1, column 'steps': got 51; expected an integer in [1, 50] for scheduler 'lcm'" in err
    assert "original_inference_steps=50" in err
    assert not out.exists()
