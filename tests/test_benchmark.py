"""jobs/benchmark.py, pipelines/benchmarking/ and the cluster/ configs, on CPU."""

import copy
import fnmatch
import importlib
import json
import re
import shlex
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from jobs import benchmark
from pipelines.benchmarking import report
from pipelines.benchmarking import rows as bench_rows
from pipelines.benchmarking.busy import Span, busy_intervals, covered_length, device_busy
from pipelines.benchmarking.flops import count_flops
from pipelines.benchmarking.history import apply_history
from pipelines.benchmarking.pixels import half_precision_match, mean_pixel_diff
from pipelines.registry.models import EMBEDDED_DIR
from tests.conftest import ROOT

FIELDS = ["run_id", "suite", "model", "path", "device", "device_name", "dtype", "batch_size", "rows", "steps",
          "height", "width", "images_per_s", "s_per_image", "flops_per_image", "achieved_tflops", "mfu",
          "peak_mem_bytes", "torch_version", "diffusers_version", "created_at"]


# --------------------------------------------------------------------------- architectures and FLOPs


def test_flops_positive_and_linear_in_batch(tiny_model):
    from pipelines.benchmarking.flops import count_flops, flops_per_image

    one = count_flops(tiny_model.pipe, 32, 32, cfg=False)
    assert all(v > 0 for v in one.values())
    for batch in (2, 4):
        many = count_flops(tiny_model.pipe, 32, 32, cfg=False, batch=batch)
        for key in one:
            assert many[key] == pytest.approx(batch * one[key], rel=0.02)
    assert count_flops(tiny_model.pipe, 32, 32, cfg=True)["unet_step"] == pytest.approx(2 * one["unet_step"], rel=0.02)
    assert flops_per_image(one, 10) == 10 * one["unet_step"] + one["vae_decode"] + one["text"]


