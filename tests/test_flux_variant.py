"""A FLUX model registered from a local directory or a hub id (issue 15): whether it is dev (distilled
guidance embedded) or schnell (guidance ignored) comes from its transformer's config.json, and a
registry `guidance_embeds` the config contradicts is refused, at validation or at load."""

import shutil

import pyarrow as pa
import pytest
import yaml

from jobs import generate as gen_job
from pipelines.registry.families import FluxVariantError, guidance_embeds, max_sequence_length
from pipelines.registry.loading import load_model
from pipelines.registry.models import ModelRegistry
from pipelines.registry.tiny_families import TINY_FAMILIES, save_tiny
from pipelines.validation import ManifestError, validate_manifest
from tests.conftest import write_parquet

ENTRY = {k: v for k, v in TINY_FAMILIES["tiny-flux"][1].items() if k != "guidance"}  # FluxPipeline at 32x32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> a tiny FLUX pipeline saved as a diffusers directory (safetensors)."""
    tmp = tmp_path_factory.mktemp("flux-variants")
    return {"dev": save_tiny("tiny-flux-dev", tmp / "dev"), "schnell": save_tiny("tiny-flux", tmp / "schnell")}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, saved):
    """A Hugging Face cache holding the saved models as hub repos tiny/flux-dev and tiny/flux-schnell."""
    import huggingface_hub.constants

    for variant, directory in saved.items():
        repo = tmp_path / "hub" / f"models--tiny--flux-{variant}"
        shutil.copytree(directory, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def registry_of(tmp_path, entries: dict) -> tuple[ModelRegistry, str]:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return ModelRegistry.with_user_file(path), str(path)


def rows(model: str, guidance: float) -> pa.Table:
    return pa.Table.from_pylist([dict(prompt="a red circle", model=model, guidance=guidance)])


def test_the_variant_comes_from_the_transformer_config(tmp_path, saved, hub_cache):
    """No `guidance_embeds` in the registry: a local directory's or a cached hub repo's config decides
    what `guidance` means (schnell: only the default) and the T5 length (dev 512, schnell 256)."""
    registry, _ = registry_of(tmp_path, {
        "dir-dev": dict(ENTRY, source=str(saved["dev"]), guidance=3.5),
        "dir-schnell": dict(ENTRY, source=str(saved["schnell"]), guidance=0.0),
        "hub-dev": dict(ENTRY, source="tiny/flux-dev", guidance=3.5),
        "hub-schnell": dict(ENTRY, source="tiny/flux-schnell", guidance=0.0)})
    for name, dev in (("dir-dev", True), ("dir-schnell", False), ("hub-dev", True), ("hub-schnell", False)):
        spec = registry.get(name)
        assert (guidance_embeds(spec), max_sequence_length(spec)) == (dev, 512 if dev else 256), name
        if dev:
            assert validate_manifest(rows(name, 7.0), registry).column("guidance").to_pylist() == [7.0]
        else:
            with pytest.raises(ManifestError, match="row 0, column 'guidance': got 7.0; .*no guidance embedding"):
                validate_manifest(rows(name, 7.0), registry)


@pytest.mark.parametrize("declared, source", [(True, "schnell"), (False, "dev"), (True, "tiny/flux-schnell"),
                                              (False, "tiny/flux-dev")])
def test_a_registry_variant_the_config_contradicts_is_refused_before_the_run(tmp_path, capsys, saved, hub_cache,
                                                                             declared, source):
    actual = not declared
    name = f"wrong-{declared}-{source.replace('/', '-')}"
    _, models = registry_of(tmp_path, {name: dict(ENTRY, source=str(saved.get(source, source)), guidance=0.0,
                                                  guidance_embeds=declared)})
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="a red circle", model=name)])
    capsys.readouterr()
    assert gen_job.main([str(manifest), "--out", str(tmp_path / "out"), "--models", models, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists(), err
    assert (f"error: model {name!r}, key 'guidance_embeds': the registry says {str(declared).lower()} (FLUX.1-"
            f"{'dev' if declared else 'schnell'}") in err, err
    assert f"transformer/config.json has guidance_embeds {str(actual).lower()}" in err, err
    assert f"set 'guidance_embeds: {str(actual).lower()}' in the models YAML" in err, err


def test_base_flux_dev_on_a_schnell_directory_is_refused(tmp_path, saved):
    """The likely slip: inheriting flux-dev's settings (guidance_embeds true) for a local FLUX.1-schnell copy."""
    registry, _ = registry_of(tmp_path, {"my-flux": dict(base="flux-dev", source=str(saved["schnell"]))})
    with pytest.raises(FluxVariantError, match="model 'my-flux', key 'guidance_embeds': the registry says true"):
        validate_manifest(rows("my-flux", 3.5), registry)


def test_an_unknown_variant_is_refused_and_a_wrong_one_fails_at_load(tmp_path, saved, hub_cache):
    """A hub FLUX model with no config on disk and no `guidance_embeds`: its rows are refused (what guidance
    means is unknown). A declared variant that only the downloaded weights contradict fails the load
    (the worker's rows become error rows with this cause), never draws with the other semantics."""
    from dataclasses import replace

    registry, _ = registry_of(tmp_path, {"hub-unknown": dict(ENTRY, source="tiny/not-downloaded", guidance=3.5),
                                         "hub-declared": dict(ENTRY, source="tiny/not-downloaded", guidance=3.5,
                                                              guidance_embeds=True)})
    with pytest.raises(ManifestError, match="row 0, column 'model': got 'hub-unknown'; expected a FLUX model whose "
                                            "variant is known before the run.*set 'guidance_embeds: true'"):
        validate_manifest(rows("hub-unknown", 3.5), registry)
    assert validate_manifest(rows("hub-declared", 7.0), registry).num_rows == 1  # checked again at load
    spec = replace(registry.get("hub-declared"), name="downloaded", source=str(saved["schnell"]))
    with pytest.raises(FluxVariantError, match="the registry says true .* but the loaded transformer's config has "
                                               "guidance_embeds false"):
        load_model(spec)
