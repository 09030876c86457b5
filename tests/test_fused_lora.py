"""--fuse-qkv with LoRA adapters is refused (issue 15): diffusers' fused attention reads `to_qkv`,
built from the base weights, so an adapter's query/key/value deltas are dropped; measured on the
embedded model with its black_background adapter: 255/255 levels off the adapter's image, fused
before or after the adapter is loaded (and 226 off the base model's: neither image)."""

import pytest

from jobs import generate as gen_job
from pipelines.generation.speed import SpeedOptions, apply_speed_options
from pipelines.registry.loading import load_model
from pipelines.registry.loras import Adapters
from pipelines.registry.models import ModelRegistry
from tests.conftest import write_parquet


def test_the_generate_job_refuses_fused_qkv_for_rows_with_adapters(tmp_path, capsys):
    rows = [dict(prompt="a red circle", steps=2), dict(prompt="a red circle", steps=2, lora="black_background")]
    manifest = write_parquet(tmp_path / "m.parquet", rows)
    capsys.readouterr()
    assert gen_job.main([str(manifest), "--out", str(tmp_path / "out"), "--fuse-qkv", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists(), err
    assert err.startswith("error: --fuse-qkv: row 1, column 'lora': got 'black_background' (1 row(s) with adapters); "
                          "fused QKV projections cannot carry an adapter: diffusers' fused attention reads to_qkv"), err


def test_an_adapter_is_never_loaded_onto_fused_projections():
    """The worker's second guard: a pipeline fused before its first adapter refuses to load one."""
    registry = ModelRegistry()
    pipe = apply_speed_options(load_model(registry.get("embedded")).pipe, SpeedOptions(fuse_qkv=True))
    adapters = Adapters(pipe, registry.loras)
    assert adapters.use("", 1.0) is None  # rows without adapters run fused
    with pytest.raises(ValueError, match="adapter 'black_background' on fused QKV projections"):
        adapters.use("black_background", 1.0)
