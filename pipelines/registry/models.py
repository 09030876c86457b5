"""Model registry: a name -> where the weights are and how the model likes to be run.

The manifest names models; only this registry (job configuration, trusted) maps a name
to a hub id or a local directory. That is the trust boundary: a manifest row cannot
make a worker load an arbitrary path, run remote code, or unpickle a checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from pipelines.embedded import MODEL_DIR as EMBEDDED_DIR
from pipelines.errors import InputError
from pipelines.registry.schedulers import SCHEDULERS, check_scheduler
from pipelines.safe_yaml import describe, load_yaml, one_line, short_repr

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the job needs to know about a model before loading it."""

    name: str
    source: str  # hub id ("org/repo"), local directory, or "builtin:<name>"
    scheduler: str  # default scheduler (registry name)
    steps: int
    guidance: float
    height: int
    width: int
    pipeline: str = "auto"  # diffusers pipeline class name; "auto" = AutoPipelineForText2Image
    family: str = "eps"  # "eps" (DDPM-trained) or "flow" (flow matching): which schedulers fit
    size_factor: int = 8  # height and width must be multiples of this
    max_prompt_tokens: int = 77  # text encoder limit; longer prompts are truncated (recorded)
    max_sequence_length: int | None = None  # T5 tokens (SD3, FLUX); None: the family's default (registry.families)
    guidance_embeds: bool | None = None  # FLUX: dev (True) or schnell (False); None: read from transformer/config.json
    refiner: str | None = None  # SDXL: a registered img2img model that finishes rows with denoising_end < 1
    gpu_dtype: str = "float16"  # half precision that is safe for this model on a GPU
    variant: str | None = None  # diffusers weight variant, e.g. "fp16"
    revision: str | None = None
    quantize_text_encoders: bool = False  # a `quant` scheme also quantizes the text encoders (else the denoiser only)
    base: str | None = None  # the built-in model a --models entry inherits from ('base:'); LoRA 'fits' match it

    def defaults(self) -> dict:
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance": self.guidance,
            "height": self.height,
            "width": self.width,
        }


BUILTIN_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("embedded", str(EMBEDDED_DIR), "ddim", 25, 7.5, 64, 64, pipeline="StableDiffusionPipeline",
                  gpu_dtype="float32", max_prompt_tokens=32),
        ModelSpec("tiny-random", BUILTIN_PREFIX + "tiny-random", "pndm", 10, 7.5, 32, 32,
                  pipeline="StableDiffusionPipeline", gpu_dtype="float32"),
        ModelSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "pndm", 50, 7.5, 512, 512,
                  pipeline="StableDiffusionPipeline"),
        ModelSpec("sd21", "stabilityai/stable-diffusion-2-1", "ddim", 50, 7.5, 768, 768,
                  pipeline="StableDiffusionPipeline"),
        ModelSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "euler", 30, 5.0, 1024, 1024,
                  pipeline="StableDiffusionXLPipeline", variant="fp16"),
        # SDXL 1.0's refiner: no row names it; a base names it as its `refiner` (sdxl: {base: sdxl, refiner:
        # sdxl-refiner} in a models YAML), so plain SDXL runs never need its weights.
        ModelSpec("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", "euler", 30, 5.0, 1024, 1024,
                  pipeline="StableDiffusionXLImg2ImgPipeline", variant="fp16"),
        ModelSpec("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", "flow_match_euler", 40, 4.5, 1024, 1024,
                  pipeline="StableDiffusion3Pipeline", family="flow", size_factor=16, gpu_dtype="bfloat16"),
        ModelSpec("flux-schnell", "black-forest-labs/FLUX.1-schnell", "flow_match_euler", 4, 0.0, 1024, 1024,
                  pipeline="FluxPipeline", family="flow", size_factor=16, gpu_dtype="bfloat16",
                  max_sequence_length=256, guidance_embeds=False),
        ModelSpec("flux-dev", "black-forest-labs/FLUX.1-dev", "flow_match_euler", 50, 3.5, 1024, 1024,
                  pipeline="FluxPipeline", family="flow", size_factor=16, gpu_dtype="bfloat16",
                  max_sequence_length=512, guidance_embeds=True),
    ]
}


class ModelConfigError(InputError):
    """A bad models YAML or an unknown model name."""


class ModelNotFoundError(InputError):
    """The weights of a registered model could not be found."""


