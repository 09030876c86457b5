"""jobs/evaluate.py end to end: tiny-random results, a tiny CLIP, a local Ray."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from evals.decode import try_decode
from evals.features import HFCLIPExtractor
from evals.metrics_table import DESCRIPTION_COLUMNS
from evals.report.format import fmt_ci, fmt_num
from jobs import evaluate as eval_job
from jobs import generate as gen_job
from tests.conftest import ROOT, write_parquet
from tests.test_clip_score import _torchmetrics_clip_score
from tests.test_features import make_tiny_clip_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("eval")
    rows = [dict(prompt=p, seed=s, scheduler=sched, steps=3, guidance=g, model="tiny-random")
            for p in ["a red circle", "a blue square"] for s in range(3)
            for sched in ["ddim", "euler"] for g in [1.0, 7.5]]
    results = tmp / "results"
    assert gen_job.main([str(write_parquet(tmp / "m.parquet", rows)), "--out", str(results), "--no-progress"]) == 0
    clip = make_tiny_clip_dir(tmp / "clip")
    ref = next(results.glob("part-*.parquet"))
    args = [str(results), "--features", "clip", "--clip-model", str(clip), "--reference", str(ref),
            "--out", str(tmp / "report"), "--n-boot", "20", "--no-progress"]
    assert eval_job.main(args) == 0
    return tmp, results, args


def test_metrics_table_has_a_row_per_configuration(evaluated):
    tmp, _, _ = evaluated
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    assert len(m) == 4 and set(m.scheduler) == {"ddim", "euler"}
    assert (m.n == 6).all() and (m.n_error == 0).all()
    for col in ["fid", "fid_ci_lo", "fid_ci_hi", "kid", "kid_std", "clip_score", "clip_score_ci_lo",
                "clip_score_ci_hi", "diversity", "vendi", "gen_seconds", "images_per_gpu_second"]:
        assert m[col].notna().all(), col
    assert (m.fid_ci_lo <= m.fid_ci_hi).all() and (m.clip_score_ci_lo <= m.clip_score).all()
    assert (m.extractor.str.startswith("clip")).all() and m.reference.str.endswith(".parquet").all()
    assert (tmp / "report" / "metrics.csv").is_file() and "| ddim |" in (tmp / "report" / "metrics.md").read_text()
    html = (tmp / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html


def test_metrics_say_how_they_were_measured(evaluated):
    """metrics.md opens with the extractor, image processor, resize, reference and its n, CLIP
    model and n_boot; every row of metrics.parquet carries the same in its own columns."""
    tmp, results, _ = evaluated
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    assert set(DESCRIPTION_COLUMNS) <= set(m.columns)
    ref_n = len(pd.read_parquet(next(results.glob("part-*.parquet")), columns=["status"]).query("status == 'ok'"))
    row = m.iloc[0]
    assert (row.reference_n, row.n_boot, row.ci_level, row.image_size) == (ref_n, 20, 0.95, 64)
    assert row.clip_model == row.extractor and row.image_processor in ("pil", "torchvision")
    assert len(row.weights) == 12 and (m[list(DESCRIPTION_COLUMNS)].nunique(dropna=False) == 1).all()
    header = (tmp / "report" / "metrics.md").read_text().split("\n\n| ", 1)[0]
    assert f"- features (FID, KID): {row.extractor}, image processor {row.image_processor}, resize clip-processor, " \
           f"64 px, dim {row.feature_dim}, weights {row.weights}" in header
    assert f"- reference: {row.reference}, n = {ref_n}" in header
    assert f"- CLIP model (CLIP score, diversity): {row.clip_model}, image processor" in header
    assert "n_boot = 20" in header
    assert (m.kid_ci_lo <= m.kid_ci_hi).all() and "KID [95% CI]" in (tmp / "report" / "metrics.md").read_text()


def test_cost_is_named_by_its_device_with_its_calls(evaluated):
    """On this CPU the cost columns say CPU (not GPU), every row names its device, calls and
    their sizes, and the Run panel lists device, dtype and versions from the results."""
    tmp, results, _ = evaluated
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    rows = pd.concat([pd.read_parquet(p) for p in results.glob("part-*.parquet")])
    assert (m.device == rows.device.iloc[0]).all() and m.device.str.startswith("cpu").all()
    assert (m.n_calls >= 1).all() and (m.dtype == "float32").all()
    for r in m.itertuples():  # Ray Data's batches can split a configuration across calls
        sizes = rows[(rows.scheduler == r.scheduler) & (rows.guidance == r.guidance)].batch_size.unique()
        assert r.batch_sizes == ", ".join(map(str, sorted(sizes)))
    assert not (m.cost_comparable & m.batch_sizes.str.contains(",")).any()  # a split configuration is flagged
    md = (tmp / "report" / "metrics.md").read_text()
    assert "| CPU s / image" in md and "GPU" not in md and f"- cost: {rows.device.iloc[0]}, float32" in md
    assert ("> warning: cost: " in md) == (not m.cost_comparable.all())
    run = (tmp / "report" / "report.html").read_text().split('<section id="meta">', 1)[1].split("</section>")[0]
    for label, value in (("device", rows.device.iloc[0]), ("dtype", "float32"),
                         ("diffusers", rows.diffusers_version.iloc[0]), ("torch", rows.torch_version.iloc[0])):
        assert f"<th>{label}</th><td>{value}</td>" in run


def test_clip_score_is_torchmetrics_per_configuration(evaluated):
    """The job's CLIP score of each configuration = torchmetrics' CLIPScore on that
    configuration's images and prompts; image_scores.parquet has the unclamped per-image scores."""
    tmp, results, _ = evaluated
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    per_image = pd.read_parquet(tmp / "report" / "image_scores.parquet")
    rows = pd.concat([pd.read_parquet(p) for p in results.glob("part-*.parquet")])
    clip = HFCLIPExtractor(tmp / "clip", device="cpu")
    for r in m.itertuples():
        group = rows[(rows.scheduler == r.scheduler) & (rows.guidance == r.guidance)]
        images = np.stack([try_decode(b)[0] for b in group.image])
        theirs = _torchmetrics_clip_score(clip, images, list(group.prompt))
        assert r.clip_score == pytest.approx(theirs, rel=1e-4, abs=1e-4)
        raw = per_image[(per_image.scheduler == r.scheduler) & (per_image.guidance == r.guidance)].clip_score_raw
        assert len(raw) == r.n and r.clip_score == pytest.approx(max(raw.mean(), 0.0), rel=1e-12)
    assert set(per_image.sample_id) == set(rows.sample_id)


