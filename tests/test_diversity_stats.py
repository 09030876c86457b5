"""Diversity (pairwise cosine distance, Vendi) and uncertainty (bootstrap, weak-comparison warnings)."""

from __future__ import annotations

import numpy as np
import pytest

from evals.clip_score import aggregate_clip_score
from evals.diversity import diversity_by_prompt, mean_pairwise_cosine_distance, vendi_score
from evals.fid import RefStats, feature_stats, fid_from_features, frechet_distance, kernel_inception_distance
from evals.stats import (
    bootstrap_ci,
    fid_bootstrap_ci,
    fid_bootstrap_samples,
    kid_bootstrap_ci,
    weak_comparison_warnings,
)

# ----------------------------------------------------------------------------- diversity


def test_identical_embeddings_have_no_diversity():
    e = np.tile([[0.3, -1.0, 2.0, 0.5]], (6, 1)) * np.arange(1, 7)[:, None]  # same direction, any norm
    assert vendi_score(e) == pytest.approx(1.0, abs=1e-9)
    assert mean_pairwise_cosine_distance(e) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,d", [(5, 5), (4, 16)])
def test_orthogonal_embeddings_are_maximally_diverse(n, d):
    e = np.eye(d)[:n] * 3.0
    assert vendi_score(e) == pytest.approx(n, rel=1e-9)
    assert mean_pairwise_cosine_distance(e) == pytest.approx(1.0, abs=1e-12)


def test_vendi_counts_clusters_and_both_spectral_paths_agree():
    rng = np.random.default_rng(0)
    a, b = np.eye(3)[0], np.eye(3)[1]
    two_clusters = np.array([a, a, a, b, b, b])  # n=6 > d=3: covariance path
    assert vendi_score(two_clusters) == pytest.approx(2.0, rel=1e-9)
    wide, tall = rng.normal(size=(7, 20)), rng.normal(size=(30, 5))  # n x n kernel / d x d covariance path
    assert 1 < vendi_score(wide) < 7 and 1 < vendi_score(tall) < 5
    assert vendi_score(wide) == pytest.approx(_vendi_bruteforce(wide), rel=1e-9)
    assert vendi_score(tall) == pytest.approx(_vendi_bruteforce(tall), rel=1e-9)


def _vendi_bruteforce(x):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(u @ u.T / len(u))
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def test_mean_pairwise_distance_matches_bruteforce():
    x = np.random.default_rng(1).normal(size=(9, 6))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.triu_indices(9, 1)
    assert mean_pairwise_cosine_distance(x) == pytest.approx(np.mean(1 - (u[i] * u[j]).sum(1)), rel=1e-12)
    assert np.isnan(mean_pairwise_cosine_distance(x[:1]))
    with pytest.raises(ValueError, match="zero norm"):
        mean_pairwise_cosine_distance(np.zeros((3, 4)))


def test_diversity_by_prompt_groups_rows():
    e = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0], [1, 1.0]])
    prompts = ["cat", "cat", "dog", "dog", "cat", "owl"]
    df = diversity_by_prompt(e, prompts)
    assert list(df["prompt"]) == ["cat", "dog", "owl"]
    assert list(df["n"]) == [3, 2, 1]
    cat, dog, owl = df.to_dict("records")
    assert cat["vendi_score"] == pytest.approx(1.0) and cat["mean_pairwise_cosine_distance"] == pytest.approx(0.0)
    assert dog["vendi_score"] == pytest.approx(2.0) and dog["mean_pairwise_cosine_distance"] == pytest.approx(1.0)
    assert owl["vendi_score"] == pytest.approx(1.0) and np.isnan(owl["mean_pairwise_cosine_distance"])
    with pytest.raises(ValueError, match="one prompt per row"):
        diversity_by_prompt(e, prompts[:-1])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_of_mean_matches_normal_theory_and_is_seeded():
    x = np.random.default_rng(2).normal(10.0, 2.0, size=400)
    lo, hi = bootstrap_ci(x, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * half, rel=0.1)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)
    narrow = bootstrap_ci(x, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_vectorised_and_loop_paths_agree():
    x = np.random.default_rng(3).exponential(size=60)
    assert bootstrap_ci(x, np.median, n_boot=300) == pytest.approx(
        bootstrap_ci(x, lambda v: float(np.median(v)), n_boot=300), rel=1e-12
    )
    # the CLIP-score aggregate clamps the mean: its interval never goes below 0
    raw = np.random.default_rng(4).normal(0.5, 5, size=50)
    lo, hi = bootstrap_ci(raw, aggregate_clip_score)
    assert lo >= 0 and hi > lo


def test_bootstrap_edge_cases():
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([1.0, np.nan, 1.0]) == (1.0, 1.0)  # NaNs (e.g. one-seed prompts) dropped
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)


