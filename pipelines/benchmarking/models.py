"""The models a benchmark times: real architectures with random weights, or registry models."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from pipelines.benchmarking.memory import free


def resolve_models(names: list[str] | None, models_file: str | None, dtype_flag: str, work_dir: Path,
                   device: str, speed=None) -> dict:
    """name -> (ModelSpec, "random" | "trained", architecture name or None). sd15/sdxl (unless the
    user's --models file names them) are built with random weights and saved as a local
    diffusers directory, so plain diffusers, the actor and the Ray job all load the same
    files the usual way. `names` None: the device's default models. `speed` (SpeedOptions):
    an option a model (or its refiner) cannot take is refused as jobs/generate.py refuses it,
    before anything is built."""
    from pipelines.benchmarking.architectures import ARCHITECTURES
    from pipelines.generation.speed import check_speed_options
    from pipelines.registry.models import ModelRegistry, load_models_yaml
    from pipelines.registry.loading import check_available, resolve_dtype

    registry = ModelRegistry.with_user_file(models_file)
    user = set(load_models_yaml(models_file)) if models_file else set()
    if not names:
        names = ["sd15", "sdxl"] + (["embedded"] if embedded_built() else []) if device == "cuda" else [cpu_default()]
    if speed is not None:
        built = {n: ARCHITECTURES[n].get("transformer", (None, None))[1] for n in names
                 if n in ARCHITECTURES and n not in user}
        check_speed_options(speed, registry.with_refiners(names).values(), built)
    out = {}
    for name in names:
        spec = registry.get(name)
        if name in ARCHITECTURES and name not in user:
            target = build_random(name, resolve_dtype(spec, device, dtype_flag), work_dir, device)
            out[name] = (replace(spec, source=str(target), variant=None), "random", name)
        else:
            check_available(spec)
            out[name] = (spec, "random" if name == "tiny-random" else "trained", None)
    return out


def build_random(arch: str, dtype: str, work_dir: Path, device: str) -> Path:
    """work_dir/<arch>-random-<dtype>: the architecture with random weights, built once."""
    from pipelines.benchmarking.architectures import build_random_pipeline

    target = work_dir / f"{arch}-random-{dtype}"
    if not (target / "model_index.json").is_file():
        print(f"[benchmark] building {arch} with random weights ({dtype}) in {target}", file=sys.stderr)
        pipe = build_random_pipeline(arch, dtype=dtype, device=device)
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        pipe.save_pretrained(staging, safe_serialization=True)
        os.replace(staging, target)  # a half-written directory is never reused
        del pipe
        free(device)
    return target


def embedded_built() -> bool:
    from pipelines.registry.models import EMBEDDED_DIR

    return (EMBEDDED_DIR / "model_index.json").is_file()


def cpu_default() -> str:
    if embedded_built():
        return "embedded"
    print("[benchmark] the embedded model is not built yet (pipelines/embedded/model); using tiny-random",
          file=sys.stderr)
    return "tiny-random"


def pipe_for_flops(spec, arch: str | None):
    """FLOPs need only the architecture: a meta-device build when it is a known one, else the model's configs."""
    from pipelines.benchmarking.architectures import build_random_pipeline
    from pipelines.registry.loading import load_model

    if arch is not None:
        return build_random_pipeline(arch, device="meta")
    return load_model(spec, "cpu", "float32").pipe  # only the components' configs are used
