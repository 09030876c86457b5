"""The models YAML (--models) and the driver-side check that a registered model can load:
wrong value types, alias bombs and damaged model directories are refused with exit code 2
and one line before Ray starts, and nothing is written."""

import json
import shutil

import pytest
import yaml

from jobs import generate as gen_job
from pipelines.errors import InputError
from pipelines.registry.models import ModelConfigError, ModelNotFoundError, load_models_yaml
from pipelines.registry.loading import check_available
from tests.conftest import write_parquet

BILLION_LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 10)}]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 strings once expanded
)


def run_generate(tmp_path, capsys, models_text: str, model: str = "m") -> str:
    """gen_job.main on a one-row manifest naming `model`; asserts the exit-2 contract, returns the line."""
    manifest = write_parquet(tmp_path / "m.parquet", [dict(prompt="a red circle", model=model)])
    models = tmp_path / "models.yaml"
    models.write_text(models_text)
    out = tmp_path / "out"
    capsys.readouterr()
    assert gen_job.main([str(manifest), "--out", str(out), "--models", str(models), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + captured.out
    assert not out.exists()
    return err


def load_error(tmp_path, text: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ModelConfigError) as e:
        load_models_yaml(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


TINY = "base: tiny-random, source: 'builtin:tiny-random'"

# (the model's settings, what the message must name)
WRONG_TYPES = [
    ("{%s, steps: '30'}" % TINY, ["model 'm'", "key 'steps'", "'30' (str)", "positive integer"]),
    ("{%s, guidance: high}" % TINY, ["key 'guidance'", "'high' (str)", "number >= 0"]),
    ("{%s, guidance: .nan}" % TINY, ["key 'guidance'", "nan", "finite number"]),
    ("{%s, scheduler: [ddim, euler]}" % TINY, ["key 'scheduler'", "['ddim', 'euler'] (list)", "scheduler name"]),
    ("{base: tiny-random, source: 123}", ["key 'source'", "123 (int)", "non-empty string"]),
    ("{%s, variant: [fp16]}" % TINY, ["key 'variant'", "['fp16'] (list)", "weight variant"]),
    ("{%s, revision: 7}" % TINY, ["key 'revision'", "7 (int)", "revision"]),
    ("{%s, height: true}" % TINY, ["key 'height'", "True (bool)", "positive integer"]),
    ("{%s, width: 64.5}" % TINY, ["key 'width'", "64.5 (float)", "positive integer"]),
    ("{%s, steps: null}" % TINY, ["key 'steps'", "None (null)", "positive integer"]),
    ("{%s, size_factor: 0}" % TINY, ["key 'size_factor'", "0 (int)", "positive integer"]),
    ("{%s, max_prompt_tokens: '77'}" % TINY, ["key 'max_prompt_tokens'", "'77' (str)"]),
    ("{%s, pipeline: 5}" % TINY, ["key 'pipeline'", "5 (int)", "pipeline class name"]),
    ("{%s, family: 1}" % TINY, ["key 'family'", "1 (int)", "'eps'"]),
    ("{%s, gpu_dtype: half}" % TINY, ["key 'gpu_dtype'", "'half' (str)", "float16, bfloat16 or float32"]),
    ("{%s, name: other}" % TINY, ["key 'name'", "not allowed", "its key under 'models:'"]),
    ("{%s, stepz: 3}" % TINY, ["key 'stepz'", "unknown", "steps"]),
    ("{base: sd99, source: x/y}", ["key 'base'", "'sd99' (str)", "built-in model", "sd15"]),
    ("{base: [sd15], source: x/y}", ["key 'base'", "['sd15'] (list)", "built-in model"]),
    ("{source: org/repo, steps: 4}", ["missing keys", "'scheduler'", "'guidance'", "base:"]),
    ("{%s, scheduler: eulr}" % TINY, ["key 'scheduler'", "eulr"]),
    ("[source, x]", ["model 'm'", "(list)", "mapping of settings"]),
    ("{base: flux-dev, source: x/y, max_sequence_length: 0}", ["key 'max_sequence_length'", "0 (int)", "positive"]),
]


@pytest.mark.parametrize("entry, names", WRONG_TYPES, ids=[f"{i}-{n[1][1]}" for i, n in enumerate(WRONG_TYPES)])
def test_each_wrong_value_names_model_key_value_and_type(tmp_path, entry, names):
    message = load_error(tmp_path, f"models:\n  m: {entry}\n")
    for name in names:
        assert name in message, (name, message)


def test_model_names_must_be_strings_and_every_problem_is_reported(tmp_path):
    message = load_error(tmp_path, f"models:\n  5: {{{TINY}}}\n  ~: {{{TINY}}}\n  ok: {{{TINY}, steps: x, width: []}}\n")
    assert "4 problem(s)" in message
    assert "model name 5 (int): expected a non-empty string" in message
    assert "model name None (null)" in message
    assert "model 'ok', key 'steps': got 'x' (str)" in message and "model 'ok', key 'width': got [] (list)" in message
    for text, expected in [("models: [a, b]\n", "'models': ['a', 'b'] (list)"), ("- 1\n", "[1] (list)"),
                           ("models: {a: {%s}\n" % TINY, "not valid YAML")]:
        assert expected in load_error(tmp_path, text)


def test_long_values_are_cut_in_messages(tmp_path):
    message = load_error(tmp_path, "models:\n  m: {%s, scheduler: [%s]}\n" % (TINY, ", ".join(["x" * 50] * 1000)))
    assert len(message) < 600 and "..." in message


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("defaults: &d {base: tiny-random, source: 'builtin:tiny-random', steps: 3}\n"
                    "models:\n  a: {<<: *d, guidance: 2}\n  b: {<<: *d, steps: 5, scheduler: ddim}\n")
    specs = load_models_yaml(path)
    assert (specs["a"].steps, specs["a"].guidance, specs["a"].scheduler) == (3, 2.0, "pndm")
    assert isinstance(specs["a"].guidance, float)
    assert (specs["b"].steps, specs["b"].scheduler) == (5, "ddim")


@pytest.mark.parametrize("entry, names", [WRONG_TYPES[i] for i in (0, 1, 3, 4, 5, 8, 15)],
                         ids=[WRONG_TYPES[i][1][1] for i in (0, 1, 3, 4, 5, 8, 15)])
def test_wrong_types_stop_generate_before_ray(tmp_path, capsys, entry, names):
    err = run_generate(tmp_path, capsys, f"models:\n  m: {entry}\n")
    assert "--models" in err
    for name in names:
        assert name in err, (name, err)


def test_integer_model_name_stops_generate(tmp_path, capsys):
    err = run_generate(tmp_path, capsys, f"models:\n  5: {{{TINY}}}\n", model="tiny-random")
    assert "model name 5 (int)" in err


def test_alias_bomb_in_models_file_is_refused(tmp_path, capsys):
    err = run_generate(tmp_path, capsys, BILLION_LAUGHS + f"\nmodels:\n  m: {{{TINY}, scheduler: *l9}}\n")
    assert "refused" in err and "aliases" in err and "models.yaml" in err
    for bomb, why in [("a: &a [1, *a]\nmodels: {}\n", "recursive alias"), ("x: " + "[" * 500 + "]" * 500, "nested")]:
        assert why in run_generate(tmp_path, capsys, bomb)


# --------------------------------------------------------------------------- damaged model directories


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from pipelines.registry.tiny import build_tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    build_tiny_sd_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def damaged_copy(saved_tiny, tmp_path, damage) -> str:
    copy = tmp_path / "model"
    shutil.copytree(saved_tiny, copy)
    damage(copy)
    return f"models:\n  broken: {{base: tiny-random, source: {json.dumps(str(copy))}, pipeline: StableDiffusionPipeline}}\n"


def _drop_unet_weights(d):
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()


def _index_names_missing_component(d):
    index = json.loads((d / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (d / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(d / "vae")


DAMAGES = {
    "unet weights deleted": (_drop_unet_weights, ["model 'broken'", "unet/", "no *.safetensors"], ModelNotFoundError),
    "unet config corrupt": (lambda d: (d / "unet" / "config.json").write_text("{not json"),
                            ["model 'broken'", "unet/config.json", "not valid JSON", "line 1"], ModelConfigError),
    "model_index corrupt": (lambda d: (d / "model_index.json").write_text('{"_class_name": '),
                            ["model 'broken'", "model_index.json", "not valid JSON"], ModelConfigError),
    "model_index a list": (lambda d: (d / "model_index.json").write_text("[1]"),
                           ["model_index.json", "expected a JSON object"], ModelConfigError),
    "component folders missing": (_index_names_missing_component,
                                  ["model 'broken'", "folders are missing", "vae/ (diffusers AutoencoderKL)",
                                   "transformer/ (diffusers SD3Transformer2DModel)"], ModelNotFoundError),
    "text encoder config not utf-8": (lambda d: (d / "text_encoder" / "config.json").write_bytes(b"\xff\xfe{}"),
                                      ["text_encoder/config.json", "not valid JSON"], ModelConfigError),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_model_directory_is_found_on_the_driver(tmp_path, capsys, saved_tiny, case):
    damage, names, error = DAMAGES[case]
    text = damaged_copy(saved_tiny, tmp_path, damage)
    err = run_generate(tmp_path, capsys, text, model="broken")
    for name in names:
        assert name in err, (name, err)
    spec = load_models_yaml(tmp_path / "models.yaml")["broken"]
    with pytest.raises(error):
        check_available(spec)


@pytest.mark.parametrize("pipeline, names", [
    ("NoSuchPipeline", ["key 'pipeline'", "'NoSuchPipeline'", "no pipeline class"]),
    ("StableDifusionPipeline", ["'StableDifusionPipeline'", "did you mean StableDiffusionPipeline"]),
    ("UNet2DConditionModel", ["'UNet2DConditionModel'", "no pipeline class"]),  # a diffusers class, not a pipeline
])
def test_unknown_pipeline_class_is_found_on_the_driver(tmp_path, capsys, saved_tiny, pipeline, names):
    text = damaged_copy(saved_tiny, tmp_path, lambda d: None).replace("StableDiffusionPipeline", pipeline)
    err = run_generate(tmp_path, capsys, text, model="broken")
    for name in ["model 'broken'", *names]:
        assert name in err, (name, err)


def test_auto_pipeline_checks_the_class_model_index_names(tmp_path, capsys, saved_tiny):
    def rename(d):
        index = json.loads((d / "model_index.json").read_text())
        (d / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))

    text = damaged_copy(saved_tiny, tmp_path, rename).replace("StableDiffusionPipeline", "auto")
    err = run_generate(tmp_path, capsys, text, model="broken")
    assert "model_index.json names _class_name 'NoSuchPipeline'" in err


def test_a_healthy_copy_passes_and_loads_without_the_torch_dtype_warning(tmp_path, saved_tiny, recwarn):
    from pipelines.registry.loading import load_model

    (tmp_path / "models.yaml").write_text(damaged_copy(saved_tiny, tmp_path, lambda d: None))
    spec = load_models_yaml(tmp_path / "models.yaml")["broken"]
    check_available(spec)
    loaded = load_model(spec)
    assert loaded.pipe.unet is not None and loaded.dtype == "float32"
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]


def test_input_errors_are_the_jobs_exit_2_family():
    assert issubclass(ModelConfigError, InputError) and issubclass(ModelNotFoundError, InputError)
    assert yaml.safe_load(BILLION_LAUGHS)["l0"][0] == "lol"  # the bomb is valid YAML: only the loader's bound stops it


def test_t5_text_longer_than_diffusers_allows_is_refused_up_front(tmp_path, capsys):
    """FluxPipeline and StableDiffusion3Pipeline raise on max_sequence_length > 512 only when called (every
    row an error row); the models YAML says so before the run, naming the model and the key. 512 is fine."""
    err = run_generate(tmp_path, capsys, "models:\n  m: {base: flux-dev, source: x/y, max_sequence_length: 1024}\n")
    for name in ("--models", "model 'm'", "key 'max_sequence_length'", "1024 (int)", "up to 512", "FluxPipeline"):
        assert name in err, (name, err)
    path = tmp_path / "ok.yaml"
    path.write_text("models:\n  m: {base: sd35-medium, source: x/y, max_sequence_length: 512}\n")
    assert load_models_yaml(path)["m"].max_sequence_length == 512