def test_precision_recall_density_coverage_and_cmmd_per_configuration(evaluated):
    """On CLIP features (--features clip) every configuration gets all five, and the rows and
    the metrics.md header name the features and k."""
    tmp, _, _ = evaluated
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    for col in ["precision", "recall", "density", "coverage", "cmmd", "cmmd_ci_lo", "cmmd_ci_hi"]:
        assert m[col].notna().all(), col
    assert m[["precision", "recall", "coverage"]].apply(lambda c: c.between(0, 1)).all(axis=None)
    assert (m.cmmd_ci_lo <= m.cmmd_ci_hi).all() and (m.cmmd_features == m.extractor).all()
    assert (m.pr_k == 3).all() and (m.dc_k == 5).all()
    md = (tmp / "report" / "metrics.md").read_text()
    header, table = md.split("\n\n| ", 1)
    assert f"- precision, recall: k-NN manifolds (Kynkaanniemi et al. 2019), k = 3, on the {m.extractor[0]}" in header
    assert f"sigma = 10, on L2-normalised {m.extractor[0]} embeddings" in header
    assert "| precision | recall | density | coverage | CMMD [95% CI] |" in table.splitlines()[0]


def test_evaluate_with_an_open_clip_model(evaluated, tiny_open_clip, tmp_path):
    """--clip-pretrained DIR (open_clip, tests/conftest.py's tiny model) on the same results:
    features, CLIP score and diversity per configuration are those of the open_clip model, and
    every row names the model and its weights."""
    from evals.feature_cache import files_digest
    from evals.features import get_extractor

    _, results, args = evaluated
    d, _ = tiny_open_clip
    out, ref = tmp_path / "report", args[args.index("--reference") + 1]
    assert eval_job.main([str(results), "--features", "clip", "--clip-pretrained", str(d), "--reference", ref,
                          "--cache", str(tmp_path / "cache"), "--out", str(out), "--n-boot", "10",
                          "--no-progress"]) == 0
    m = pd.read_parquet(out / "metrics.parquet")
    digest = files_digest([d / "open_clip_model.safetensors"])
    assert len(m) == 4 and (m.extractor == "clip:tiny-open-clip").all()
    assert ((m.clip_model == m.extractor) & (m.diversity_features == m.extractor)).all()
    assert ((m.clip_image_processor == "open_clip") & (m.clip_weights == digest) & (m.weights == digest)).all()
    assert (m.feature_dim == 16).all() and np.isfinite(m.fid).all()  # FID on the open_clip features

    rows = pd.concat([pd.read_parquet(p) for p in results.glob("part-*.parquet")]).reset_index(drop=True)
    fe = get_extractor("clip", clip_pretrained=d, device="cpu")
    img = fe(np.stack([try_decode(b)[0] for b in rows.image]))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    prompts = sorted(set(rows.prompt))
    text = fe.embed_text(prompts)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    own = np.array([prompts.index(p) for p in rows.prompt])
    raw = 100 * np.einsum("nd,nd->n", img, text[own])
    assert not np.allclose(raw, 100 * np.einsum("nd,nd->n", img, text[1 - own]), atol=1e-3)  # prompt swapped
    per_image = pd.read_parquet(out / "image_scores.parquet").set_index("sample_id")
    np.testing.assert_allclose(per_image.loc[rows.sample_id, "clip_score_raw"], raw, rtol=1e-5, atol=1e-4)
    for r in m.itertuples():
        group = np.flatnonzero((rows.scheduler == r.scheduler) & (rows.guidance == r.guidance))
        assert r.clip_score == pytest.approx(max(raw[group].mean(), 0.0), rel=1e-5, abs=1e-4)
        dist = [np.mean([1 - img[i] @ img[j] for i in g for j in g if i < j])
                for g in (group[own[group] == k] for k in range(len(prompts)))]
        assert r.diversity == pytest.approx(np.mean(dist), rel=1e-5)
        assert 1.0 <= r.vendi <= 3.0


