"""The `quant` column: weight quantization schemes as a sweep axis.

Rows of every CPU scheme go through jobs/generate.py on the embedded model (32x32, 2 steps),
each (model, quant) loaded once per actor; the loaded denoiser's weights are checked to be
torchao tensors of the scheme's storage type and to take fewer bytes; schemes the job's
device cannot run, and unknown names, are refused before anything runs.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs import generate as gen_job
from pipelines.contract import RUN_KEY, sample_id
from pipelines.registry.models import ModelRegistry
from pipelines.registry.quant import SCHEMES
from pipelines.sweep import build_manifest
from pipelines.validation import ManifestError, check_device, validate_manifest
from tests.conftest import write_parquet

CPU_SCHEMES = [n for n, s in SCHEMES.items() if "cpu" in s.devices]
PROMPTS = ["a red circle on a blue background"]


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def quant_sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("quant")
    rows = [dict(prompt=p, seed=s, quant=q, steps=2, guidance=1.0, height=32, width=32)
            for q in CPU_SCHEMES for p in PROMPTS for s in (0,)]
    manifest = write_parquet(tmp / "manifest.parquet", rows)
    out = tmp / "results"
    assert gen_job.main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    return out, pd.read_parquet(out)


def test_every_cpu_scheme_runs_through_the_job_and_is_recorded(quant_sweep):
    out, df = quant_sweep
    assert set(CPU_SCHEMES) >= {"none", "int8wo", "int8"} and len(df) == len(CPU_SCHEMES) * len(PROMPTS)
    assert (df.status == "ok").all(), df.error.dropna().unique()
    import torchao

    plain, quantized = df[df.quant == "none"], df[df.quant != "none"]
    assert plain.quant_backend.isna().all() and plain.quant_scheme.isna().all()
    assert (quantized.quant_backend == "torchao").all() and (quantized.quant_version == torchao.__version__).all()
    assert quantized.quant_scheme.str.endswith(" on unet").all()  # the denoiser only, by default
    assert quantized[quantized.quant == "int8wo"].quant_scheme.str.startswith("Int8WeightOnlyConfig").all()
    # a quantized image is near its float32 image on the same seed, and not equal to it
    ref = {r.prompt: decode(r.image) for r in plain.itertuples()}
    for r in quantized.itertuples():
        diff = np.abs(decode(r.image) - ref[r.prompt]).mean()
        assert 0 < diff < 25, (r.quant, diff)
    # each (model, quant) loaded once, with its load time, peak memory and weight bytes in _run.json
    loads = json.loads((out / "_run.json").read_text())["runs"][-1]["loads"]
    assert sorted(x["quant"] for x in loads) == sorted(CPU_SCHEMES) and {x["model"] for x in loads} == {"embedded"}
    weights = {x["quant"]: x["weights_bytes"] for x in loads}
    assert all(weights[q] < weights["none"] for q in CPU_SCHEMES if q != "none"), weights
    assert all(x["load_seconds"] > 0 and x["peak_mem_bytes"] > 0 for x in loads)
    assert "quant" in RUN_KEY  # evaluate groups by the run key: one configuration per scheme


def test_sample_ids_of_rows_without_quant_stay_the_same():
    reg = ModelRegistry()
    t = validate_manifest(pa.table({"prompt": ["a", "a"], "seed": [1, 1], "quant": [None, "int8wo"]}), reg)
    assert t.column("quant").to_pylist() == ["none", "int8wo"]
    row = {k: v for k, v in t.slice(0, 1).to_pylist()[0].items() if k not in ("sample_id", "quant")}
    ids = t.column("sample_id").to_pylist()
    assert ids[0] == sample_id(row) != ids[1]


@pytest.fixture(scope="module")
def plain_unet_bytes():
    from pipelines.registry.loading import load_model
    from pipelines.registry.quant import weights_bytes

    return weights_bytes(load_model(ModelRegistry().get("embedded"), "cpu").pipe.unet)


@pytest.mark.parametrize("scheme, storage", [("int8wo", "int8"), ("int8", "int8"), ("intx4wo", "int8"),
                                             ("fp8wo", "float8_e4m3fn")])
def test_the_loaded_denoiser_is_really_quantized(scheme, storage, plain_unet_bytes):
    import torch

    from pipelines.registry.loading import load_model
    from pipelines.registry.quant import weights_bytes

    assert scheme in CPU_SCHEMES
    spec = ModelRegistry().get("embedded")
    quant = load_model(spec, "cpu", quant=scheme)
    linears = [m.weight for m in quant.pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(w).__module__.startswith("torchao") for w in linears)
    assert all(str(w.qdata.dtype) == f"torch.{storage}" for w in linears)
    if scheme == "intx4wo":  # 4-bit values, one per int8
        assert all(-8 <= int(w.qdata.min()) and int(w.qdata.max()) <= 7 for w in linears)
    assert weights_bytes(quant.pipe.unet) < plain_unet_bytes
    text = [m.weight for m in quant.pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(w) is torch.nn.Parameter for w in text)  # text encoders only when the registry says so


def test_a_registry_setting_also_quantizes_the_text_encoders(tmp_path):
    import torch

    from pipelines.registry.loading import load_model

    models = tmp_path / "models.yaml"
    models.write_text("models:\n  emb-te:\n    base: embedded\n    quantize_text_encoders: true\n")
    spec = ModelRegistry.with_user_file(models).get("emb-te")
    model = load_model(spec, "cpu", quant="int8wo")
    text = [m.weight for m in model.pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert text and all(type(w).__name__ == "Int8Tensor" for w in text)
    assert model.quant_record["quant_scheme"] == "Int8WeightOnlyConfig on text_encoder+unet"


def test_unknown_schemes_are_refused_at_validation():
    with pytest.raises(ManifestError) as e:
        validate_manifest(pa.table({"prompt": ["a", "b"], "quant": ["int8wo", "int3"]}), ModelRegistry())
    assert "row 1, column 'quant': got 'int3'; expected a quantization scheme: none, int8wo" in str(e.value)


def test_gpu_schemes_are_refused_for_cpu_actors(tmp_path, capsys, ray_local):
    t = validate_manifest(pa.table({"prompt": ["a", "b", "c"], "quant": ["none", "nf4", "fp8"]}), ModelRegistry())
    check_device(t, "cuda")  # a GPU job may ask for them
    with pytest.raises(ManifestError) as e:
        check_device(t, "cpu")
    assert "row 1, column 'quant': got 'nf4'; expected a scheme this job's device (cpu" in str(e.value)
    assert "row 2, column 'quant': got 'fp8'" in str(e.value)
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="a red circle", quant="int4wo", steps=2)])
    out = tmp_path / "out"
    assert gen_job.main([str(manifest), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: manifest ") and "row 0, column 'quant': got 'int4wo'" in err and "(cpu" in err, err
    assert not out.exists()


def test_make_manifest_sweeps_quants():
    reg = ModelRegistry()
    m = build_manifest({"prompts": ["a red circle"], "quants": ["none", "int8wo"], "steps": [2]}, reg)
    assert sorted(m.column("quant").to_pylist()) == ["int8wo", "none"]
    with pytest.raises(Exception) as e:
        build_manifest({"prompts": ["a"], "quants": ["int3"]}, reg)
    assert "'quants'" in str(e.value) and "int3" in str(e.value) and "nf4" in str(e.value)


def test_evaluation_reports_one_row_per_scheme_with_its_memory(quant_sweep, tmp_path):
    """jobs/evaluate.py groups by the run key (quant is part of it): one metrics row per scheme,
    each with its speed and the weights memory _run.json recorded for its (model, quant)."""
    from jobs import evaluate as eval_job

    out, _ = quant_sweep
    report = tmp_path / "report"
    assert eval_job.main([str(out), "--out", str(report), "--n-boot", "10", "--no-progress"]) == 0
    m = pd.read_parquet(report / "metrics.parquet")
    assert sorted(m.quant) == sorted(CPU_SCHEMES) and (m.n == len(PROMPTS)).all()
    loads = json.loads((out / "_run.json").read_text())["runs"][-1]["loads"]
    weights = m.set_index("quant").weights_mb
    assert weights.to_dict() == pytest.approx({x["quant"]: x["weights_bytes"] / 1e6 for x in loads})
    assert m.gen_seconds.notna().all() and m.clip_score.notna().all()  # speed and quality beside the memory
    header = next(ln for ln in (report / "metrics.md").read_text().splitlines() if "weights (MB)" in ln)
    assert "quant" in header and "CPU s / image" in header and "CLIP score" in header
