"""Loading a registered model: availability checked on the driver before any worker starts,
then the pipeline built from safetensors (never remote code, never a pickle), on its device,
in its dtype, with its weights quantized as the row asks, and a content digest for provenance.

pipelines/registry/models.py says *what* a model is (the trusted name -> source mapping);
this module is *how* it is brought into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.registry.families import check_loaded_variant
from pipelines.registry.models import BUILTIN_PREFIX, ModelConfigError, ModelNotFoundError, ModelSpec
from pipelines.safe_yaml import one_line


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
    check_loaded_variant(spec, pipe)  # a FLUX transformer of the variant the rows were validated for
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
