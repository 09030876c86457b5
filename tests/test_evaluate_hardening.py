"""jobs/evaluate.py on results as they are found: a report that never lands inside RESULTS,
damaged or foreign files, undecodable images, awkward --reference values and bad flags.

Real parts: tiny-random results from jobs/generate.py, a tiny CLIP, a local Ray. One
healthy evaluation (the module fixture) extracts the features; the other tests reuse its
cache, so only the damaged-results test starts a second feature pass (for one row)."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from evals.feature_cache import FeatureCache
from evals.references import Reference, safe_name
from jobs import evaluate as eval_job
from jobs import generate as gen_job
from tests.conftest import ROOT, write_parquet
from tests.test_features import make_tiny_clip_dir


@contextlib.contextmanager
def stderr_to(path: Path):
    """Everything written to stderr meanwhile, by Python (tqdm, warnings, Ray's forwarded worker
    logs) and below it (Ray's C++ core worker logs on fd 2), goes to `path`."""
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def listing(root: Path) -> dict:
    """path -> (size, mtime) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, ray_local):
    """8 results rows (2 configurations x 2 prompts x 2 seeds), evaluated once
    without --out against its own results directory, progress bar on, stderr kept."""
    tmp = tmp_path_factory.mktemp("hardening")
    rows = [dict(prompt=p, seed=s, scheduler="ddim", steps=2, guidance=g, model="tiny-random")
            for p in ["a red circle", "a green triangle"] for s in range(2) for g in [1.0, 5.0]]
    results = tmp / "sweep"
    assert gen_job.main([str(write_parquet(tmp / "m.parquet", rows)), "--out", str(results), "--no-progress"]) == 0
    clip = make_tiny_clip_dir(tmp / "clip")
    flags = ["--features", "clip", "--clip-model", str(clip), "--n-boot", "5"]
    err = tmp / "stderr.txt"
    with stderr_to(err):
        rc = eval_job.main([str(results), "--reference", str(results)] + flags)
    assert rc == 0, err.read_text()
    return dict(tmp=tmp, results=results, flags=flags + ["--no-progress"], stderr=err.read_text(), n=len(rows))


def copy_results(healthy, dest: Path) -> Path:
    shutil.copytree(healthy["results"], dest)
    return dest


# ----------------------------------------------------------------------------- report location


def test_default_report_goes_beside_results_and_readers_see_only_results(healthy, capsys):
    import duckdb
    import polars as pl

    tmp, results, n = healthy["tmp"], healthy["results"], healthy["n"]
    report = tmp / "sweep-report"
    assert (report / "metrics.parquet").is_file() and (report / "report.html").is_file()
    assert f"wrote the report to {report}/" in healthy["stderr"]
    assert not (results / "report").exists()
    assert len(pd.read_parquet(report / "metrics.parquet")) == 2

    elsewhere = tmp / "elsewhere"
    assert eval_job.main([str(results), "--reference", str(results), "--out", str(elsewhere)] + healthy["flags"]) == 0
    assert "(0 images had features computed)" in capsys.readouterr().err
    assert (elsewhere / "metrics.csv").is_file()
    # Every way of reading the whole results directory still works, with the right rows.
    assert len(pd.read_parquet(results)) == n
    assert pl.read_parquet(f"{results}/*.parquet").height == n
    assert duckdb.sql(f"SELECT count(*) FROM '{results}/*.parquet'").fetchall()[0][0] == n
    # The feature cache's shards are whole files in their own folder, staging kept apart.
    cache_dirs = [d for d in (results / "_features").iterdir() if d.is_dir()]
    assert cache_dirs and all(not list(d.glob(".staging-*")) for d in cache_dirs)
    assert all(pq.read_table(f).num_rows for d in cache_dirs for f in d.glob("*.parquet"))


@pytest.mark.parametrize("where", [".", "report", "report/deeper", "./_features/../x"])
def test_out_inside_results_is_refused_before_any_work(healthy, capsys, where):
    results = healthy["results"]
    before = listing(results)
    out = results / where
    assert eval_job.main([str(results), "--reference", str(results), "--out", str(out)] + healthy["flags"]) == 2
    one_error_line(capsys.readouterr().err, "--out", str(out), "RESULTS", "sweep-report")
    assert listing(results) == before


def test_default_report_dir_names():
    assert eval_job.default_report_dir("results/") == Path("results-report")
    assert eval_job.default_report_dir("/data/run7") == Path("/data/run7-report")
    assert eval_job.default_report_dir(".") == Path(os.path.abspath(".") + "-report")


# ----------------------------------------------------------------------------- damaged results


def test_damaged_and_foreign_files_are_named_and_skipped(healthy, tmp_path, capsys):
    results = copy_results(healthy, tmp_path / "damaged")
    shard = sorted(results.glob("part-*.parquet"))[0]
    data = shard.read_bytes()
    (results / "part-20991231T235959-abcdef-00001.parquet").write_bytes(data[: len(data) * 2 // 3])  # truncated
    pd.DataFrame({"note": ["mine"]}).to_parquet(results / "colleague_notes.parquet")  # foreign, top level
    pd.DataFrame({"x": [1, 2, 3]}).to_parquet(results / "part-from-another-tool.parquet")  # another schema
    row = pd.read_parquet(shard).head(1).copy()
    row["sample_id"], row["image"] = "garbled-png-0001", [b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8]
    row.to_parquet(results / "part-20991231T235959-abcdef-00002.parquet", index=False)  # valid Parquet, bad PNG
    before = listing(results)

    out = tmp_path / "report"
    assert eval_job.main([str(results), "--reference", str(healthy["results"]), "--out", str(out)]
                         + healthy["flags"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    skipped = next(line for line in err.splitlines() if line.startswith("warning: skipped 3 file(s)"))
    for name in ["part-20991231T235959-abcdef-00001.parquet", "colleague_notes.parquet", "part-from-another-tool.parquet"]:
        assert name in skipped
    corrupt = next(line for line in err.splitlines() if "cannot be decoded" in line)
    assert corrupt.startswith("warning: 1 row(s)") and "garbled-png-0001" in corrupt
    assert "(0 images had features computed)" in err  # the garbled row has no features

    m = pd.read_parquet(out / "metrics.parquet")
    assert m.n.sum() == healthy["n"] and m.n_error.sum() == 1
    hit = m[m.guidance == row.guidance.iloc[0]]
    assert int(hit.n_error.iloc[0]) == 1
    assert "garbled-png-0001" in (out / "metrics.md").read_text()
    # Evaluation is a reader: nothing in RESULTS moved, deleted or rewritten (only its cache grows).
    after = listing(results)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith("_features/") for k in set(after) - set(before))


def test_no_readable_shard_is_an_input_error(tmp_path, capsys):
    results = tmp_path / "broken"
    results.mkdir()
    (results / "part-0.parquet").write_bytes(b"PAR1 not really")
    assert eval_job.main([str(results), "--reference", "embedded:4"]) == 2
    one_error_line(capsys.readouterr().err, str(results), "part-0.parquet", "not a results directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    assert [p.name for p in results.iterdir()] == ["part-0.parquet"]


# ----------------------------------------------------------------------------- --reference


def write_pngs(folder: Path, healthy, k: int = 3) -> Path:
    folder.mkdir(parents=True)
    images = pd.read_parquet(healthy["results"], columns=["image"]).image[:k]
    for i, data in enumerate(images):
        (folder / f"ref{i}.png").write_bytes(data)
    return folder


@pytest.mark.parametrize("kind", ["directory", "parquet"])
def test_undecodable_reference_images_are_named_before_feature_work(healthy, tmp_path, capsys, kind):
    results = healthy["results"]
    if kind == "directory":
        ref = write_pngs(tmp_path / "refs", healthy)
        (ref / "notes.png").write_text("these are my notes, not an image")
        (ref / "sub").mkdir()
        (ref / "sub" / "empty.jpg").write_bytes(b"")
        names = ["notes.png", "empty.jpg", "2 of 5"]
    else:
        df = pd.read_parquet(results).head(3).copy()
        df.loc[1, "image"] = b"GIF89a but cut short"
        ref = write_parquet(tmp_path / "refs.parquet", df)
        names = [f"sample_id {df.sample_id[1]}", "1 of 3"]
    cache_before = listing(results / "_features")
    out = tmp_path / "report"
    assert eval_job.main([str(results), "--reference", str(ref), "--out", str(out)] + healthy["flags"]) == 2
    one_error_line(capsys.readouterr().err, "--reference", str(ref), "cannot be decoded", *names)
    assert not out.exists() and listing(results / "_features") == cache_before
    if kind == "directory":  # the same check when only statistics are made
        assert eval_job.main(["--make-reference", str(tmp_path / "s.npz"), str(ref), "--features", "clip",
                              "--clip-model", healthy["flags"][3]]) == 2
        one_error_line(capsys.readouterr().err, "notes.png", "empty.jpg")
        assert not (tmp_path / "s.npz").exists()


def test_directory_named_like_embedded_is_a_directory(healthy, tmp_path, monkeypatch, capsys):
    results = healthy["results"]
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "embedded_refs", healthy)
    write_pngs(tmp_path / "embedded", healthy, k=4)
    for i, source in enumerate(["embedded_refs", "./embedded_refs/", "./embedded"]):
        out = tmp_path / f"report{i}"
        assert eval_job.main([str(results), "--reference", source, "--out", str(out)] + healthy["flags"]) == 0, source
        assert (pd.read_parquet(out / "metrics.parquet").reference == source).all()
    stats = sorted(p.name for p in (results / "_features").glob("ref-embedded*.npz"))
    assert len([s for s in stats if s.startswith("ref-embedded_refs-")]) == 1  # both spellings: one directory
    assert len([s for s in stats if re.match(r"ref-embedded-[0-9a-f]{10}-", s)]) == 1  # ./embedded, not the domain
    assert not any(s.startswith(("ref-embedded-1000-", "ref-embedded-4-")) for s in stats)
    capsys.readouterr()
    # The bare names keep meaning the rendered domain, and say so when a directory has that name.
    ref = Reference("embedded")
    assert (ref.kind, ref.n) == ("embedded", 1000) and "./embedded" in ref.notes[0]
    assert (Reference("embedded:12").kind, Reference("embedded:12").n) == ("embedded", 12)


@pytest.mark.parametrize("bad", ["embedded:", "embedded:1", "embedded:ten"])
def test_embedded_domain_size_must_be_a_count(healthy, capsys, bad):
    assert eval_job.main([str(healthy["results"]), "--reference", bad] + healthy["flags"]) == 2
    one_error_line(capsys.readouterr().err, "--reference", repr(bad), "embedded:N")


def test_reference_names_cannot_leave_the_cache_folder(healthy, tmp_path, monkeypatch):
    results = healthy["results"]
    cache = tmp_path / "cache"
    shutil.copytree(results / "_features", cache)
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "x", healthy)
    (tmp_path / "a" / "embedded").mkdir(parents=True)
    before = set(listing(tmp_path))
    for source in ["a/embedded/../../x", "./a/../x"]:
        assert eval_job.main([str(results), "--reference", source, "--cache", str(cache), "--out", "r"]
                             + healthy["flags"]) == 0
    new = set(listing(tmp_path)) - before
    assert new and all(p.startswith(("cache/", "r/")) for p in new), new
    written = [p for p in new if p.startswith("cache/ref-")]
    assert len(written) == 1 and "/" not in written[0][len("cache/"):]  # one folder, both spellings of x
    for name in ["../../etc", "embedded/../../x", "..", "a b/c"]:
        safe = safe_name(name)
        assert "/" not in safe and not safe.startswith(".") and safe


def test_results_directory_as_reference_uses_its_ok_rows(healthy):
    from evals.fid import load_stats

    stats = [load_stats(p) for p in (healthy["results"] / "_features").glob("ref-sweep-*.npz")]
    assert len(stats) == 1 and stats[0].n == healthy["n"]


# ----------------------------------------------------------------------------- progress and logs


# Ray core's own line when the GCS tears down an actor whose worker has already closed its
# socket (seen in CI on Ray 2.60; the same message is discussed in ray-project/ray#58544):
# it comes from the GCS process at random, not from evaluate, and may land inside a bar.
RAY_KILL_ACTOR_RACE = re.compile(r"(\x1b\[\d+m)?\(pid=gcs_server\)(\x1b\[0m)? \[[^\]\n]*\][^\n]*"
                                 r"KillActor RPC failed for actor[^\n]*Socket closed[^\n]*?rpc_code: \d+")


def test_a_healthy_run_draws_one_progress_bar_and_logs_no_errors(healthy):
    err = RAY_KILL_ACTOR_RACE.sub("", healthy["stderr"])
    assert "Traceback" not in err
    segments = [s for s in re.split(r"[\r\n]", err) if s.strip()]
    bars = [s for s in segments if re.search(r"\|\s*\d+/\d+ \[", s)]
    assert bars and all(s.startswith("features:") for s in bars), bars  # no worker bars (Loading weights, ...)
    assert sum(1 for s in bars if re.match(r"features:\s+0%", s)) == 1  # drawn once, from 0
    assert not [s for s in segments if re.search(r"\bE \d+ \d+\]|\bERROR\b|core_worker\.cc|\bINFO\b", s)]
    assert not [s for s in segments if "Warning" in s or "deprecated" in s]


# ----------------------------------------------------------------------------- flags


def test_bad_counts_exit_2_before_ray_starts(tmp_path):
    """Each in one fresh interpreter: exit code 2, one line naming the flag, nothing written,
    and Ray never imported."""
    code = f"""
import contextlib, io, sys
from jobs import evaluate
results = {str(tmp_path / 'results')!r}
for flag in ["--n-boot", "--batch-size", "--pool-size", "--grid-prompts", "--grid-configs"]:
    for value in ["0", "-3", "two"]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = evaluate.main([results, "--reference", "embedded:4", flag, value])
            except SystemExit as e:
                rc = e.code
        lines = err.getvalue().strip().splitlines()
        assert rc == 2, (flag, value, rc)
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0] and value in lines[0], lines
assert "ray" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- feature cache


def test_feature_cache_stages_apart_and_reads_old_layouts(tmp_path):
    cache = FeatureCache(tmp_path, "clip-x-64")
    cache.add(["a", "b"], np.ones((2, 3)))
    assert [p.name for p in (tmp_path / "clip-x-64").glob("*.parquet")] == [p.rsplit("/", 1)[-1] for p in cache._files()]
    assert (tmp_path / "clip-x-64" / "_staging").is_dir() and not list((tmp_path / "clip-x-64" / "_staging").iterdir())
    # An older version's leftovers: a hidden half-written staging file beside the shards, and a
    # shard that was cut short. Neither breaks reading; the bad one is named.
    (tmp_path / "clip-x-64" / ".staging-part-old.parquet").write_bytes(b"PAR1half")
    (tmp_path / "clip-x-64" / "part-00000000T000000-cut.parquet").write_bytes(b"PAR1\x00\x01")
    fresh = FeatureCache(tmp_path, "clip-x-64")
    assert fresh.ids() == {"a", "b"} and fresh.load(["b", "a"]).shape == (2, 3)
    assert list(fresh.bad) == [str(tmp_path / "clip-x-64" / "part-00000000T000000-cut.parquet")]
