"""The generation worker: manifest rows in, result rows (raw pixels plus provenance) out.

Ray Data runs one per actor (jobs/raydata/generation.py); the benchmark calls one in
process. It holds loaded pipelines in a small LRU cache keyed by (model, quant), so an actor loads
each (model, quantization scheme) once and reuses it across schedulers, steps and guidance;
a model that cannot load here turns its rows into error rows instead of killing the actor.
Nothing here imports ray: where the batch attempts are counted across actor restarts is
passed in (`attempts`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import socket
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np
import pandas as pd

from pipelines.benchmarking.environment import cpu_name
from pipelines.contract import PIPELINE_KEY, Row
from pipelines.errors import innermost_cause
from pipelines.generation.batch_size import BatchSizes
from pipelines.generation.speed import SpeedOptions, apply_speed_options

CALL_ROWS_CONTINUOUS = 4  # rows per worker call = this x --batch-size with --batching continuous
# Per-row columns the driver reads into _run.json (per worker and (model, quant)) and does not store.
LOAD_COLUMNS = ("load_seconds", "peak_mem_bytes", "weights_bytes")
NO_QUANT = {"quant_backend": None, "quant_scheme": None, "quant_version": None}


class GenerateActor:
    """Turns a pandas batch of manifest rows into a pandas batch of result rows."""

    def __init__(self, specs: dict, dtype: str, batch_size: int | None, torch_threads: int | None, cache_size: int = 2,
                 batching: str = "config", speed: dict | None = None, attempts: Callable[[str], int] | None = None,
                 max_attempts: int | None = None, loras: dict | None = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.specs, self.dtype, self.batch_size, self.cache_size = specs, dtype, batch_size, cache_size
        self.loras = loras or {}  # adapter name -> LoraSpec (pipelines/registry/loras.py)
        self.loads: Counter[str] = Counter()  # "model:<name>" / "lora:<name>" -> times loaded by this actor
        self.batching = batching
        self.speed = SpeedOptions(**(speed or {}))
        self.text_caches: dict = {}  # (model, quant) -> prompt embeddings (continuous batching)
        self.batch_sizes: dict = {}  # (model, quant) -> BatchSizes (None: fitted to free memory)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_name = torch.cuda.get_device_name() if self.device == "cuda" else cpu_name()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.models: OrderedDict = OrderedDict()
        self.load_failures: dict[tuple, str] = {}  # (model, quant) -> why it cannot load here (rows become errors)
        self.attempts, self.max_attempts = attempts, max_attempts
        import diffusers
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # the driver draws the one progress bar
        transformers_logging.disable_progress_bar()
        self.versions = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__}

    def _model(self, name: tuple):
        from pipelines.benchmarking.memory import PeakMemory
        from pipelines.generation.grouped import warm_up
        from pipelines.registry.loading import load_model
        from pipelines.registry.quant import weights_bytes

        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        while len(self.models) >= self.cache_size:
            evicted, _ = self.models.popitem(last=False)
            self.text_caches.pop(evicted, None)
            self.batch_sizes.pop(evicted, None)
        with PeakMemory(self.device) as peak:  # this process's peak: resident set on CPU, allocated on a GPU
            model = load_model(self.specs[name[0]], self.device, self.dtype, quant=name[1])
            load_key = f"model:{name[0]}" + (f"@{name[1]}" if name[1] != "none" else "")
            self.loads[load_key] += 1
            if model.spec.refiner:  # SDXL base+refiner: the refiner finishes rows with denoising_end < 1
                model.extras["refiner"] = load_model(self.specs[model.spec.refiner], self.device, self.dtype)
            for pipe in [model.pipe] + ([model.extras["refiner"].pipe] if "refiner" in model.extras else []):
                apply_speed_options(pipe, self.speed)
            warm_up(model)  # also pays torch.compile, if on
        weights = sum(weights_bytes(c) for c in model.pipe.components.values() if hasattr(c, "parameters"))
        model.extras["load"] = {"load_seconds": model.load_seconds, "peak_mem_bytes": peak.peak,
                                "weights_bytes": weights}
        self.models[name] = model
        self.batch_sizes[name] = BatchSizes(model, self.batch_size)
        return model

    def _generate(self, name: str, model, rows: list[Row]):
        if self.batching == "continuous":
            from pipelines.generation.continuous import TextCache, generate_mixed

            return generate_mixed(model, rows, self.batch_sizes[name], self.text_caches.setdefault(name, TextCache()))
        from pipelines.generation.grouped import generate

        return generate(model, rows, self.batch_sizes[name])

    def _row(self, created_at, **fields) -> dict:
        """One result row: `fields` (sample_id, pixels, status, ...) plus where and how it ran."""
        return {**fields, "worker": self.worker, "device": f"{self.device}:{self.device_name}",
                "created_at": created_at, **self.versions}

    def _failed_rows(self, sample_ids, message: str) -> list[dict]:
        now = dt.datetime.now(dt.timezone.utc)
        return [self._row(now, sample_id=sid, pixels=None, status="error", error=message, prompt_truncated=False,
                          gen_seconds=0.0, batch_size=0, dtype=None, model_digest=None, lora_digest=None, **NO_QUANT)
                for sid in sample_ids]

    def _model_rows(self, name: tuple, part: list[Row]) -> list[dict]:
        """The result rows of one (model, quant)'s part of a batch; error rows if it cannot load here."""
        what = f"model {name[0]!r}" + (f" with quant {name[1]!r}" if name[1] != "none" else "")
        if name not in self.load_failures:
            try:
                model = self._model(name)
            except Exception as e:  # noqa: BLE001 - a model that cannot load here: its rows end as error rows
                self.load_failures[name] = (f"{what} could not be loaded (or its warm-up call failed) on "
                                            f"{self.worker}: {innermost_cause(e)}")
        if name in self.load_failures:
            return self._failed_rows([r.sample_id for r in part], self.load_failures[name])
        now = dt.datetime.now(dt.timezone.utc)  # batch start: the benchmark measures start-up from it
        out = []
        for (lora, scale), rows in group_rows(part, ("lora", "lora_scale")).items():  # one adapter set per call
            try:  # rows that fail are error results already; this catches a failure of the model's whole part
                digest = self._adapters(model).use(lora, scale)
                results = self._generate(name, model, rows)
            except Exception as e:  # noqa: BLE001 - one model's failure never takes the other models' rows down
                why = f"{what}{f' with lora {lora!r}' if lora else ''} failed on {self.worker}: {innermost_cause(e)}"
                out += self._failed_rows([r.sample_id for r in rows], why)
                continue
            out += [self._row(now, sample_id=res.sample_id, pixels=None if res.pixels is None else res.pixels.tobytes(),
                              status=res.status, error=res.error, prompt_truncated=res.prompt_truncated,
                              gen_seconds=res.gen_seconds, batch_size=res.batch_size, dtype=model.dtype,
                              model_digest=model.digest, lora_digest=digest, **model.quant_record,
                              **model.extras["load"])
                    for res in results]
        return out

    def _adapters(self, model):
        """The model's LoRA adapters (loaded on first use, once per loaded model)."""
        from pipelines.registry.loras import Adapters

        if "adapters" not in model.extras:
            model.extras["adapters"] = Adapters(model.pipe, self.loras, on_load=self._count_lora)
        return model.extras["adapters"]

    def _count_lora(self, adapter: str) -> None:
        self.loads[f"lora:{adapter}"] += 1

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Which attempt at this batch this is (1 = first), counted across actor restarts; 0 when not counted.
        attempt = self.attempts(batch_key(batch["sample_id"])) if self.attempts else 0
        if self.max_attempts and attempt > self.max_attempts:  # the previous attempts killed their actors
            why = (f"the worker died {attempt - 1} times running this batch of {len(batch)} row(s) (killed, out of "
                   f"host memory, or crashed); --max-retries {self.max_attempts - 1} exhausted")
            out = self._failed_rows(batch["sample_id"], why)
        else:
            rows = [Row.of(r) for r in batch.to_dict("records")]  # fills columns a batch lacks (e.g. quant)
            out = [row for key, part in group_rows(rows, PIPELINE_KEY).items() for row in self._model_rows(key, part)]
        sizes = batch.set_index("sample_id")[["height", "width"]]
        return pd.DataFrame(out).join(sizes, on="sample_id")


def group_rows(rows: list[Row], keys: tuple) -> dict[tuple, list[Row]]:
    """Rows grouped by the values of `keys`, groups and rows in the order they came (as pandas' sort=False)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row, k) for k in keys), []).append(row)
    return groups


def batch_key(sample_ids) -> str:
    """A batch's identity, whatever order its rows arrive in."""
    return hashlib.sha256("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()[:16]


def encode_pngs(batch: pd.DataFrame) -> pd.DataFrame:
    """Raw pixels -> PNG bytes; runs in CPU tasks, off the GPU actors' critical path."""
    from PIL import Image

    images = []
    for raw, h, w in zip(batch["pixels"], batch["height"], batch["width"]):
        if not isinstance(raw, (bytes, bytearray, memoryview)):  # an error row (None, or NaN after pandas)
            images.append(None)
            continue
        arr = np.frombuffer(raw, dtype=np.uint8).reshape(int(h), int(w), 3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
        images.append(buf.getvalue())
    batch = batch.drop(columns=["pixels", "height", "width"])
    batch.insert(1, "image", images)
    return batch
