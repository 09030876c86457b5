"""The built-in `sdxl-refiner` (SDXL 1.0's refiner on the Hub) as a base model's `refiner`, without
downloading anything: the registry resolves it, validation keeps it out of rows, and offline a
refiner missing from the Hugging Face cache is refused before the run, naming it."""

import pyarrow as pa
import pytest
import yaml

from jobs import generate as gen_job
from pipelines.registry.loading import check_available
from pipelines.registry.models import ModelRegistry
from pipelines.registry.tiny_families import save_tiny
from pipelines.validation import ManifestError, validate_manifest
from tests.conftest import write_parquet


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny("tiny-sdxl", tmp_path_factory.mktemp("sdxl") / "base")


def models_yaml(tmp_path, entries: dict) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return str(path)


def test_the_built_in_refiner_resolves_and_is_no_row_s_model(tmp_path):
    registry = ModelRegistry.with_user_file(models_yaml(tmp_path, {"sdxl": {"base": "sdxl", "refiner": "sdxl-refiner"}}))
    refiner = registry.with_refiners(["sdxl"])["sdxl-refiner"]
    assert (refiner.source, refiner.pipeline, refiner.variant) == (
        "stabilityai/stable-diffusion-xl-refiner-1.0", "StableDiffusionXLImg2ImgPipeline", "fp16")
    assert ModelRegistry().get("sdxl").refiner is None  # plain SDXL runs never need the refiner's weights
    table = validate_manifest(pa.Table.from_pylist([dict(prompt="a cat", model="sdxl", denoising_end=0.8)]), registry)
    assert table.column("denoising_end").to_pylist() == [0.8]
    with pytest.raises(ManifestError, match="row 0, column 'model': got 'sdxl-refiner'; .*is an img2img refiner"):
        validate_manifest(pa.Table.from_pylist([dict(prompt="a cat", model="sdxl-refiner")]), registry)


def test_offline_a_refiner_not_in_the_cache_is_refused_before_the_run(tmp_path, capsys, monkeypatch, tiny_sdxl):
    """The base is a local tiny SDXL; its refiner the built-in hub one, absent from an empty cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models = models_yaml(tmp_path, {"local-sdxl": dict(base="sdxl", source=str(tiny_sdxl), refiner="sdxl-refiner",
                                                       height=32, width=32, steps=4)})
    check_available(ModelRegistry.with_user_file(models).get("local-sdxl"))  # the base is there
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="a cat", model="local-sdxl", denoising_end=0.8)])
    capsys.readouterr()
    assert gen_job.main([str(manifest), "--out", str(tmp_path / "out"), "--models", models, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists(), err
    assert err.startswith("error: model 'sdxl-refiner': hub repo 'stabilityai/stable-diffusion-xl-refiner-1.0' is "
                          "not in the Hugging Face cache"), err
    assert "HF_HUB_OFFLINE is set" in err, err
