"""Speed options: how fast a loaded pipeline runs, never what it draws.

Each option keeps the model's numbers up to the floating-point tolerance of the chosen
precision (tested: <= 1/255 per pixel on CPU float32), so they are job options
(`jobs/generate.py --channels-last --fuse-qkv --compile MODE`), recorded in `_run.json`, not manifest
columns. Half precision is the separate `--dtype` option because it changes pixels by more
than that (see docs/performance.md).

- channels_last: NHWC memory layout for the UNet and VAE convolutions (cuDNN's fast path on
  tensor cores).
- fuse_qkv: one matmul for an attention layer's query, key and value projections (key and
  value for cross-attention) in the UNet and VAE, diffusers' `fuse_qkv_projections`: fewer,
  larger GEMMs. Models with added KV projections (some SDXL-refiner/IP-adapter setups) and
  transformers without the method are left as they are.
- compile: `torch.compile` of the UNet and of the VAE decoder, the two places the time goes.
  The first calls compile (seconds to minutes: the warm-up pays it, and the benchmark
  reports it apart); after that, other schedulers, step counts and guidance scales of the
  same image size reuse the graphs, because they change tensor values, not shapes. Batch
  sizes may vary: after the first new size torch marks the batch dimension dynamic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: str = "none"  # a torch.compile mode, or "none"

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.compile!r}; allowed: {', '.join(COMPILE_MODES)}")

    def as_dict(self) -> dict:
        return asdict(self)


def apply_speed_options(pipe, options: SpeedOptions):
    """Apply `options` to a loaded diffusers pipeline in place; returns it."""
    import torch

    if options.channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and hasattr(module, "fuse_qkv_projections") and not _has_added_kv(module):
                module.fuse_qkv_projections()
    if options.compile != "none":
        if getattr(pipe, "unet", None) is not None:
            pipe.unet = torch.compile(pipe.unet, mode=options.compile)
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=options.compile)
    return pipe


def _has_added_kv(module) -> bool:
    """diffusers cannot fuse attention processors with added KV projections (it raises)."""
    return any("Added" in type(p).__name__ for p in module.attn_processors.values())


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
