"""LoRA adapters: names a manifest may ask for, resolved only through the job's registry.

A manifest row names adapters (`lora`) and their strength (`lora_scale`); only the registry
(the built-in adapters plus the `loras:` section of the --models YAML, job configuration,
trusted) maps a name to a safetensors file, local or on the Hub, and says which models it
was trained for. A path in the manifest is refused, so a row cannot make a worker read an
arbitrary file; pickled adapters are refused, so loading one cannot run code.

Canonical form (what validation writes and results record): `lora` is "" (no adapter), a
name, or names joined by "+" (stacked adapters). `lora_scale` is one float that scales
every adapter of the row; stacked adapters with different strengths carry them in `lora`
as "name@weight" (the manifest may give them as a list column and a list of scales).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import InputError
from pipelines.safe_yaml import describe, short_repr

NONE = "none"  # in a sweep or a manifest: no adapter (stored as "")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SCALE_LIMIT = 10.0  # |lora_scale| beyond this is a typo, not an experiment


@dataclass(frozen=True)
class LoraSpec:
    """One registered adapter."""

    name: str
    source: str  # a local .safetensors file, or a hub id (org/repo) with weight_name
    fits: tuple[str, ...]  # the models it was trained for (a model fits if its name or its 'base:' is listed)
    weight_name: str | None = None  # the .safetensors file in a hub repo
    revision: str | None = None

    def fits_model(self, model) -> bool:
        return model.name in self.fits or getattr(model, "base", None) in self.fits


def _builtin() -> dict[str, LoraSpec]:
    from pipelines.embedded import LORA_DIR

    return {"black_background": LoraSpec("black_background", str(LORA_DIR / "black_background.safetensors"),
                                         ("embedded",))}


BUILTIN_LORAS = _builtin()


class LoraConfigError(InputError):
    """A bad `loras:` section."""


# ------------------------------------------------------------------------ the YAML section

_KEYS = {"source", "fits", "weight_name", "revision"}


def parse_loras(section, where: str, base_dir: Path) -> dict[str, LoraSpec]:
    """The `loras:` section of a models file::

        loras:
          my-style:
            source: adapters/my_style.safetensors   # relative to the YAML file's folder
            fits: [sd15]                             # model names (or 'base:' built-ins)
          hub-style:
            source: org/repo                         # a hub id ...
            weight_name: style.safetensors           # ... and the file in it
            fits: [sdxl]
    Every problem is reported in one line naming the file, the adapter and the key."""
    if not isinstance(section, dict):
        raise LoraConfigError(f"{where}: 'loras': got {describe(section)}; expected a mapping of name -> settings")
    out, problems = {}, []
    for name, entry in section.items():
        mine = _entry_problems(name, entry)
        if mine:
            problems += [f"adapter {short_repr(name)}, {p}" for p in mine]
            continue
        source = entry["source"]
        if source.endswith(".safetensors"):
            path = Path(source).expanduser()
            source = str(path if path.is_absolute() else base_dir / path)
        fits = (entry["fits"],) if isinstance(entry["fits"], str) else tuple(entry["fits"])
        out[name] = LoraSpec(name, source, fits, entry.get("weight_name"), entry.get("revision"))
    if problems:
        raise LoraConfigError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:20]))
    return out


def _entry_problems(name, entry) -> list[str]:
    if not isinstance(name, str) or not NAME.match(name) or name == NONE:
        return [f"name: expected letters, digits, '_', '.' or '-' (not {NONE!r}, no '+', '@' or '/')"]
    if not isinstance(entry, dict):
        return [f"got {describe(entry)}; expected a mapping with source and fits"]
    problems = [f"key {short_repr(k)}: unknown; allowed keys: {', '.join(sorted(_KEYS))}" for k in entry if k not in _KEYS]
    missing = [k for k in ("source", "fits") if k not in entry]
    if missing:
        problems.append(f"missing keys {missing}")
    source, weight = entry.get("source"), entry.get("weight_name")
    if "source" in entry and (not isinstance(source, str) or not source.strip()):
        problems.append(f"key 'source': got {describe(source)}; expected a .safetensors file or a hub id (org/repo)")
    elif isinstance(source, str) and not source.endswith(".safetensors"):
        if Path(source).expanduser().suffix or source.startswith(("/", ".", "~")):
            problems.append(f"key 'source': got {source!r}; expected a .safetensors file (diffsweep loads "
                            "safetensors only) or a hub id (org/repo) with weight_name")
        elif not (isinstance(weight, str) and weight.endswith(".safetensors")):
            problems.append(f"key 'weight_name': got {describe(weight)}; expected the .safetensors file in hub repo "
                            f"{source!r}")
    fits = entry.get("fits")
    if "fits" in entry and not (isinstance(fits, str) and fits or isinstance(fits, list) and fits
                                and all(isinstance(f, str) and f for f in fits)):
        problems.append(f"key 'fits': got {describe(fits)}; expected a model name or a list of model names")
    if entry.get("revision") is not None and not isinstance(entry.get("revision"), str):
        problems.append(f"key 'revision': got {describe(entry['revision'])}; expected a hub revision or null")
    return problems


# ------------------------------------------------------------------------ manifest values


def canonical(lora, scale) -> tuple[str, float, str | None]:
    """(lora, lora_scale, why not) for one manifest row's values; `why` names what is wrong
    ("lora" or "lora_scale" problems are prefixed with the column) or is None."""
    if lora is None or (isinstance(lora, str) and lora.strip().lower() in ("", NONE)):
        names, weights = [], []
    elif isinstance(lora, str):
        names, weights = [], []
        for item in lora.split("+"):
            name, _, w = item.strip().partition("@")
            names.append(name)
            weights.append(w)
    elif isinstance(lora, (list, tuple)) and all(isinstance(n, str) for n in lora):
        names, weights = [n.strip() for n in lora], [""] * len(lora)
    else:
        return "", 1.0, f"lora|got {short_repr(lora)}; expected an adapter name, a list of names, or null"
    for n in names:
        why = name_problem(n)
        if why:
            return "", 1.0, f"lora|{why}"
    if len(set(names)) < len(names):
        return "", 1.0, f"lora|got {short_repr(lora)}; expected each adapter once"
    try:
        weights = [1.0 if w == "" else float(w) for w in weights]
    except ValueError:
        return "", 1.0, f"lora|got {short_repr(lora)}; expected name@weight with a number as weight"
    scales, why = _scales(scale, len(names))
    if why:
        return "", 1.0, f"lora_scale|{why}"
    effective = [w * s for w, s in zip(weights, scales)] if names else [scales[0]]
    if not all(math.isfinite(v) and abs(v) <= SCALE_LIMIT for v in effective):
        return "", 1.0, f"lora_scale|got {short_repr(scale)}; expected finite scales in [-{SCALE_LIMIT:g}, {SCALE_LIMIT:g}]"
    if len(set(effective)) <= 1:
        return "+".join(names), effective[0] if effective else 1.0, None
    return "+".join(f"{n}@{v!r}" for n, v in zip(names, effective)), 1.0, None


def _scales(scale, n: int) -> tuple[list[float], str | None]:
    if scale is None:
        return [1.0] * max(n, 1), None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [float(scale)] * max(n, 1), None
    if isinstance(scale, (list, tuple)) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scale):
        if len(scale) == max(n, 1) or (n == 0 and len(scale) == 1):
            return [float(s) for s in scale], None
        return [], f"got {short_repr(scale)}; expected one scale, or one per adapter ({n})"
    return [], f"got {short_repr(scale)}; expected a number or a list of numbers (one per adapter)"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an adapter name in a manifest (a path, say), or None."""
    if "/" in name or "\\" in name or name.endswith((".safetensors", ".bin", ".pt", ".ckpt")) or name.startswith("~"):
        return (f"got {short_repr(name)}; expected a registered adapter name, not a path (adapters resolve "
                "only through the loras: section of --models)")
    if not NAME.match(name):
        return f"got {short_repr(name)}; expected a registered adapter name"
    return None


