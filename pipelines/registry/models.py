"""Model registry: a name -> where the weights are and how the model likes to be run.

The manifest names models; only this registry (job configuration, trusted) maps a name
to a hub id or a local directory. That is the trust boundary: a manifest row cannot
make a worker load an arbitrary path, run remote code, or unpickle a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
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
    "max_sequence_length": (lambda v: v is None or _positive_int(v), "a positive integer (T5 tokens) or null"),
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


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A pipeline ready to generate, with what generation needs to know about it."""

    spec: ModelSpec
    pipe: object
    scheduler_config: dict  # the model's original scheduler config; new schedulers derive from it
    digest: str
    device: str
    dtype: str
    load_seconds: float = 0.0
    extras: dict = field(default_factory=dict)
    quant: str = "none"
    quant_record: dict = field(default_factory=dict)  # quant_backend, quant_scheme, quant_version


def resolve_dtype(spec: ModelSpec, device: str, requested: str = "auto") -> str:
    """fp32 on CPU (half is slow and inexact there); the model's safe half type on a GPU."""
    if requested != "auto":
        if requested not in ("float16", "bfloat16", "float32"):
            raise ModelConfigError(f"--dtype {requested!r}: expected auto, float16, bfloat16 or float32")
        return requested
    return spec.gpu_dtype if device.startswith("cuda") else "float32"


