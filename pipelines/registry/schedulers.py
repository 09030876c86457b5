"""Scheduler registry: the names users know -> a diffusers class plus config overrides.

Schedulers are stateful (timesteps, step index, multistep history), so a fresh one is
built for every generation call with `Class.from_config(model's original config, **overrides)`
-- the diffusers way to swap samplers without touching the model's noise schedule.

Step counts: every "eps" scheduler runs any count from 1 to the model's number of train
timesteps (1000 for every built-in model). The standard spacings break at the top of that
range ("leading" with steps_offset=1 asks for timestep 1000 of 0..999; "linspace" and
"leading" in the multistep solvers repeat timesteps, a zero step size, NaN), so where -- and
only where -- the model's own spacing gives an invalid list, `set_timesteps` falls back to
"trailing" spacing, which at N == train timesteps is every train timestep once. Counts whose
standard list is valid keep it, so their pixels do not change. LCM runs at most its
`original_inference_steps` (50 unless the model's config says otherwise): `max_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.errors import InputError


@dataclass(frozen=True)
class SchedulerSpec:
    cls: str  # diffusers class name
    overrides: dict = field(default_factory=dict)
    family: str = "eps"  # "eps": DDPM-trained (epsilon/v) models; "flow": flow-matching models
    seeded_noise_sampler: bool = False  # draws SDE noise from a Brownian tree seeded per row


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    "lms_karras": SchedulerSpec("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler"),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "dpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", _DPMPP),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP, "use_karras_sigmas": True}),
    "dpmpp_2m_sde": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP, "algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": SchedulerSpec("DPMSolverSDEScheduler", seeded_noise_sampler=True),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
    "deis": SchedulerSpec("DEISMultistepScheduler"),
    "lcm": SchedulerSpec("LCMScheduler"),
    "flow_match_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", family="flow"),
    "flow_match_heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler", family="flow"),
}


class UnknownSchedulerError(InputError):
    pass


DEFAULT_TRAIN_TIMESTEPS = 1000  # diffusers' default num_train_timesteps, and every built-in model's
LCM_ORIGINAL_INFERENCE_STEPS = 50  # LCMScheduler's default original_inference_steps


def max_steps(name: str, base_config: dict | None = None) -> tuple[int, str] | None:
    """The most inference steps scheduler `name` can run on a model with scheduler config
    `base_config` (None: the standard config, as for hub models not read at validation),
    and why; None where the scheduler itself sets no limit. Needs no diffusers, so
    manifests are validated without it."""
    spec = SCHEDULERS[name]
    cfg = dict(base_config or {})
    if spec.family == "flow":  # continuous sigmas: no train-timestep grid to run out of
        return None
    train = int(cfg.get("num_train_timesteps") or DEFAULT_TRAIN_TIMESTEPS)
    if spec.cls == "LCMScheduler":
        original = int(spec.overrides.get("original_inference_steps")
                       or cfg.get("original_inference_steps") or LCM_ORIGINAL_INFERENCE_STEPS)
        if original < train:
            return original, f"LCM samples from a schedule of original_inference_steps={original} timesteps"
    return train, f"one step per train timestep (num_train_timesteps={train})"


def local_scheduler_config(source: str) -> dict | None:
    """The scheduler config of a local diffusers model directory, or None (hub ids, built-ins,
    unreadable files): cheap enough to read at manifest validation."""
    import json
    from pathlib import Path

    try:
        path = Path(source).expanduser() / "scheduler" / "scheduler_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _valid_timesteps(sched, num_inference_steps: int) -> bool:
    """In [0, num_train_timesteps), and (unless the sigmas come from a Karras/exponential/beta
    formula, whose rounded timesteps may repeat harmlessly) `num_inference_steps` distinct
    values: a repeat is a zero-length step (NaN in the multistep solvers). Second-order
    schedulers repeat or interleave timesteps by design but never have fewer distinct ones."""
    import torch

    ts = torch.as_tensor(sched.timesteps).double()
    if not ts.numel() or ts.min() < 0 or ts.max() >= sched.config.num_train_timesteps:
        return False
    if any(sched.config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        return True
    return torch.unique(ts).numel() >= num_inference_steps


def _with_fallback_spacing(sched):
    """Give `sched` a `set_timesteps` that, when the model's own spacing gives an invalid
    timestep list for this step count, uses "trailing" spacing instead -- only then: valid
    lists are kept, and so are the pixels of every step count that worked before."""
    import types

    if sched.config.get("timestep_spacing") in (None, "trailing"):
        return sched
    sched._model_timestep_spacing = sched.config.timestep_spacing
    sched.set_timesteps = types.MethodType(_set_timesteps_with_fallback, sched)  # deepcopy rebinds it
    return sched


def _set_timesteps_with_fallback(self, num_inference_steps=None, *args, **kwargs):
    original = type(self).set_timesteps
    spacing = self._model_timestep_spacing
    if self.config.timestep_spacing != spacing:  # called again: start from the model's spacing
        self.register_to_config(timestep_spacing=spacing)
    original(self, num_inference_steps, *args, **kwargs)
    custom = any(kwargs.get(k) is not None for k in ("timesteps", "sigmas"))
    if custom or num_inference_steps is None or _valid_timesteps(self, int(num_inference_steps)):
        return
    self.register_to_config(timestep_spacing="trailing")
    original(self, num_inference_steps, *args, **kwargs)
    if not _valid_timesteps(self, int(num_inference_steps)):  # no better: keep the model's own
        self.register_to_config(timestep_spacing=spacing)
        original(self, num_inference_steps, *args, **kwargs)


def scheduler_names(family: str | None = None) -> list[str]:
    """Registry names, optionally only those that fit a model family ("eps" or "flow")."""
    return sorted(n for n, s in SCHEDULERS.items() if family is None or s.family == family)


def check_scheduler(name: str, family: str = "eps") -> SchedulerSpec:
    """The spec for `name`, or an error listing the names valid for this model family."""
    spec = SCHEDULERS.get(name)
    if spec is None:
        raise UnknownSchedulerError(
            f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}"
        )
    if spec.family != family:
        raise UnknownSchedulerError(
            f"scheduler {name!r} is for {spec.family!r} models but this model is {family!r}; "
            f"valid names: {', '.join(scheduler_names(family))}"
        )
    return spec


def make_scheduler(name: str, base_config: dict, family: str = "eps", seeds: list[int] | None = None):
    """A fresh scheduler `name` built from the model's original scheduler config.

    `seeds` (one per image) seed the Brownian-tree noise of SDE samplers that draw it
    from a tree instead of the per-row generators, so their noise is per-row too.
    """
    import diffusers  # here, not at the top: validating manifests and evaluating need no diffusers

    spec = check_scheduler(name, family)
    cls = getattr(diffusers, spec.cls)
    overrides = dict(spec.overrides)
    if spec.seeded_noise_sampler and seeds is not None:
        overrides["noise_sampler_seed"] = [int(s) for s in seeds]
    sched = cls.from_config(dict(base_config), **overrides)
    return _with_fallback_spacing(sched) if spec.family == "eps" else sched
