"""The row contract: every manifest column and every result column, declared once.

A manifest column is a field of `Row`, with its Arrow type, its default (a constant, or
the model's own value) and its allowed range in the field's metadata. Everything that
needs to know the columns is derived from here: the Arrow schemas, validation, the
sample_id hash, the run key that groups rows into diffusers calls, the keys that
evaluation groups by, the benchmark's history key and make_manifest's sweep keys.

Adding a pixel-changing manifest column is one `column(...)` line in `Row` plus the code
that uses the value. No torch here: validating a manifest must not import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

SEED_LIMIT = 2**63  # seeds are int64 and non-negative
MAX_STEPS = 1000
MAX_SIDE = 4096

FROM_MODEL = "from the model"  # default: the model registry's value for this model (a ModelSpec attribute)


@dataclass(frozen=True)
class Column:
    """What the contract says about one manifest column."""

    name: str
    arrow: pa.DataType
    default: Any  # a constant, FROM_MODEL, or None (required, or computed by validation)
    lo: float | None = None  # allowed range, inclusive (numbers)
    hi: float | None = None
    pixels: bool = True  # changes the image: enters the sample_id
    run_key: bool = False  # one diffusers call runs one value: rows are grouped by it
    sweep: str | None = None  # make_manifest's spec key for a list of values
    example: tuple = ()  # a typical sweep over it, shown in messages
    doc: str = ""

    @property
    def kind(self) -> str:
        """"string", "integer" or "number": what validation accepts in the column."""
        if pa.types.is_string(self.arrow):
            return "string"
        return "integer" if pa.types.is_integer(self.arrow) else "number"


def column(arrow: pa.DataType, default: Any = None, **meta) -> dataclasses.Field:
    """A `Row` field that carries its column description (filled in with its name below)."""
    constant = {} if default in (None, FROM_MODEL) else {"default": default}  # Row(...) may leave it out
    return dataclasses.field(metadata={"column": (arrow, default, meta)}, **constant)


@dataclass(frozen=True, kw_only=True)
class Row:
    """One validated manifest row, as it travels from validation to the generation step."""

    sample_id: str = column(pa.string(), pixels=False, doc="content hash of the pixel fields, or the user's own id")
    prompt: str = column(pa.string(), doc="required, non-empty")
    negative_prompt: str = column(pa.string(), "")
    seed: int = column(pa.int64(), lo=0, hi=SEED_LIMIT - 1, sweep="seed",
                       doc="default: derived from (prompt, the row's index within that prompt)")
    model: str = column(pa.string(), FROM_MODEL, run_key=True, sweep="models",
                        doc="a name in the model registry; default: the job's --model, else 'embedded'")
    scheduler: str = column(pa.string(), FROM_MODEL, run_key=True, sweep="schedulers")
    steps: int = column(pa.int64(), FROM_MODEL, lo=1, hi=MAX_STEPS, run_key=True, sweep="steps",
                       example=(10, 25))
    guidance: float = column(pa.float64(), FROM_MODEL, lo=0, run_key=True, sweep="guidance", example=(1.0, 7.5),
                             doc="<= 1 disables classifier-free guidance")
    true_cfg_scale: float = column(pa.float64(), 1.0, lo=0, run_key=True, sweep="true_cfg_scales", example=(1.0, 4.0),
                                   doc="FLUX's true classifier-free guidance with the negative prompt; <= 1 off")
    height: int = column(pa.int64(), FROM_MODEL, lo=8, hi=MAX_SIDE, run_key=True, sweep="sizes")
    width: int = column(pa.int64(), FROM_MODEL, lo=8, hi=MAX_SIDE, run_key=True, sweep="sizes")
    denoising_end: float = column(pa.float64(), 1.0, lo=0, hi=1, run_key=True, sweep="denoising_ends",
                                  example=(0.8, 1.0), doc="SDXL base+refiner handoff: the base denoises this fraction, "
                                  "the model's refiner the rest; 1 = base only")
    cache_interval: int = column(pa.int64(), 1, lo=1, hi=MAX_STEPS, run_key=True, sweep="cache_intervals", example=(1, 3),
                                 doc="feature reuse: a full UNet call every N-th step (1 = off)")
    quant: str = column(pa.string(), "none", run_key=True, sweep="quants", example=("none", "int8wo"),
                        doc="weight quantization scheme (pipelines/registry/quant.py)")
    lora: str = column(pa.string(), "", run_key=True, sweep="loras", example=("none", "black_background"),
                       doc="registered adapter name(s), '+'-joined when stacked; '' = none (pipelines/registry/loras.py)")
    lora_scale: float = column(pa.float64(), 1.0, lo=-10, hi=10, run_key=True, sweep="lora_scales",
                               example=(0.5, 1.0), doc="strength of every adapter of the row")

    @classmethod
    def of(cls, record: Mapping) -> Row:
        """The row of a validated record (a manifest row as a dict; extra columns are ignored).
        A column with a constant default may be missing (e.g. a row written before it existed)."""
        return cls(**{c.name: record[c.name] if c.name in record or c.default in (None, FROM_MODEL) else c.default
                      for c in COLUMNS})

    def config(self) -> tuple:
        """One diffusers call's configuration: the run key without what picks the pipeline."""
        return tuple(getattr(self, k) for k in CONFIG_KEY)