def test_second_run_reuses_cached_features(evaluated, capsys):
    tmp, results, args = evaluated
    cached = sorted((results / "_features").rglob("part-*.parquet"))
    assert cached
    capsys.readouterr()
    assert eval_job.main(args) == 0
    assert "(0 images had features computed)" in capsys.readouterr().err
    assert sorted((results / "_features").rglob("part-*.parquet")) == cached


def test_group_by_other_columns(evaluated):
    tmp, results, args = evaluated
    out = tmp / "by-guidance"
    assert eval_job.main(args[:-5] + ["--by", "guidance", "--out", str(out), "--n-boot", "10", "--no-progress"]) == 0
    m = pd.read_parquet(out / "metrics.parquet")
    assert list(m.guidance) == [1.0, 7.5] and (m.n == 12).all()


def test_results_of_two_precisions_are_separate_rows(evaluated, tmp_path):
    """A results directory holding the same configurations in two dtypes (e.g. a resumed run
    with another --dtype) reports each (configuration, dtype) apart."""
    _, results, args = evaluated
    mixed = tmp_path / "results"
    shutil.copytree(results, mixed)
    for shard in mixed.glob("part-*.parquet"):
        df = pd.read_parquet(shard)
        df["dtype"] = np.where(df.seed % 2 == 0, "float32", "bfloat16")
        df.to_parquet(shard, index=False)
    out = tmp_path / "report"
    assert eval_job.main([str(mixed)] + args[1:-5] + ["--out", str(out), "--n-boot", "10", "--no-progress"]) == 0
    m = pd.read_parquet(out / "metrics.parquet")
    assert len(m) == 8 and set(m["dtype"]) == {"float32", "bfloat16"}


@pytest.mark.parametrize("change,expected", [
    (["--by", "colour"], "--by: unknown columns ['colour']"),
    (["--reference", "/no/such/stats.npz"], "no such statistics file"),
    (["--features", "inception", "--inception-weights", "/no/such/pt_inception.pth"], "pt_inception-2015-12-05-6726825d.pth"),
])
def test_bad_input_exits_2_with_a_clear_message(evaluated, capsys, change, expected):
    tmp, results, args = evaluated
    assert eval_job.main(args + change) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("what", ["empty directory", "no such directory"])