class ModelRegistry:
    def __init__(self, specs: dict[str, ModelSpec] | None = None, loras: dict | None = None):
        from pipelines.registry.loras import BUILTIN_LORAS

        self.specs = dict(BUILTIN_MODELS if specs is None else specs)
        self.loras = dict(BUILTIN_LORAS if loras is None else loras)  # adapter name -> LoraSpec

    def names(self) -> list[str]:
        return sorted(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise ModelConfigError(f"unknown model {name!r}; registered models: {', '.join(self.names())}")
        return self.specs[name]

    def with_refiners(self, names) -> dict[str, ModelSpec]:
        """The specs of models `names` and of their refiners: what the workers must be able to load."""
        specs = {n: self.get(n) for n in names}
        return specs | {s.refiner: self.get(s.refiner) for s in list(specs.values()) if s.refiner}

    @classmethod
    def with_user_file(cls, path: str | os.PathLike | None) -> "ModelRegistry":
        """Built-ins plus (overridden by) the models of a user YAML file."""
        registry = cls()
        if path:
            registry.specs.update(load_models_yaml(path))
            registry.loras.update(load_loras_yaml(path))
        return registry


_SPEC_FIELDS = {f.name for f in fields(ModelSpec)}
_FULL_KEYS = ("source", "scheduler", "steps", "guidance", "height", "width")  # without 'base:'
_MAX_PROBLEMS = 20
T5_MAX_TOKENS = 512  # diffusers' SD3 and FLUX pipelines raise above this (check_inputs), so say it up front


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


# key -> (accepts the value?, what is expected); every ModelSpec field but 'name' (the mapping key)
_FIELD_TYPES: dict[str, tuple] = {
    "source": (_text, "a non-empty string: a hub id (org/repo), a local diffusers directory or builtin:tiny-random"),
    "scheduler": (_text, "a scheduler name (" + ", ".join(SCHEDULERS) + ")"),
    "steps": (_positive_int, "a positive integer"),
    "guidance": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                 "a finite number >= 0"),
    "height": (_positive_int, "a positive integer"),
    "width": (_positive_int, "a positive integer"),
    "pipeline": (lambda v: _text(v) and v.isidentifier() or v == "auto",
                 "a diffusers pipeline class name (e.g. StableDiffusionPipeline) or auto"),
    "family": (lambda v: v in ("eps", "flow") and isinstance(v, str), "'eps' (DDPM-trained) or 'flow' (flow matching)"),
    "size_factor": (_positive_int, "a positive integer"),
    "max_prompt_tokens": (_positive_int, "a positive integer"),
    "max_sequence_length": (lambda v: v is None or _positive_int(v) and v <= T5_MAX_TOKENS,
                            f"a positive integer (T5 tokens) up to {T5_MAX_TOKENS} or null: FluxPipeline and "
                            f"StableDiffusion3Pipeline refuse more than {T5_MAX_TOKENS} when called"),
    "guidance_embeds": (lambda v: v is None or isinstance(v, bool),
                        "true (FLUX-dev: guidance is embedded), false (FLUX-schnell) or null (read the transformer config)"),
    "refiner": (lambda v: v is None or _text(v), "a registered refiner model's name (an SDXL img2img model) or null"),
    "gpu_dtype": (lambda v: isinstance(v, str) and v in ("float16", "bfloat16", "float32"),
                  "float16, bfloat16 or float32"),
    "variant": (lambda v: v is None or _text(v), "a weight variant name (e.g. fp16) or null"),
    "revision": (lambda v: v is None or _text(v), "a hub revision (branch, tag or commit) or null"),
    "quantize_text_encoders": (lambda v: isinstance(v, bool), "true or false"),
}
assert set(_FIELD_TYPES) == _SPEC_FIELDS - {"name", "base"}
_ALLOWED_KEYS = ["base", *_FIELD_TYPES]


def load_models_yaml(path: str | os.PathLike) -> dict[str, ModelSpec]:
    """Parse a models file::

        models:
          my-sd15:
            source: /models/sd15          # or a hub id: org/repo
            base: sd15                    # optional: inherit defaults of a built-in model
            steps: 30                     # any ModelSpec field overrides
    Other top-level keys are ignored (a place for YAML anchors: `defaults: &d {...}`, then
    `<<: *d` in an entry). Every value is type-checked; every problem is reported (up to
    20) in one line naming the file, the model, the key, the value and what is expected.
    """
    try:
        doc = load_yaml(path, "--models")
    except InputError as e:
        raise ModelConfigError(str(e)) from None
    if isinstance(doc, dict) and "models" not in doc and "loras" in doc:
        return {}  # a file of adapters only
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        got = f"'models': {describe(doc.get('models'))}" if isinstance(doc, dict) else describe(doc)
        raise ModelConfigError(f"--models {path}: expected a mapping with a 'models:' mapping of name -> settings, "
                               f"got {got}")
    out: dict[str, ModelSpec] = {}
    problems: list[str] = []
    for name, entry in doc["models"].items():
        if not _text(name):
            problems.append(f"model name {describe(name)}: expected a non-empty string")
            continue
        where = f"model {name!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: got {describe(entry)}; expected a mapping of settings")
            continue
        mine = _entry_problems(entry)
        if mine:
            problems += [f"{where}, {p}" for p in mine]
            continue
        entry = dict(entry)
        base = BUILTIN_MODELS.get(entry.pop("base", None))
        if "guidance" in entry:
            entry["guidance"] = float(entry["guidance"])
        spec = replace(base, name=name, base=base.name, **entry) if base else ModelSpec(name=name, **entry)
        problems += [f"{where}, {p}" for p in _spec_problems(spec)]
        out[name] = spec
    problems += _refiner_problems(out)
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS])
        more = f"; ... and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
        raise ModelConfigError(f"--models {path}: {len(problems)} problem(s): {shown}{more}")
    return out


