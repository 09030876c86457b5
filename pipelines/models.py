"""Model registry: a name -> where the weights are and how the model likes to be run.

The manifest names models; only this registry (job configuration, trusted) maps a name
to a hub id or a local directory. That is the trust boundary: a manifest row cannot
make a worker load an arbitrary path, run remote code, or unpickle a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from pipelines.errors import InputError
from pipelines.schedulers import SCHEDULERS, check_scheduler

EMBEDDED_DIR = Path(__file__).parent / "embedded" / "model"
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
    gpu_dtype: str = "float16"  # half precision that is safe for this model on a GPU
    variant: str | None = None  # diffusers weight variant, e.g. "fp16"
    revision: str | None = None

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
                  pipeline="FluxPipeline", family="flow", size_factor=16, gpu_dtype="bfloat16"),
    ]
}


class ModelConfigError(InputError):
    """A bad models YAML or an unknown model name."""


class ModelNotFoundError(InputError):
    """The weights of a registered model could not be found."""


class ModelRegistry:
    def __init__(self, specs: dict[str, ModelSpec] | None = None):
        self.specs = dict(BUILTIN_MODELS if specs is None else specs)

    def names(self) -> list[str]:
        return sorted(self.specs)

    def __contains__(self, name: str) -> bool:
        return name in self.specs

    def get(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise ModelConfigError(f"unknown model {name!r}; registered models: {', '.join(self.names())}")
        return self.specs[name]

    @classmethod
    def with_user_file(cls, path: str | os.PathLike | None) -> "ModelRegistry":
        """Built-ins plus (overridden by) the models of a user YAML file."""
        registry = cls()
        if path:
            registry.specs.update(load_models_yaml(path))
        return registry


_SPEC_FIELDS = {f.name for f in fields(ModelSpec)}
_REQUIRED = ("source",)


def load_models_yaml(path: str | os.PathLike) -> dict[str, ModelSpec]:
    """Parse a models file::

        models:
          my-sd15:
            source: /models/sd15          # or a hub id: org/repo
            base: sd15                    # optional: inherit defaults of a registered model
            steps: 30                     # any ModelSpec field overrides
    Every problem is reported with the model name and key.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ModelConfigError(f"--models: file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ModelConfigError(f"--models: {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise ModelConfigError(f"--models: {path} must be a mapping with a 'models:' mapping of name -> settings")
    out: dict[str, ModelSpec] = {}
    problems = []
    for name, entry in doc["models"].items():
        where = f"--models {path}: model {name!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping of settings, got {type(entry).__name__}")
            continue
        entry = dict(entry)
        base_name = entry.pop("base", None)
        base = BUILTIN_MODELS.get(base_name) if base_name else None
        if base_name and base is None:
            problems.append(f"{where}: base {base_name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")
            continue
        unknown = sorted(set(entry) - _SPEC_FIELDS)
        if unknown:
            problems.append(f"{where}: unknown keys {unknown}; allowed: {sorted(_SPEC_FIELDS - {'name'})}")
            continue
        if base is None and any(k not in entry for k in ("source", "scheduler", "steps", "guidance", "height", "width")):
            missing = [k for k in ("source", "scheduler", "steps", "guidance", "height", "width") if k not in entry]
            problems.append(f"{where}: missing keys {missing} (or give 'base: <built-in model>')")
            continue
        spec = replace(base, name=name, **entry) if base else ModelSpec(name=name, **entry)
        problems += [f"{where}: {p}" for p in _spec_problems(spec)]
        out[name] = spec
    if problems:
        raise ModelConfigError("; ".join(problems))
    return out


def _spec_problems(spec: ModelSpec) -> list[str]:
    problems = []
    if spec.source.startswith(BUILTIN_PREFIX) and spec.source[len(BUILTIN_PREFIX):] != "tiny-random":
        problems.append(f"source {spec.source!r}: the only builtin source is 'builtin:tiny-random'")
    if spec.family not in ("eps", "flow"):
        problems.append(f"family {spec.family!r}: expected 'eps' or 'flow'")
    elif spec.scheduler not in SCHEDULERS or SCHEDULERS[spec.scheduler].family != spec.family:
        try:
            check_scheduler(spec.scheduler, spec.family)
        except ValueError as e:
            problems.append(f"scheduler: {e}")
    for key in ("steps", "height", "width", "size_factor", "max_prompt_tokens"):
        v = getattr(spec, key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{key} {v!r}: expected a positive integer")
    if not isinstance(spec.guidance, (int, float)) or spec.guidance < 0:
        problems.append(f"guidance {spec.guidance!r}: expected a number >= 0")
    if spec.gpu_dtype not in ("float16", "bfloat16", "float32"):
        problems.append(f"gpu_dtype {spec.gpu_dtype!r}: expected float16, bfloat16 or float32")
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
    """Fail on the driver, before any worker starts, when weights certainly cannot be found:
    a missing local directory, or (offline) a hub model absent from the cache."""
    if spec.source.startswith(BUILTIN_PREFIX):
        return
    local = Path(spec.source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"model {spec.name!r}: {local} has no model_index.json; 'source' must be a diffusers model "
                "directory (as written by save_pretrained)"
            )
        _refuse_pickles(local, spec.name)
        return
    if spec.source.startswith(("/", ".", "~")) or spec.name == "embedded":
        raise ModelNotFoundError(
            f"model {spec.name!r}: local directory {spec.source!r} does not exist"
            + ("; the embedded model ships with diffsweep: reinstall it or run jobs/train_embedded.py"
               if spec.name == "embedded" else "; point 'source' in your --models YAML at a diffusers model directory")
        )
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


def load_model(spec: ModelSpec, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    """Load `spec`'s pipeline onto `device`. Safetensors only, never remote code."""
    import torch

    t0 = time.perf_counter()
    dtype = resolve_dtype(spec, device, dtype)
    torch_dtype = getattr(torch, dtype)
    if spec.source == BUILTIN_PREFIX + "tiny-random":
        from pipelines.tiny import build_tiny_sd_pipeline

        pipe = build_tiny_sd_pipeline().to(device)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        digest = _module_digest(pipe)
    else:
        pipe, digest = _from_pretrained(spec, torch_dtype)
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
    )


def _from_pretrained(spec: ModelSpec, torch_dtype):
    import diffusers

    cls = diffusers.AutoPipelineForText2Image if spec.pipeline == "auto" else getattr(diffusers, spec.pipeline, None)
    if cls is None:
        raise ModelConfigError(f"model {spec.name!r}: diffusers has no pipeline class {spec.pipeline!r}")
    check_available(spec)  # missing directory, pickled weights, offline cache miss
    local = Path(spec.source).expanduser()
    is_local = local.is_dir()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = dict(torch_dtype=torch_dtype, use_safetensors=True, local_files_only=offline or is_local)
    if spec.variant and not is_local:
        kwargs["variant"] = spec.variant
    if spec.revision:
        kwargs["revision"] = spec.revision
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