COLUMNS: tuple[Column, ...] = tuple(
    Column(f.name, f.metadata["column"][0], f.metadata["column"][1], **f.metadata["column"][2])
    for f in dataclasses.fields(Row)
)
COLUMN = {c.name: c for c in COLUMNS}
MANIFEST_SCHEMA = pa.schema([(c.name, c.arrow) for c in COLUMNS])
MANIFEST_COLUMNS = MANIFEST_SCHEMA.names
# Rows of one run key share one diffusers call. Sorted by it, the model and the image size
# (which pick the pipeline and the batch size) come first, and the quantization (which
# picks the pipeline too: one loaded copy per (model, quant)).
PIPELINE_KEY = ("model", "quant")
RUN_KEY = sorted((c.name for c in COLUMNS if c.run_key), key=lambda k: k not in ("model", "height", "width", "quant"))
CONFIG_KEY = tuple(k for k in RUN_KEY if k not in PIPELINE_KEY)

# The fields hashed into sample_id, in hash order. Frozen: changing it changes every id.
# A pixel column added later is hashed only when it is not at its default, so the
# sample_ids of manifests written before it existed stay the same.
SAMPLE_ID_FIELDS = ("model", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "height", "width")
LATER_PIXEL_FIELDS = {c.name: c.default for c in COLUMNS if c.pixels and c.name not in SAMPLE_ID_FIELDS}

RESULT_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # PNG bytes; null on error
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),
        ("prompt_truncated", pa.bool_()),
        ("gen_seconds", pa.float64()),  # this image's share of its batch's wall time
        ("batch_size", pa.int64()),
        ("worker", pa.string()),
        ("device", pa.string()),
        ("dtype", pa.string()),  # half precision changes pixels (docs/performance.md): compare within one
        ("diffusers_version", pa.string()),
        ("torch_version", pa.string()),
        ("model_digest", pa.string()),
        ("quant_backend", pa.string()),  # null for quant 'none'
        ("quant_scheme", pa.string()),  # the backend's config and the components it quantized
        ("quant_version", pa.string()),  # the backend package's version
        ("lora_digest", pa.string()),  # sha256 of each adapter file ('+'-joined, as in 'lora'); null: no adapter
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
RESULT_COLUMNS = RESULT_SCHEMA.names


def default_seed(prompt: str, index_within_prompt: int) -> int:
    """Seed for a row that gave none: the k-th row of a prompt gets the k-th seed."""
    digest = hashlib.sha256(f"{prompt}\x00{index_within_prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def sample_id(row: Mapping) -> str:
    """Content hash of a row's pixel fields: equal ids <=> the same image is asked for."""
    values = [row[f] for f in SAMPLE_ID_FIELDS]
    values[SAMPLE_ID_FIELDS.index("guidance")] = float(values[SAMPLE_ID_FIELDS.index("guidance")]).hex()
    values += [[f, row[f]] for f, off in LATER_PIXEL_FIELDS.items() if row.get(f, off) != off]
    blob = json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=int)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]