def load_loras_yaml(path: str | os.PathLike) -> dict:
    """The `loras:` section of a models file (pipelines/registry/loras.py), {} without one."""
    from pipelines.registry.loras import parse_loras

    doc = load_yaml(path, "--models")
    if not isinstance(doc, dict) or "loras" not in doc:
        return {}
    return parse_loras(doc["loras"], f"--models {path}", Path(path).expanduser().resolve().parent)


def _refiner_problems(specs: dict[str, ModelSpec]) -> list[str]:
    """A refiner is an SDXL img2img model, registered, and only SDXL base models have one (the
    ensemble-of-experts handoff is SDXL's: denoising_end / denoising_start)."""
    from pipelines.registry.families import pipeline_name

    problems = []
    for name, spec in specs.items():
        if spec.refiner is None:
            continue
        where = f"model {name!r}, key 'refiner'"
        refiner = specs.get(spec.refiner, BUILTIN_MODELS.get(spec.refiner))
        if pipeline_name(spec) != "StableDiffusionXLPipeline":
            problems.append(f"{where}: got {spec.refiner!r}; a refiner finishes SDXL base models only "
                            f"(StableDiffusionXLPipeline), and {name!r} is a {pipeline_name(spec)}")
        elif refiner is None:
            problems.append(f"{where}: got {spec.refiner!r}; expected a model registered in this file or built in "
                            f"({', '.join(sorted(set(specs) | set(BUILTIN_MODELS)))})")
        elif pipeline_name(refiner) not in ("StableDiffusionXLImg2ImgPipeline", "auto"):
            problems.append(f"{where}: got {spec.refiner!r}, a {pipeline_name(refiner)}; expected an SDXL img2img "
                            "model (StableDiffusionXLImg2ImgPipeline)")
    return problems


def _entry_problems(entry: dict) -> list[str]:
    """Key and type problems of one model's settings, before any ModelSpec is built."""
    problems = []
    for key, value in entry.items():
        if key == "name":
            problems.append("key 'name': not allowed; a model's name is its key under 'models:'")
        elif key == "base":
            if not isinstance(value, str) or value not in BUILTIN_MODELS:
                problems.append(f"key 'base': got {describe(value)}; expected a built-in model "
                                f"({', '.join(BUILTIN_MODELS)})")
        elif not isinstance(key, str) or key not in _FIELD_TYPES:
            problems.append(f"key {short_repr(key)}: unknown; allowed keys: {', '.join(_ALLOWED_KEYS)}")
        else:
            accepts, expected = _FIELD_TYPES[key]
            if not accepts(value):
                problems.append(f"key {key!r}: got {describe(value)}; expected {expected}")
    if "base" not in entry:
        missing = [k for k in _FULL_KEYS if k not in entry]
        if missing:
            problems.append(f"missing keys {missing} (or give 'base: <built-in model>' to inherit them)")
    return problems


def _spec_problems(spec: ModelSpec) -> list[str]:
    """Problems between keys, once every value has the right type."""
    problems = []
    if spec.source.startswith(BUILTIN_PREFIX) and spec.source[len(BUILTIN_PREFIX):] != "tiny-random":
        problems.append(f"key 'source': got {spec.source!r}; the only builtin source is 'builtin:tiny-random'")
    if spec.scheduler not in SCHEDULERS or SCHEDULERS[spec.scheduler].family != spec.family:
        try:
            check_scheduler(spec.scheduler, spec.family)
        except ValueError as e:
            problems.append(f"key 'scheduler': {one_line(str(e))}")
    return problems


def spec_record(spec: ModelSpec) -> dict:
    return asdict(spec)
