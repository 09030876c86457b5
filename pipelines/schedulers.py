"""Scheduler registry: the names users know -> a diffusers class plus config overrides.

Schedulers are stateful (timesteps, step index, multistep history), so a fresh one is
built for every generation call with `Class.from_config(model's original config, **overrides)`
-- the diffusers way to swap samplers without touching the model's noise schedule.
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
    return cls.from_config(dict(base_config), **overrides)