def _refuse_pickles(directory: Path, name: str) -> None:
    """Refuse a model any of whose components has only pickled weights (loading those can
    run arbitrary code). Components are checked folder by folder."""
    pickled = [p for p in directory.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    unsafe = sorted({p.parent for p in pickled if not any(p.parent.glob("*.safetensors"))})
    if unsafe:
        rel = ", ".join(str(d.relative_to(directory)) or "." for d in unsafe[:4])
        raise ModelConfigError(
            f"model {name!r}: {directory} has components with only pickled weights ({rel}); diffsweep loads "
            "safetensors only. Convert them (load once in a trusted session, then "
            "save_pretrained(..., safe_serialization=True))."
        )


def directory_digest(directory: Path) -> str:
    """Content fingerprint of a model directory: configs and weights, by file."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".model"):
            h.update(str(p.relative_to(directory)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _module_digest(pipe) -> str:
    h = hashlib.sha256()
    for comp_name, comp in sorted(pipe.components.items()):
        if hasattr(comp, "state_dict"):
            for k, v in comp.state_dict().items():
                h.update(f"{comp_name}.{k}".encode())
                h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def check_available(spec: ModelSpec) -> None:
    """Fail on the driver, before any worker starts, when a model certainly cannot load:
    a `pipeline:` class diffusers does not have; a missing local directory, or one whose
    model_index.json or component config.json does not parse, names a component folder
    that is missing, or has a component without safetensors weights; pickled weights;
    (offline) a hub model absent from the cache. Each names the model, the file and the cause."""
    if spec.source.startswith(BUILTIN_PREFIX):
        return
    local = Path(spec.source).expanduser()
    if local.is_dir():
        index_path = local / "model_index.json"
        if not index_path.is_file():
            raise ModelNotFoundError(
                f"model {spec.name!r}: {local} has no model_index.json; 'source' must be a diffusers model "
                "directory (as written by save_pretrained)"
            )
        index = _read_json(spec, index_path)
        if not isinstance(index, dict):
            raise ModelConfigError(f"model {spec.name!r}: {index_path}: expected a JSON object, got {type(index).__name__}")
        _pipeline_class(spec, index, index_path)
        _refuse_pickles(local, spec.name)
        _check_components(spec, local, index)
        return
    if spec.source.startswith(("/", ".", "~")) or spec.name == "embedded":
        raise ModelNotFoundError(
            f"model {spec.name!r}: local directory {spec.source!r} does not exist"
            + ("; the embedded model ships with diffsweep: reinstall it or run jobs/train_embedded.py"
               if spec.name == "embedded" else "; point 'source' in your --models YAML at a diffusers model directory")
        )
    _pipeline_class(spec)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        hit = try_to_load_from_cache(spec.source, "model_index.json", revision=spec.revision)
        if not isinstance(hit, str):
            raise ModelNotFoundError(
                f"model {spec.name!r}: hub repo {spec.source!r} is not in the Hugging Face cache {HF_HUB_CACHE} "
                "and HF_HUB_OFFLINE is set. Download it where the Hub is reachable (huggingface-cli download "
                f"{spec.source}), or write a models YAML with 'source: /path/to/local/copy' and pass --models FILE"
            )


def _pipeline_class(spec: ModelSpec, index: dict | None = None, index_path: Path | None = None):
    """The diffusers class that loads `spec` (AutoPipelineForText2Image for 'auto'); with 'auto' and a
    local model_index.json, also checks that diffusers has the class that file names."""
    import diffusers

    def lookup(name: str):
        try:
            cls = getattr(diffusers, name, None)
        except Exception as e:  # an optional dependency of that pipeline is missing
            raise ModelConfigError(f"model {spec.name!r}: diffusers pipeline class {name!r} cannot be imported: "
                                   f"{one_line(str(e), 160)}") from None
        if isinstance(cls, type) and (issubclass(cls, diffusers.DiffusionPipeline) or name.startswith("AutoPipeline")):
            return cls
        return None

    def unknown(name: str, where: str):
        import difflib

        close = difflib.get_close_matches(name, [n for n in dir(diffusers) if n.endswith("Pipeline")], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see diffusers' pipeline classes, or use 'auto'"
        return ModelConfigError(f"model {spec.name!r}: {where} {name!r}: diffusers {diffusers.__version__} has no "
                                f"pipeline class of that name{hint}")

    if spec.pipeline != "auto":
        cls = lookup(spec.pipeline)
        if cls is None:
            raise unknown(spec.pipeline, "key 'pipeline'")
        return cls
    named = (index or {}).get("_class_name")
    if named is not None:
        if not isinstance(named, str) or lookup(named) is None:
            raise unknown(str(named), f"{index_path} names _class_name")
    return diffusers.AutoPipelineForText2Image


_NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler", "Processor", "FeatureExtractor")  # class-name endings
_NEVER_LOADED = {"safety_checker"}  # _from_pretrained passes safety_checker=None


def _read_json(spec: ModelSpec, path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelConfigError(f"model {spec.name!r}: {path} is not valid JSON: {one_line(str(e), 160)}") from None
    except OSError as e:
        raise ModelNotFoundError(f"model {spec.name!r}: cannot read {path}: {e.strerror or e}") from None


def _check_components(spec: ModelSpec, local: Path, index: dict) -> None:
    """Every component model_index.json names has its folder; a model component (a folder with
    a config.json) has a config that parses and safetensors weights."""
    missing, unweighted = [], []
    for comp, value in index.items():
        if comp.startswith("_") or comp in _NEVER_LOADED or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is None or class_name is None:
            continue  # an absent optional component
        folder = local / comp
        if not folder.is_dir():
            missing.append(f"{comp}/ ({library} {class_name})")
            continue
        for config_name in ("config.json", "scheduler_config.json"):
            if (folder / config_name).is_file():
                _read_json(spec, folder / config_name)
        weights_expected = (folder / "config.json").is_file() and not str(class_name).endswith(_NO_WEIGHTS)
        if weights_expected and not any(folder.glob("*.safetensors")):
            unweighted.append(f"{comp}/")
    if missing:
        raise ModelNotFoundError(f"model {spec.name!r}: {local / 'model_index.json'} names components whose folders "
                                 f"are missing in {local}: {', '.join(missing)}")
    if unweighted:
        raise ModelNotFoundError(f"model {spec.name!r}: component folder(s) {', '.join(unweighted)} in {local} have a "
                                 "config.json but no *.safetensors weights (diffsweep loads safetensors only)")


def load_model(spec: ModelSpec, device: str = "cpu", dtype: str = "auto", quant: str = "none") -> LoadedModel:
    """Load `spec`'s pipeline onto `device`, its weights quantized with scheme `quant`
    (pipelines/registry/quant.py). Safetensors only, never remote code."""
    import torch

    from pipelines.registry import quant as q

    t0 = time.perf_counter()
    dtype = resolve_dtype(spec, device, dtype)
    torch_dtype = getattr(torch, dtype)
    if spec.source == BUILTIN_PREFIX + "tiny-random":
        from pipelines.registry.tiny import build_tiny_sd_pipeline

        pipe = build_tiny_sd_pipeline().to(device)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        digest = _module_digest(pipe)
        components = q.components_of(pipe.components, spec.quantize_text_encoders)
        q.quantize_built(pipe, quant, components)
    else:
        components = q.components_of(_component_names(spec), spec.quantize_text_encoders)
        pipe, digest = _from_pretrained(spec, torch_dtype, q.pipeline_config(quant, components, torch_dtype))
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # a sweep measures the model, not a filter that blanks images
    return LoadedModel(
        spec=spec,
        pipe=pipe,
        scheduler_config=dict(pipe.scheduler.config),
        digest=digest,
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - t0,
        quant=quant,
        quant_record=q.record(quant, [c for c in components if getattr(pipe, c, None) is not None]),
    )


def _component_names(spec: ModelSpec) -> list[str]:
    """The pipeline's component names, before loading: a local model_index.json's, else the
    pipeline class's signature (hub models)."""
    index = Path(spec.source).expanduser() / "model_index.json"
    if index.is_file():
        return [k for k in _read_json(spec, index) if not k.startswith("_")]
    import inspect

    from pipelines.registry.quant import DENOISERS, TEXT_ENCODERS

    names = list(inspect.signature(_pipeline_class(spec).__init__).parameters)
    return names if set(names) & set(DENOISERS) else list(DENOISERS + TEXT_ENCODERS)  # auto: whichever it has


def _dtype_kwarg() -> str:
    """diffusers 0.42 takes `dtype=` and warns that `torch_dtype=` is deprecated; older ones take only torch_dtype."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _from_pretrained(spec: ModelSpec, torch_dtype, quantization_config=None):
    check_available(spec)  # unknown pipeline class, missing/damaged directory, pickled weights, offline cache miss
    cls = _pipeline_class(spec)
    local = Path(spec.source).expanduser()
    is_local = local.is_dir()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = {_dtype_kwarg(): torch_dtype, "use_safetensors": True, "local_files_only": offline or is_local}
    if spec.variant and not is_local:
        kwargs["variant"] = spec.variant
    if spec.revision:
        kwargs["revision"] = spec.revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if "safety_checker" in getattr(cls, "_optional_components", []) or spec.pipeline == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(local) if is_local else spec.source, **kwargs)
    except (OSError, EnvironmentError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"local directory {local}" if is_local else (
            f"the Hugging Face cache {HF_HUB_CACHE} (offline)" if offline else f"the Hub repo {spec.source!r} and the cache {HF_HUB_CACHE}")
        raise ModelNotFoundError(
            f"model {spec.name!r}: could not load {spec.source!r} from {where}: {str(e).splitlines()[0]}. "
            f"To use a local copy, write a models YAML (models: {{{spec.name}: {{source: /path/to/dir}}}}) "
            "and pass --models FILE; safetensors weights are required."
        ) from None
    digest = directory_digest(local) if is_local else _hub_digest(spec, pipe)
    return pipe, digest


def _hub_digest(spec: ModelSpec, pipe) -> str:
    """A hub snapshot is named by its commit; that is its content identity."""
    path = getattr(pipe, "config", {}).get("_name_or_path", "") if hasattr(pipe, "config") else ""
    parts = Path(str(path)).parts
    if "snapshots" in parts:
        return parts[parts.index("snapshots") + 1][:16]
    return hashlib.sha256(f"{spec.source}@{spec.revision}".encode()).hexdigest()[:16]


def spec_record(spec: ModelSpec) -> dict:
    return asdict(spec)