def test_not_a_results_directory(tmp_path, capsys, what):
    results = tmp_path / "results"
    if what == "empty directory":
        results.mkdir()
    assert eval_job.main([str(results), "--reference", "x.npz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: RESULTS {results}: not a results directory") and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results"] if what == "empty directory" else [])


def test_out_that_is_a_file_is_refused(evaluated, tmp_path, capsys):
    _, _, args = evaluated
    out = tmp_path / "report.txt"
    out.write_text("mine")
    assert eval_job.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: exists and is not a directory") and len(err.splitlines()) == 1
    assert out.read_text() == "mine"


def test_a_report_written_inside_results_by_an_older_version_is_named(evaluated, tmp_path, capsys):
    """Such a report makes pandas.read_parquet(RESULTS) fail; evaluation says so and leaves it."""
    tmp, results, args = evaluated
    legacy = tmp_path / "results"
    shutil.copytree(results, legacy)
    shutil.copytree(tmp / "report", legacy / "report")
    out = tmp_path / "new-report"
    assert eval_job.main([str(legacy)] + args[1:-5] + ["--out", str(out), "--n-boot", "10", "--no-progress"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if f"{legacy / 'report'} is a report" in line]
    assert len(warning) == 1 and "move it out of RESULTS" in warning[0]
    assert (legacy / "report" / "metrics.parquet").is_file() and (out / "metrics.parquet").is_file()


def test_evaluation_imports_neither_diffusers_nor_ray_until_it_needs_ray():
    """Re-evaluating cached features should cost seconds: the evaluate job's imports stay light."""
    code = ("import sys, jobs.evaluate; bad = [m for m in ('diffusers', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- FID-infinity and --fid-n


def test_fid_metrics_headline_and_fid_at_n():
    """`fid_metrics` (what the job computes per group): FID-infinity inside its interval from 16
    images on, NaN below; the plain FID is fid_at_n's on the group's n or --fid-n's subset, NaN
    (n still recorded) when the group is smaller; the spread columns are on the same images."""
    from evals.fid import RefStats, fid_from_features
    from evals.fid_infinity import fid_at_n
    from evals.metrics_table import FID_N_SEED, fid_metrics
    from evals.stats import fid_bootstrap_ci

    rng = np.random.default_rng(0)
    ref = RefStats.from_features(rng.normal(size=(500, 8)))
    x = rng.normal(size=(40, 8)) + 0.3
    m = fid_metrics(x, ref, n_boot=20)
    assert m["fid_inf_lo"] <= m["fid_inf"] <= m["fid_inf_hi"] and m["fid_inf"] < m["fid"]
    assert (m["fid"], m["fid_n"]) == (fid_from_features(x, ref), 40)
    sub = fid_metrics(x, ref, n_boot=20, fid_n=24)
    assert (sub["fid"], sub["fid_n"], sub["fid_inf"]) == (fid_at_n(x, ref, 24, seed=FID_N_SEED), 24, m["fid_inf"])
    same = x[np.random.default_rng(FID_N_SEED).permutation(40)[:24]]
    assert fid_from_features(same, ref) == sub["fid"]
    assert (sub["fid_ci_lo"], sub["fid_ci_hi"]) == fid_bootstrap_ci(same, ref, n_boot=20)
    small = fid_metrics(x[:12], ref, n_boot=20, fid_n=24)
    assert np.isnan([small[k] for k in ("fid", "fid_ci_lo", "fid_inf", "fid_inf_lo", "fid_inf_hi")]).all()
    assert small["fid_n"] == 24


@pytest.fixture(scope="module")
def embedded_results(tmp_path_factory, ray_local):
    """The embedded model: two configurations of 20 images (FID-infinity computed) and one of
    8 (too few), evaluated against 200 rendered references."""
    tmp = tmp_path_factory.mktemp("fidinf")
    prompts = ["a small red circle on a white background", "a large blue square on a black background",
               "a small green triangle on a white background", "a large yellow circle on a gray background"]
    rows = [dict(prompt=p, seed=s, scheduler="ddim", steps=steps, guidance=7.5, model="embedded")
            for p in prompts for steps in (2, 4) for s in range(5)]
    rows += [dict(prompt=p, seed=s, scheduler="ddim", steps=2, guidance=1.0, model="embedded")
             for p in prompts for s in range(2)]
    results = tmp / "results"
    assert gen_job.main([str(write_parquet(tmp / "m.parquet", rows)), "--out", str(results), "--no-progress"]) == 0
    args = [str(results), "--reference", "embedded:200", "--n-boot", "20", "--no-progress"]
    return tmp, args


def test_fid_infinity_is_the_headline_with_its_interval(embedded_results, capsys):
    tmp, args = embedded_results
    capsys.readouterr()
    assert eval_job.main(args + ["--out", str(tmp / "report")]) == 0
    err = capsys.readouterr().err
    m = pd.read_parquet(tmp / "report" / "metrics.parquet")
    big, small = m[m.n >= 16], m[m.n < 16]
    assert list(big.n) == [20, 20] and list(small.n) == [8]
    assert ((big.fid_inf_lo <= big.fid_inf) & (big.fid_inf <= big.fid_inf_hi)).all()
    assert small[["fid_inf", "fid_inf_lo", "fid_inf_hi"]].isna().all(axis=None) and small.fid.notna().all()
    assert (m.fid_n == m.n).all() and (m.fid_inf_n_boot == 20).all()
    line = next(ln for ln in err.splitlines() if "fewer than 16 images" in ln)
    assert line.startswith("warning: FID-infinity: 1 group(s)") and "fid_inf is NaN for 2 steps g1 (n=8)" in line
    assert "fewer images than the feature dimension 64" in err  # 20 < 64: warned, never bold
    md = (tmp / "report" / "metrics.md").read_text()
    header, table = md.split("\n\n| ", 1)
    assert "- FID: FID-infinity: FID on subsets of 6 sizes" in header and "n_boot = 20" in header
    assert "FID at n: plain FID of all n images of each group" in header
    assert "| FID-infinity [95% CI] | FID at n |" in table.splitlines()[0]
    html = (tmp / "report" / "report.html").read_text()
    bold = re.findall(r'<td class="num best">([^<]*)</td>', html)
    fids = {fmt_ci(r.fid_inf, r.fid_inf_lo, r.fid_inf_hi) for r in big.itertuples()} | {fmt_num(v) for v in m.fid}
    assert "FID at n" in html and bold and not fids & set(bold)  # CLIP score is ranked, FID of n < 64 is not


def test_fid_n_compares_plain_fids_at_one_n(embedded_results, capsys):
    tmp, args = embedded_results
    full = pd.read_parquet(tmp / "report" / "metrics.parquet")
    capsys.readouterr()
    assert eval_job.main(args + ["--out", str(tmp / "fid-n"), "--fid-n", "12"]) == 0
    err = capsys.readouterr().err
    m = pd.read_parquet(tmp / "fid-n" / "metrics.parquet")
    assert (m.fid_n == 12).all()
    big, small = m[m.n >= 12], m[m.n < 12]
    assert big.fid.notna().all() and (big.fid.to_numpy() != full[full.n >= 12].fid.to_numpy()).all()
    assert small[["fid", "fid_ci_lo", "fid_ci_hi"]].isna().all(axis=None)
    np.testing.assert_array_equal(m.fid_inf, full.fid_inf)  # FID-infinity uses every image
    line = next(ln for ln in err.splitlines() if "(--fid-n)" in ln)
    assert line.startswith("warning: FID at n=12 (--fid-n): 1 group(s) have fewer images") and "(n=8)" in line
    assert "unequal image counts" not in err
    md = (tmp / "fid-n" / "metrics.md").read_text()
    assert "FID at n: plain FID of a seeded subset of n = 12 images of every group (--fid-n)" in md
    assert "| FID at n=12 |" in md.split("\n\n| ", 1)[1].splitlines()[0]


def test_tables_leave_out_manifest_columns_at_their_constant_default():
    """quant none, no LoRA, no refiner in every configuration: no table column for them (metrics.parquet
    keeps them); a column that varies, or is off its default, stays."""
    m = pd.DataFrame(dict(model=["embedded"] * 2, height=[64, 64], width=[64, 64], quant=["none", "none"],
                          scheduler=["ddim"] * 2, steps=[4, 20], guidance=[7.5, 7.5], denoising_end=[1.0, 1.0],
                          cache_interval=[1, 1], lora=["", ""], lora_scale=[1.0, 1.0]))
    keys = list(m.columns)
    assert eval_job.shown_keys(m, keys) == ["model", "height", "width", "scheduler", "steps", "guidance"]
    assert "quant" in eval_job.shown_keys(m.assign(quant=["none", "int8wo"]), keys)
    assert "cache_interval" in eval_job.shown_keys(m.assign(cache_interval=[3, 3]), keys)
