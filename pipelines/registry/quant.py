"""Quantization schemes: the manifest's `quant` column -> how the weights are quantized at load time.

One place per scheme: its backend, the diffusers/transformers quantization config it builds,
the devices it runs on and why. A scheme is applied when a model loads (diffusers'
`PipelineQuantizationConfig`), to the denoiser (UNet or transformer), and also to the text
encoders where the model's registry entry says `quantize_text_encoders: true`. No torch at
import time: validation checks scheme names and devices without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

DENOISERS = ("unet", "transformer", "prior")  # the pipeline component that runs every step
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Scheme:
    name: str
    backend: str | None  # pip package that quantizes (None: float weights)
    devices: tuple[str, ...]  # "cpu", "cuda"
    config: str  # the backend's config, as recorded per result row
    doc: str  # what it does and what it needs

    def config_args(self, torch_dtype):
        """(torchao AOBaseConfig, None) or (None, bitsandbytes kwargs) for one component."""
        import torch

        if self.backend == "bitsandbytes":
            return None, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
        import torchao.quantization as q
        from torchao.quantization.granularity import PerGroup

        make = {
            "int8wo": lambda: q.Int8WeightOnlyConfig(),
            "int8": lambda: q.Int8DynamicActivationInt8WeightConfig(),
            "intx4wo": lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            "int4wo": lambda: q.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
            "fp8wo": lambda: q.Float8WeightOnlyConfig(),
            "fp8": lambda: q.Float8DynamicActivationFloat8WeightConfig(),
        }
        return make[self.name](), None


SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("none", None, ("cpu", "cuda"), "", "float weights in the job's --dtype (the reference)"),
    Scheme("int8wo", "torchao", ("cpu", "cuda"), "Int8WeightOnlyConfig",
           "int8 weights, one scale per output channel; activations stay float (torchao Int8WeightOnlyConfig)"),
    Scheme("int8", "torchao", ("cpu", "cuda"), "Int8DynamicActivationInt8WeightConfig",
           "int8 weights and int8 activations quantized per token at run time "
           "(torchao Int8DynamicActivationInt8WeightConfig)"),
    Scheme("intx4wo", "torchao", ("cpu", "cuda"), "IntxWeightOnlyConfig(int4, group 32)",
           "4-bit weight values, one scale per group of 32, stored one per int8 byte: the quality of 4-bit "
           "weights at the memory of int8 (torchao IntxWeightOnlyConfig(int4); runs on CPU)"),
    Scheme("int4wo", "torchao", ("cuda",), "Int4WeightOnlyConfig(group 128, tile_packed_to_4d)",
           "4-bit weights packed two per byte, groups of 128 (torchao Int4WeightOnlyConfig, tinygemm layout): "
           "needs a CUDA GPU, torchao 0.18 has no CPU kernel for it"),
    Scheme("fp8wo", "torchao", ("cpu", "cuda"), "Float8WeightOnlyConfig",
           "float8 (e4m3) weights, one scale per output channel, dequantized for the matmul "
           "(torchao Float8WeightOnlyConfig; runs on CPU with torchao 0.18)"),
    Scheme("fp8", "torchao", ("cuda",), "Float8DynamicActivationFloat8WeightConfig",
           "float8 weights and activations (torchao Float8DynamicActivationFloat8WeightConfig): needs a GPU "
           "with float8 matmuls (CUDA compute capability >= 8.9: L4, L40S, H100, H200)"),
    Scheme("nf4", "bitsandbytes", ("cuda",), "BitsAndBytesConfig(4-bit nf4)",
           "4-bit NormalFloat weights (bitsandbytes BitsAndBytesConfig(load_in_4bit, nf4)): needs a CUDA GPU "
           "and `pip install bitsandbytes`"),
]}
NONE = "none"


def scheme_problem(name, device: str | None = None) -> str | None:
    """Why `name` cannot run (on `device`, if given), as the 'expected ...' of a message; None if it can."""
    if name not in SCHEMES:
        return "a quantization scheme: " + ", ".join(SCHEMES)
    if device is not None and device not in SCHEMES[name].devices:
        usable = [s for s, v in SCHEMES.items() if device in v.devices]
        return (f"a scheme this job's device ({describe_device(device)}) runs: {', '.join(usable)}; "
                f"{name!r} needs {' or '.join(SCHEMES[name].devices)} ({SCHEMES[name].doc})")
    return None


def describe_device(device: str) -> str:
    return "cpu: no GPU per actor" if device == "cpu" else device


def components_of(names, text_encoders: bool = False) -> list[str]:
    """The pipeline components a scheme quantizes: the denoiser, and the text encoders if asked."""
    wanted = DENOISERS + (TEXT_ENCODERS if text_encoders else ())
    return [n for n in names if n in wanted]


def pipeline_config(scheme: str, components: list[str], torch_dtype):
    """diffusers' PipelineQuantizationConfig for `components` (diffusers models get diffusers'
    config class, transformers models transformers' one); None for 'none'."""
    s = SCHEMES[scheme]
    if s.backend is None:
        return None
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig

    ao, bnb = s.config_args(torch_dtype)
    mapping = {}
    for name in components:
        lib = transformers if name.startswith("text_encoder") else diffusers
        mapping[name] = lib.TorchAoConfig(ao) if ao is not None else lib.BitsAndBytesConfig(**bnb)
    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantize_built(pipe, scheme: str, components: list[str]) -> None:
    """Quantize the components of a pipeline built in memory (the builtin tiny model, which has
    no from_pretrained): torchao's quantize_ with the config diffusers would apply at load time."""
    s = SCHEMES[scheme]
    if s.backend is None:
        return
    if s.backend != "torchao":
        raise ValueError(f"quant {scheme!r}: a pipeline built in memory can only take torchao schemes")
    from torchao.quantization import quantize_

    ao, _ = s.config_args(None)
    for name in components:
        quantize_(getattr(pipe, name), ao)


def record(scheme: str, components: list[str]) -> dict:
    """What a result row says about the quantization: backend, scheme (config and components), version."""
    s = SCHEMES[scheme]
    if s.backend is None:
        return {"quant_backend": None, "quant_scheme": None, "quant_version": None}
    try:
        v = version(s.backend)
    except PackageNotFoundError:
        v = None
    return {"quant_backend": s.backend, "quant_scheme": f"{s.config} on {'+'.join(components)}", "quant_version": v}


def weights_bytes(module) -> int:
    """Bytes the module's parameters and buffers hold; a quantized tensor subclass counts its
    inner tensors (int8 data plus scales), not the float size it stands for."""
    def size(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t)
    return total