def adapters(lora: str, scale: float) -> list[tuple[str, float]]:
    """The (name, weight) pairs a canonical (lora, lora_scale) asks for; [] for no adapter."""
    if not lora:
        return []
    out = []
    for item in lora.split("+"):
        name, _, w = item.partition("@")
        out.append((name, (float(w) if w else 1.0) * scale))
    return out


# ------------------------------------------------------------------------ files and loading


def resolve_file(spec: LoraSpec) -> Path:
    """The adapter's local safetensors file (a hub adapter is fetched into the HF cache)."""
    if spec.source.endswith(".safetensors"):
        path = Path(spec.source)
        if not path.is_file():
            raise LoraConfigError(f"adapter {spec.name!r}: file {spec.source} does not exist")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.source, spec.weight_name, revision=spec.revision,
                                    local_files_only=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true")))
    except Exception as e:  # noqa: BLE001 - not found, offline cache miss, network: named in one line
        raise LoraConfigError(f"adapter {spec.name!r}: cannot get {spec.weight_name} from hub repo {spec.source!r}: "
                              f"{str(e).splitlines()[0]}") from None


def check_available(spec: LoraSpec) -> None:
    """On the driver, before workers start: a local adapter file must exist."""
    if spec.source.endswith(".safetensors"):
        resolve_file(spec)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fused_attention(pipe) -> bool:
    """Whether the pipeline's denoiser has fused QKV projections (diffusers' `fused_projections`)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return denoiser is not None and any(getattr(m, "fused_projections", False) for m in denoiser.modules())


class Adapters:
    """The adapters loaded into one pipeline: each loaded once, then switched per batch with
    `set_adapters` (the base weights are never reloaded; rows without adapters run with the
    adapters disabled)."""

    def __init__(self, pipe, registry: dict[str, LoraSpec], on_load=None):
        self.pipe, self.registry, self.on_load = pipe, registry, on_load
        self.digests: dict[str, str] = {}  # adapter name -> sha256 of its file
        self.loads = 0
        self.active: tuple | None = None  # the (names, weights) set now, () = disabled

    def use(self, lora: str, scale: float) -> str | None:
        """Set the row group's adapters; returns their file digests ("+"-joined) or None."""
        pairs = adapters(lora, scale)
        for name, _ in pairs:
            if name not in self.digests:
                if _fused_attention(self.pipe):  # a second guard behind the driver's check_fused_loras
                    raise ValueError(f"adapter {name!r} on fused QKV projections (--fuse-qkv): diffusers' fused "
                                     "attention reads to_qkv, built from the base weights, so the adapter's "
                                     "query/key/value deltas would be dropped")
                path = resolve_file(self.registry[name])
                self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name,
                                            use_safetensors=True)
                self.digests[name] = file_digest(path)
                self.loads += 1
                if self.on_load:
                    self.on_load(name)
                self.active = None  # loading activates the new adapter
        key = tuple(pairs)
        if key != self.active and self.digests:
            if pairs:
                self.pipe.enable_lora()
                self.pipe.set_adapters([n for n, _ in pairs], [w for _, w in pairs])
            else:
                self.pipe.disable_lora()
            self.active = key
        return "+".join(self.digests[n] for n, _ in pairs) or None