@pytest.mark.parametrize("n,d", [(40, 16), (25, 64)])  # n > d (covariance path) and n < d (Gram path)
def test_fid_bootstrap_samples_equal_bruteforce(n, d):
    rng = np.random.default_rng(5)
    ref = RefStats.from_features(rng.normal(size=(300, d)))
    y = rng.normal(size=(n, d)) * 1.2 + 0.1
    got = fid_bootstrap_samples(y, ref, n_boot=6, seed=1)
    idx = np.random.default_rng(1).integers(0, n, size=(6, n))
    want = [frechet_distance(ref.mu, ref.sigma, *feature_stats(y[i])) for i in idx]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_fid_bootstrap_ci_brackets_the_point_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(6)
    ref = RefStats.from_features(rng.normal(size=(2000, 8)))
    gen = rng.normal(size=(1600, 8)) + 0.3
    small, large = gen[:100], gen
    lo_s, hi_s = fid_bootstrap_ci(small, ref, n_boot=200)
    lo_l, hi_l = fid_bootstrap_ci(large, ref, n_boot=200)
    assert lo_s < fid_from_features(small, ref) < hi_s
    assert lo_l < fid_from_features(large, ref) < hi_l
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)
    raw_lo, _ = fid_bootstrap_ci(small, ref, n_boot=200, recenter=False)
    assert raw_lo > lo_s  # resampling duplicates images: raw bootstrap FIDs sit higher


def test_kid_bootstrap_ci_brackets_kid_and_shrinks_with_n():
    rng = np.random.default_rng(7)
    ref, gen = rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 0.15
    small, large = gen[:60], gen
    for g in (small, large):
        kid, _ = kernel_inception_distance(g, ref, subsets=1, subset_size=len(g))  # full set: exact
        lo, hi = kid_bootstrap_ci(g, ref, n_boot=300, subset_size=400, seed=1)
        if len(g) == len(ref):
            assert lo < kid < hi
    lo_s, hi_s = kid_bootstrap_ci(small, ref, n_boot=300, subset_size=400)
    lo_l, hi_l = kid_bootstrap_ci(large, ref, n_boot=300, subset_size=400)
    assert lo_s < hi_s and hi_l - lo_l < hi_s - lo_s
    assert kid_bootstrap_ci(small, ref, seed=3) == kid_bootstrap_ci(small, ref, seed=3)
    with pytest.raises(ValueError, match="reference features"):
        kid_bootstrap_ci(small, None)


def test_weak_comparison_warnings():
    assert weak_comparison_warnings({"a": 5000, "b": 5000}, dim=2048, ref_n=10000) == []
    notes = weak_comparison_warnings({"ddim/20": 500, "euler/20": 5000}, dim=2048, ref_n=1000)
    assert len(notes) == 3
    assert "ddim/20 (n=500)" in notes[0] and "feature dimension 2048" in notes[0]
    assert "reference has n=1000" in notes[1]
    assert "unequal" in notes[2] and "n=500" in notes[2]
    (only,) = weak_comparison_warnings({"a": 10, "b": 12})  # no dim: only the unequal-n warning
    assert "n from 10 to 12" in only