def test_real_architectures_match_published_sizes_and_flops():
    """Meta-device builds: no memory, no compute (FLUX's 12B never allocated). Parameter counts
    are those of the released checkpoints; SD 1.5's FLOPs are the issue's 1.61 TFLOP per CFG step, 82.8 per image."""
    from pipelines.benchmarking.architectures import build_random_pipeline, parameter_counts
    from pipelines.benchmarking.flops import count_flops, flops_per_image

    sd15 = build_random_pipeline("sd15", device="meta")
    assert parameter_counts(sd15) == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    counts = count_flops(sd15, 512, 512)
    assert counts["unet_step"] / 1e12 == pytest.approx(1.61, abs=0.01)
    assert flops_per_image(counts, 50) / 1e12 == pytest.approx(82.8, rel=0.01)
    sdxl = build_random_pipeline("sdxl", device="meta")
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline"
    assert parameter_counts(sdxl) == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                                      "text_encoder_2": 694_659_840}
    # SD 3.5-medium: MMDiT-X 2.24B parameters + the 384x384 position table (a saved buffer) = the
    # published 2.5B (2.47B); CLIP-L and CLIP-G with projection, T5-XXL's encoder 4.76B
    sd35 = build_random_pipeline("sd35-medium", device="meta")
    assert parameter_counts(sd35) == {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304,
                                      "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}
    assert sd35.transformer.pos_embed.pos_embed.numel() == 384 * 384 * 1536
    assert sum(1 for b in sd35.transformer.transformer_blocks if b.attn2 is not None) == 13  # dual attention
    # FLUX.1: 19 double + 38 single blocks, 11.9B (dev's guidance embedder: +10.2M), CLIP-L, T5-XXL
    for name, transformer in (("flux-dev", 11_901_408_320), ("flux-schnell", 11_891_178_560)):
        flux = build_random_pipeline(name, device="meta")
        assert parameter_counts(flux) == {"transformer": transformer, "vae": 83_819_683, "text_encoder": 123_060_480,
                                          "text_encoder_2": 4_762_310_656}
        assert (len(flux.transformer.transformer_blocks), len(flux.transformer.single_transformer_blocks)) == (19, 38)
        assert flux.transformer.config.guidance_embeds == (name == "flux-dev")
    with pytest.raises(ValueError, match="unknown architecture 'sd9'.*flux-dev, flux-schnell, sd15, sd35-medium, sdxl"):
        build_random_pipeline("sd9", device="meta")


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux-dev"])  # schnell: the same path, no guidance input
def test_transformer_flops_scale_with_image_tokens(name):
    """SD3's and FLUX's transformer step and T5 text are counted on meta like the UNet's. The
    step is a quadratic in the image tokens ((H/16)*(W/16) at the real models' factor 16;
    here the tiny VAE has factor 1 and SD3 patch 1, FLUX packs 2x2): linear layers grow with
    the tokens, joint attention with (image + text tokens)^2. CFG doubles step and text; T5
    text grows with max_sequence_length."""
    from fractions import Fraction

    from pipelines.registry.tiny_families import TINY_FAMILIES

    pipe = TINY_FAMILIES[name][0](0)
    flux = type(pipe).__name__ == "FluxPipeline"
    sides = [16, 32, 48, 64]
    counts = {s: count_flops(pipe, s, s, cfg=False) for s in sides}
    assert all(v > 0 for c in counts.values() for v in c.values())
    tokens = [(s // 2) ** 2 if flux else s ** 2 for s in sides]
    steps = [Fraction(counts[s]["unet_step"]) for s in sides]
    # the quadratic through the first three sizes predicts the fourth exactly
    assert steps[3] == sum(f * _lagrange(tokens[:3], i, tokens[3]) for i, f in enumerate(steps[:3]))
    assert steps[0] < steps[1] < steps[2] < steps[3]
    cfg = count_flops(pipe, 32, 32)
    assert cfg["unet_step"] == pytest.approx(2 * counts[32]["unet_step"], rel=0.02)
    assert cfg["text"] == 2 * counts[32]["text"] and cfg["vae_decode"] == counts[32]["vae_decode"]
    longer = count_flops(pipe, 32, 32, cfg=False, max_sequence_length=1024)  # defaults: 256, FLUX-dev 512
    assert longer["text"] > counts[32]["text"] and longer["unet_step"] > counts[32]["unet_step"]


def _lagrange(xs, i, x):
    """The i-th Lagrange basis polynomial through points xs, at x (exact)."""
    from fractions import Fraction

    out = Fraction(1)
    for j, xj in enumerate(xs):
        if j != i:
            out *= Fraction(x - xj, xs[i] - xj)
    return out


# --------------------------------------------------------------------------- the throughput suite


def _run(tmp: Path, *extra) -> int:
    return benchmark.main(["--suite", "throughput", "--model", "tiny-random", "--rows", "4", "--steps", "2",
                           "--batch-sizes", "2", "--out", str(tmp), *extra])


@pytest.fixture(scope="module")
def suite(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("bench")
    assert _run(out) == 0
    return out


def _plain_path_vs_a_direct_diffusers_call(tiny_model) -> int:
    """Largest pixel difference between the plain timed path's first batch and the same rows
    through a diffusers pipeline called here directly (its default PIL output)."""
    import torch
    from diffusers import DDIMScheduler

    from pipelines.benchmarking.plain import time_plain

    spec = tiny_model.spec
    rows = bench_rows.make_rows(spec, benchmark.parse_args(["--model", "tiny-random", "--steps", "2"]), 4)
    _, first, _, _ = time_plain(spec, rows, 2, "cpu", "float32")
    chunk = rows[rows.sample_id.isin(list(first))]
    pipe = copy.copy(tiny_model.pipe)  # the fixture's pipeline keeps its scheduler
    pipe.scheduler = DDIMScheduler.from_config(tiny_model.scheduler_config)  # as diffusers' docs swap one
    images = pipe(prompt=list(chunk.prompt), negative_prompt=list(chunk.negative_prompt), num_inference_steps=2,
                  guidance_scale=float(chunk.guidance.iloc[0]), height=spec.height, width=spec.width,
                  generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk.seed]).images
    assert len(images) == len(first) == 2
    return max(int(np.abs(np.asarray(im, np.int16) - first[sid].astype(np.int16)).max())
               for sid, im in zip(chunk.sample_id, images))


def test_suite_writes_json_parquet_markdown(suite, tiny_model):
    doc = json.loads((suite / "throughput.json").read_text())
    assert doc["environment"]["device"] == "cpu" and doc["environment"]["torch_version"]
    recs = pd.DataFrame(doc["records"])
    assert sorted(recs.path) == ["actor", "plain", "ray"]
    assert set(FIELDS) <= set(recs.columns)
    for col in ["images_per_s", "s_per_image", "flops_per_image", "achieved_tflops", "mfu", "seconds"]:
        assert (recs[col] > 0).all(), col
    assert (recs.batch_size == 2).all() and (recs.rows == 4).all() and (recs.errors == 0).all()
    assert _plain_path_vs_a_direct_diffusers_call(tiny_model) <= 1  # the baseline is what a user gets
    parquet = pd.read_parquet(suite / "throughput.parquet")
    assert len(parquet) == 3 and set(FIELDS) <= set(parquet.columns)
    md = (suite / "throughput.md").read_text()
    assert "| path | batch | images/s | s/image | MFU | peak mem | vs plain diffusers |" in md
    assert "plain diffusers | 2 |" in md and "diffsweep Ray job | 2 |" in md


def test_same_pixels_and_ray_overhead(suite):
    recs = {r["path"]: r for r in json.loads((suite / "throughput.json").read_text())["records"]}
    assert recs["actor"]["pixels_match"] is True and recs["actor"]["pixels_max_diff"] <= 1
    assert recs["actor"]["pixels_compared"] == 2  # the first batch
    assert recs["ray"]["pixels_match"] is True and recs["ray"]["pixels_compared"] == 4
    ratio = recs["ray"]["ray_overhead_ratio"]
    assert recs["ray"]["startup_s"] < recs["ray"]["seconds"] and recs["ray"]["ray_steady_ratio"] > ratio
    assert 0 < ratio and 0 < recs["ray"]["ray_steady_ratio"] and recs["ray"]["startup_s"] >= 0
    assert recs["plain"]["vs_plain"] == 1.0 and recs["actor"]["peak_mem_bytes"] > 0
    assert 0 < recs["ray"]["actor_busy"] <= 1
    # a single-configuration run is not profiled unless asked (--profile-busy)
    assert recs["plain"]["device_busy"] is None and recs["actor"]["device_busy"] is None


def test_history_flags_a_regression_with_exit_3(suite, tmp_path):
    """A previous run 100x faster than this machine can be -> this run regressed."""
    previous = pd.read_parquet(suite / "throughput.parquet")
    previous = previous[previous.path != "ray"].assign(run_id="earlier", created_at="2000-01-01T00:00:00+00:00",
                                                       images_per_s=previous.images_per_s * 100)
    history = tmp_path / "history.parquet"
    previous.to_parquet(history, index=False)
    assert _run(tmp_path / "out", "--paths", "plain,actor", "--history", str(history), "--tolerance", "0.1") == 3
    hist = pd.read_parquet(history)
    assert len(hist) == 4 and hist.run_id.nunique() == 2
    new = hist[hist.run_id != "earlier"]
    assert new.regression.all() and (new.baseline_runs == 1).all()
    assert "REGRESSION" in (tmp_path / "out" / "throughput.md").read_text()


def test_history_median_over_window(tmp_path):
    """No regression against slower runs; the median is over the last `window` runs of the same key."""
    key = dict(suite="throughput", sweep="single", model="m", device_name="cpu x2", batch_size=4, path="actor",
               batching="config", compile="none", channels_last=False, fuse_qkv=False, dtype="float32", steps=2,
               height=32, width=32)
    old = [dict(key, run_id=f"r{i}", created_at=f"2020-01-0{i + 1}", images_per_s=ips)
           for i, ips in enumerate([100.0, 1.0, 2.0, 3.0])]
    other = dict(key, batch_size=8, run_id="r9", created_at="2020-01-09", images_per_s=1000.0)
    history = tmp_path / "h.parquet"
    pd.DataFrame(old + [other]).to_parquet(history, index=False)  # from before the cache_interval key column
    reuse = dict(key, cache_interval=2, run_id="reuse", created_at="2021-01-01", images_per_s=0.1)
    assert apply_history([reuse], str(history), tolerance=0.1, window=3) is False
    assert reuse["baseline_runs"] == 0  # a new configuration: nothing to compare with
    rec = dict(key, cache_interval=1, run_id="now", created_at="2021-01-01", images_per_s=1.9)
    assert apply_history([rec], str(history), tolerance=0.1, window=3) is False
    assert rec["baseline_images_per_s"] == 2.0 and rec["baseline_runs"] == 3  # median of r1..r3, not r0 or r9
    rec2 = dict(key, cache_interval=1, run_id="later", created_at="2021-01-02", images_per_s=1.0)
    assert apply_history([rec2], str(history), tolerance=0.1, window=3) is True
    assert len(pd.read_parquet(history)) == 8


def test_bad_flags_exit_2(tmp_path, capsys):
    assert benchmark.main(["--model", "nope", "--out", str(tmp_path), "--paths", "plain"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--paths", "plain,gpu"])
    assert e.value.code == 2


def test_mixed_sweep_with_both_batchings(tmp_path):
    """36 configurations; plain diffusers loops over them, the actor runs them grouped and
    continuously batched, and all three give the same pixels."""
    assert benchmark.main(["--model", "tiny-random", "--sweep", "mixed", "--steps", "3", "--rows", "36",
                           "--batch-sizes", "4", "--paths", "plain,actor", "--batching", "config,continuous",
                           "--out", str(tmp_path)]) == 0
    recs = pd.DataFrame(json.loads((tmp_path / "throughput.json").read_text())["records"])
    assert sorted(zip(recs.path, recs.batching.fillna("-"))) == [("actor", "config"), ("actor", "continuous"),
                                                                ("plain", "-")]
    assert (recs.sweep == "mixed").all() and (recs.scheduler == "mixed").all() and (recs.steps == 3).all()
    actors = recs[recs.path == "actor"]
    assert actors.pixels_match.all() and (actors.errors == 0).all()
    # guidance 1 rows skip the unconditional pass, so the average is below a CFG row's FLOPs
    assert recs.flops_per_image.iloc[0] < 3 * recs.unet_step_flops.iloc[0] + recs.vae_decode_flops.iloc[0] + \
        recs.text_flops.iloc[0]
    md = (tmp_path / "throughput.md").read_text()
    assert "mixed sweep of 36 rows: ddim / euler_a / dpmpp_2m / unipc x" in md
    assert "diffsweep actor (continuous batching) | 4 |" in md
    # a mixed sweep is profiled by default: one extra pass per in-process path
    parquet = pd.read_parquet(tmp_path / "throughput.parquet")
    assert parquet.device_busy.dtype == "float64" and parquet.profiled_s.dtype == "float64"
    assert parquet.device_busy.between(0, 1, inclusive="right").all() and (parquet.profiled_s > 0).all()
    assert "| busy |" in md and "device busy" in md


# --------------------------------------------------------------------------- device busy


def test_covered_length_counts_overlaps_once():
    assert covered_length([]) == 0
    assert covered_length([(5, 6), (0, 2), (1, 3)]) == 4  # unsorted, overlapping
    assert covered_length([(0, 10), (2, 3), (9, 12)]) == 12  # nested, then sticking out
    assert covered_length([(0, 1), (1, 2), (4, 4)]) == 2  # touching; empty


def test_busy_intervals_keeps_top_level_aten_ops_and_device_work():
    S = Span
    spans = [S("cpu_op", "aten::conv2d", 1, 0, 10), S("cpu_op", "aten::convolution", 1, 0, 9),  # child, same start
             S("cpu_op", "aten::add", 1, 12, 15), S("cpu_op", "aten::empty", 1, 15, 15),
             S("cpu_op", "aten::mm", 2, 5, 20),  # another thread: top level there
             S("cpu_op", "UNet2DConditionModel", 1, 0, 30), S("user_annotation", "step", 1, 0, 30),
             S("cuda_runtime", "cudaLaunchKernel", 1, 1, 2), S("kernel", "gemm", 7, 3, 6),
             S("gpu_memcpy", "Memcpy HtoD", 7, 8, 9), S("gpu_memset", "Memset", 7, 9, 10),
             S("gpu_user_annotation", "step", 7, 0, 30)]
    assert busy_intervals(spans, "cpu") == [(0, 10), (5, 20), (12, 15)]
    assert covered_length(busy_intervals(spans, "cpu")) == 20
    assert sorted(busy_intervals(spans, "cuda")) == [(3, 6), (8, 9), (9, 10)]


def test_device_busy_from_a_real_cpu_trace():
    """Matmuls with sleeps between them keep the CPU busy a small fraction of the time;
    the same matmuls back to back keep it busy most of it."""
    import torch

    a = torch.randn(256, 256)

    def sleepy():
        for _ in range(4):
            a @ a
            time.sleep(0.05)

    def back_to_back():
        for _ in range(40):
            a @ a

    idle, idle_wall = device_busy(sleepy, "cpu")
    busy, _ = device_busy(back_to_back, "cpu")
    assert idle_wall >= 0.2 and 0 < idle < 0.5
    assert idle < busy <= 1 and busy > 0.5


def test_mixed_sweep_header_names_the_schedulers_of_the_model_family():
    """A flow-matching model sweeps the flow schedulers, and the header says so."""
    from pipelines.registry.models import ModelRegistry

    args = benchmark.parse_args(["--sweep", "mixed", "--steps", "10"])
    spec = ModelRegistry().get("sd35-medium")
    rows = pd.DataFrame(bench_rows.configurations(spec, args), columns=["scheduler", "steps", "guidance"])
    used = bench_rows.schedulers_used(spec, args, rows)
    assert used == ["flow_match_euler", "flow_match_heun"]
    header = report.configuration(dict(sweep="mixed", steps=10, guidance=4.5, rows=18, height=64, width=64,
                                           schedulers=",".join(used)))
    assert "flow_match_euler / flow_match_heun x [4, 7, 10] steps" in header and "ddim" not in header
    assert args.profile_busy and not benchmark.parse_args([]).profile_busy
    assert not benchmark.parse_args(["--sweep", "mixed", "--no-profile-busy"]).profile_busy


@pytest.mark.skipif(not (EMBEDDED_DIR / "model_index.json").is_file(), reason="embedded model not built yet")
def test_suite_runs_on_the_embedded_model(tmp_path):
    assert benchmark.main(["--model", "embedded", "--rows", "2", "--steps", "2", "--batch-sizes", "2",
                           "--paths", "plain,actor", "--out", str(tmp_path)]) == 0
    recs = json.loads((tmp_path / "throughput.json").read_text())["records"]
    assert {r["path"] for r in recs} == {"plain", "actor"}
    assert all(r["images_per_s"] > 0 for r in recs) and recs[-1]["pixels_match"] is True


def test_cache_interval_times_feature_reuse_against_unmodified_plain_diffusers(tmp_path, tiny_model):
    """The actor runs the rows with feature reuse; plain diffusers stays the unmodified
    reference, so its pixels are not compared, and each path's MFU counts the FLOPs it ran."""
    assert benchmark.main(["--model", "tiny-random", "--rows", "2", "--steps", "4", "--batch-sizes", "2",
                           "--paths", "plain,actor", "--cache-interval", "2", "--out", str(tmp_path)]) == 0
    recs = {r["path"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["records"]}
    plain, actor = recs["plain"], recs["actor"]
    assert (plain["cache_interval"], actor["cache_interval"]) == (1, 2)
    assert actor["flops_per_image"] < plain["flops_per_image"]  # 2 of the 4 steps are shallow
    counts = count_flops(tiny_model.pipe, plain["height"], plain["width"])  # plain: 4 full steps; actor: 2 + 2 shallow
    rest = counts["vae_decode"] + counts["text"]
    assert plain["flops_per_image"] == pytest.approx(4 * counts["unet_step"] + rest)
    assert actor["flops_per_image"] == pytest.approx(2 * counts["unet_step"] + 2 * counts["unet_shallow_step"] + rest)
    assert actor["pixels_match"] is None and actor["errors"] == 0
    md = (tmp_path / "throughput.md").read_text()
    assert "diffsweep actor (cache_interval 2)" in md and "TFLOP at cache_interval 2" in md
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--cache-interval", "0"])


def test_half_precision_is_checked_against_a_float32_reference(tmp_path):
    """In bfloat16 pixel equality is no criterion (batch composition alone moves pixels); the
    actor must be as close to a float32 run of the first batch as plain diffusers is."""
    assert benchmark.main(["--model", "tiny-random", "--rows", "2", "--steps", "3", "--batch-sizes", "2",
                           "--paths", "plain,actor", "--dtype", "bfloat16", "--channels-last",
                           "--out", str(tmp_path)]) == 0
    recs = {r["path"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["records"]}
    plain, actor = recs["plain"], recs["actor"]
    assert plain["reference_images"] == actor["reference_images"] == 2
    assert plain["fp32_mean_diff"] >= 0 and plain["pixels_match"] is None
    assert actor["pixels_match"] is True
    assert actor["fp32_mean_diff"] <= 1.5 * plain["fp32_mean_diff"] + 0.5
    assert "to the float32 reference" in (tmp_path / "throughput.md").read_text()


def test_half_precision_verdict_and_mean_difference():
    black, grey = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 10, np.uint8)
    assert mean_pixel_diff({"a": grey, "b": black}, {"a": black, "b": black}) == 5.0
    assert mean_pixel_diff({"a": None}, {"a": black}) is None  # an error row
    assert half_precision_match(3.0, 2.0, tolerance=1.5)  # 3.0 <= 1.5 x 2.0 + 0.5
    assert not half_precision_match(3.6, 2.0, tolerance=1.5)
    assert half_precision_match(0.4, 0.0, tolerance=1.5)  # plain exact: half a level of slack
    assert not half_precision_match(None, 2.0, tolerance=1.5)


# --------------------------------------------------------------------------- cluster configs

CLUSTER = ROOT / "cluster"


def _scripts(command: str) -> list[str]:
    return [w for w in shlex.split(command) if w.startswith("jobs/") and w.endswith(".py")]


def _find(doc, key):
    """Every value under `key`, anywhere in a nested YAML document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(doc, list):
        for v in doc:
            yield from _find(v, key)


def _job_commands(text: str, doc) -> list[list[str]]:
    """Every `python jobs/NAME.py ...` command in a cluster file, as [script, *flags]: the YAML
    entrypoints and the usage lines in its comments (a trailing backslash continues a line)."""
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    logical = [*_find(doc, "entrypoint"), *comments.replace("\\\n", " ").splitlines()]
    return [shlex.split(m.group(1)) for line in logical for m in re.finditer(r"python3? (jobs/\S+\.py.*)", line)]


def _excluded(pattern: str, path: str) -> bool:
    """Whether a runtime_env `excludes` entry (gitignore style) drops `path`."""
    if pattern.endswith("/"):
        return pattern.rstrip("/") in path.split("/")[:-1]
    return fnmatch.fnmatch(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern)


def _check_runtime_env(env: dict, where: str, working_dir: Path) -> None:
    """working_dir holds the jobs, excludes drop none of the code, pip entries are requirements
    of this project that the versions tested here satisfy."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert (working_dir / "jobs" / "generate.py").is_file(), f"{where}: working_dir {env['working_dir']!r}"
    code = [str(f.relative_to(ROOT)) for d in ("jobs", "pipelines", "evals") for f in (ROOT / d).rglob("*")
            if f.is_file() and "__pycache__" not in f.parts]
    dropped = [(x, f) for x in env.get("excludes", []) for f in code if _excluded(x, f)]
    assert not dropped, f"{where}: excludes drop code: {dropped[:3]}"
    ours = {canonicalize_name(Requirement(r).name)
            for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for entry in env.get("pip", []):
        req = Requirement(entry)
        assert canonicalize_name(req.name) in ours, f"{where}: pip {entry!r} is not a dependency in pyproject.toml"
        assert req.specifier.contains(metadata.version(req.name)), \
            f"{where}: pip {entry!r}, but the tests ran {req.name} {metadata.version(req.name)}"


@pytest.mark.parametrize("name", ["runtime_env.yaml", "cluster.yaml", "rayjob.yaml", "benchmark-cronjob.yaml"])
def test_cluster_files_name_real_jobs_flags_paths_and_packages(name):
    """Every job command in a cluster file names a script that exists, with flags its parser
    accepts; every cluster/ file it names exists; its runtime environments resolve."""
    text = (CLUSTER / name).read_text()
    doc = yaml.safe_load(text)
    for script, *flags in _job_commands(text, doc):
        assert (ROOT / script).is_file(), f"{name}: {script} does not exist"
        module = importlib.import_module("jobs." + Path(script).stem)
        try:
            module.parse_args(flags)
        except SystemExit:
            pytest.fail(f"{name}: {script} refuses {' '.join(flags)}")
    for mentioned in re.findall(r"cluster/[\w.-]+", text):
        assert (ROOT / mentioned).is_file(), f"{name}: names {mentioned}, which does not exist"
    if name == "runtime_env.yaml":  # used from the repository root: ray job submit --runtime-env cluster/...
        _check_runtime_env(doc, name, ROOT / doc["working_dir"])
    for env_yaml in _find(doc, "runtimeEnvYAML"):  # KubeRay: the image's checkout, where the containers start
        env = yaml.safe_load(env_yaml)
        assert {env["working_dir"]} == set(_find(doc, "workingDir")), f"{name}: working_dir vs containers"
        _check_runtime_env(env, name, ROOT)


@pytest.mark.parametrize("name,script", [("rayjob.yaml", "jobs/generate.py"),
                                         ("benchmark-cronjob.yaml", "jobs/benchmark.py")])
def test_cluster_entrypoints_name_real_scripts(name, script):
    doc = yaml.safe_load((CLUSTER / name).read_text())
    entrypoints = list(_find(doc, "entrypoint"))
    assert entrypoints, f"{name}: no entrypoint"
    scripts = [s for e in entrypoints for s in _scripts(e)]
    assert script in scripts
    assert all((ROOT / s).is_file() for s in scripts), scripts
    assert any(v == 1 or v == "1" for v in _find(doc, "nvidia.com/gpu")), f"{name}: no GPU workers"


def test_cluster_launcher_has_gpu_workers_and_runtime_env_points_at_repo():
    launcher = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    assert launcher["cluster_name"] and launcher["max_workers"] >= 1
    gpu_types = [t for t in launcher["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and any(p.startswith("diffusers") for p in env["pip"])
