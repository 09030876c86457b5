"""Speed options: how fast a loaded pipeline runs, never what it draws.

Each option keeps the model's numbers up to the floating-point tolerance of the chosen
precision (tested: <= 1/255 per pixel on CPU float32, for every family), so they are job options
(`jobs/generate.py --channels-last --fuse-qkv --compile MODE`), recorded in `_run.json`, not manifest
columns. Half precision is the separate `--dtype` option because it changes pixels by more
than that (see docs/performance.md). They apply to the denoiser, whatever the pipeline calls it
(`unet` for SD 1.x/2.x and SDXL, `transformer` for SD3 and FLUX), to the VAE, and to an SDXL
model's refiner; an option a model cannot take is refused before the run (`speed_problem`).

- channels_last: NHWC memory layout for the convolutions of the UNet and the VAE (cuDNN's
  fast path on tensor cores). SD3 and FLUX transformers are linear layers on patch tokens:
  there the VAE alone changes layout.
- fuse_qkv: one matmul for an attention layer's query, key and value projections (key and
  value for cross-attention; also the text stream's added projections in SD3/FLUX joint
  attention) in the denoiser and the VAE, diffusers' `fuse_qkv_projections`: fewer, larger
  GEMMs. UNets with added KV projections (some SDXL-refiner/IP-adapter setups) are left as they
  are. Refused for SD 3.5-type transformers (`qk_norm` or dual attention layers): diffusers'
  FusedJointAttnProcessor2_0 skips the q/k RMS norms (6/255 off on a tiny one) and fails on
  the self-attention-only second attention. Refused with LoRA adapters (`check_fused_loras`):
  the fused projection is built from the base weights and the adapter's q/k/v deltas are lost.
- compile: `torch.compile` of the denoiser and of the VAE decoder, the two places the time goes.
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


DENOISERS = ("unet", "transformer")


def denoiser_name(pipe) -> str | None:
    """The attribute that holds the pipeline's denoiser: 'unet' or 'transformer' (None: neither)."""
    return next((n for n in DENOISERS if getattr(pipe, n, None) is not None), None)


def speed_problem(options: SpeedOptions, spec, transformer_config: dict | None = None) -> tuple[str, str] | None:
    """(flag, why) for the first option that model `spec` cannot take; None when all apply.
    Reads only configs already on disk (no torch, no download): the driver checks before the run.
    `transformer_config`: the denoiser's config where the caller knows it before it is on disk
    (the benchmark's architectures, built after the check)."""
    from pipelines.registry.families import component_config, pipeline_name

    if options.fuse_qkv and pipeline_name(spec) == "StableDiffusion3Pipeline":
        config = transformer_config if transformer_config is not None else component_config(spec, "transformer")
        if config is None:
            return "--fuse-qkv", ("its transformer/config.json is not readable before the run (local directory or "
                                  "Hugging Face cache), so SD 3.5's q/k norms, which diffusers' fused joint attention "
                                  "skips, cannot be ruled out")
        if config.get("qk_norm") or config.get("dual_attention_layers"):
            return "--fuse-qkv", ("its transformer is SD 3.5-type (qk_norm or dual attention layers): diffusers' "
                                  "FusedJointAttnProcessor2_0 skips the q/k norms (other pixels) and cannot run the "
                                  "self-attention-only second attention")
    return None


def check_speed_options(options: SpeedOptions, specs, transformer_configs: dict | None = None) -> None:
    """Refuse (InputError, one line naming flag, model, family and why) an option a model of the run cannot take.
    `transformer_configs`: model name -> its denoiser's config, for models not on disk yet (see speed_problem)."""
    from pipelines.errors import InputError
    from pipelines.registry.families import family_label

    for spec in specs:
        problem = speed_problem(options, spec, (transformer_configs or {}).get(spec.name))
        if problem is not None:
            flag, why = problem
            raise InputError(f"{flag}: model {spec.name!r} ({family_label(spec)}) cannot use it: {why}; "
                             f"run it without {flag}")


FUSED_LORA_WHY = ("diffusers' fused attention reads to_qkv, built from the base weights, so a LoRA adapter's "
                  "query/key/value deltas are dropped (other pixels: on the embedded model 255/255 levels off the "
                  "adapter's image, fused before or after loading it)")


def check_fused_loras(options: SpeedOptions, loras) -> None:
    """Refuse --fuse-qkv for a run whose manifest has rows with LoRA adapters (`loras`: the
    validated manifest's `lora` column), naming the first such row."""
    from pipelines.errors import InputError

    if not options.fuse_qkv:
        return
    rows = [i for i, lora in enumerate(loras) if lora]
    if rows:
        raise InputError(f"--fuse-qkv: row {rows[0]}, column 'lora': got {loras[rows[0]]!r} ({len(rows)} row(s) with "
                         f"adapters); fused QKV projections cannot carry an adapter: {FUSED_LORA_WHY}; run rows with "
                         "adapters without --fuse-qkv")


def apply_speed_options(pipe, options: SpeedOptions):
    """Apply `options` to a loaded diffusers pipeline in place; returns it."""
    import torch

    denoiser = denoiser_name(pipe)
    if options.channels_last:
        for name in ("unet", "vae"):  # the convolutional parts (a transformer's layout is its tokens)
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if options.fuse_qkv:
        for name in (denoiser, "vae"):
            module = getattr(pipe, name, None) if name else None
            if module is not None and hasattr(module, "fuse_qkv_projections") and not _has_added_kv(module):
                _refuse_unfusable(module)
                module.fuse_qkv_projections()
    if options.compile != "none":
        if denoiser is not None and not hasattr(getattr(pipe, denoiser), "_orig_mod"):  # not compiled yet
            setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), mode=options.compile))
        if getattr(pipe, "vae", None) is not None and not hasattr(pipe.vae.decoder, "_orig_mod"):  # a shared VAE
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=options.compile)
    return pipe


def _refuse_unfusable(module) -> None:
    """A second guard behind `speed_problem` (a model that got past the driver's check): an SD 3.5-type
    transformer raises here, at load, rather than drawing other pixels."""
    config = getattr(module, "config", {})
    if type(module).__name__ == "SD3Transformer2DModel" and (config.get("qk_norm")
                                                            or config.get("dual_attention_layers")):
        raise ValueError("--fuse-qkv: diffusers' fused joint attention skips SD 3.5's q/k norms; run without it")


def _has_added_kv(module) -> bool:
    """diffusers cannot fuse attention processors with added KV projections (it raises)."""
    return any("Added" in type(p).__name__ for p in module.attn_processors.values())


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
