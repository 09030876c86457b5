"""FID / KID numerics and reference statistics files (CPU, offline, small dims)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.stats import ortho_group

from evals.fid import (
    RefStats,
    check_compatible,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    load_stats,
    reference_stats,
    save_stats,
)


def _features(rng, n, d, shift=0.0, scale=1.0):
    """Correlated, non-isotropic features (a random linear map of Gaussians)."""
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ a) * scale + shift


def _cleanfid_functions(*names):
    """clean-fid's own numpy functions, taken from its installed fid.py. Importing the module
    pulls in torchvision (absent here: no CPU build), so we compile just these functions from the
    real source rather than reimplementing them."""
    spec = importlib.util.find_spec("cleanfid")
    if spec is None:
        pytest.skip("clean-fid not installed (pip install --no-deps clean-fid==0.1.35)")
    src = (Path(list(spec.submodule_search_locations)[0]) / "fid.py").read_text()
    body = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in body) == sorted(names)
    ns = {"np": np, "linalg": linalg, "ndarray": np.ndarray}
    exec(compile(ast.Module(body, []), "cleanfid/fid.py", "exec"), ns)
    return [ns[n] for n in names]


# ----------------------------------------------------------------------------- closed forms


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_rotated_gaussians_match_closed_form():
    """Same rotation applied to both covariances: dense, non-diagonal matrices, and FID is
    invariant, so the diagonal closed form still holds."""
    rng = np.random.default_rng(1)
    d = 40
    q = ortho_group.rvs(d, random_state=2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.01, 2, size=d), rng.uniform(0.01, 2, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_non_commuting_covariances_match_sqrtm_definition():
    """General case against the textbook definition with an exact PSD square root."""
    rng = np.random.default_rng(3)
    d = 30
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    r = linalg.sqrtm(s1).real
    expected = 4.0 + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r @ s2 @ r).real)
    mu1, mu2 = np.zeros(d), np.full(d, 2.0 / np.sqrt(d))  # ||mu1 - mu2||^2 = 4
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(4)
    x = _features(rng, 800, 128)
    typical = fid_from_features(_features(rng, 800, 128, shift=0.3), RefStats.from_features(x))
    assert typical > 1.0
    ref = RefStats.from_features(x)
    assert fid_from_features(x, ref) < 1e-6 * typical
    assert frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma) < 1e-6 * typical


def test_self_fid_is_zero_with_singular_covariance():
    """n < dim: both covariances singular; no eps fudge needed, still ~0 and finite."""
    rng = np.random.default_rng(5)
    x = _features(rng, 40, 128)
    ref = RefStats.from_features(x)
    assert np.linalg.matrix_rank(ref.sigma) < 128
    typical = fid_from_features(_features(rng, 40, 128, shift=0.3), ref)
    assert 0 <= fid_from_features(x, ref) < 1e-6 * typical


@pytest.mark.parametrize("n", [30, 300])  # below and above the dimension (Gram-matrix path vs covariance)
def test_features_path_equals_moments_path(n):
    rng = np.random.default_rng(6)
    ref = RefStats.from_features(_features(rng, 500, 64))
    y = _features(rng, n, 64, shift=0.2, scale=1.3)
    mu, sigma = feature_stats(y)
    assert fid_from_features(y, ref) == pytest.approx(frechet_distance(ref.mu, ref.sigma, mu, sigma), rel=1e-9)


def test_feature_stats_are_unbiased_float64():
    x = np.random.default_rng(7).normal(size=(20, 5)).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    ref = RefStats.from_features(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="dim 3"):
        fid_from_features(np.zeros((5, 3)), ref)
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((5, 4), np.nan), ref)


# ----------------------------------------------------------------------------- other implementations


@pytest.mark.parametrize("n,d", [(600, 64), (400, 128)])
def test_agrees_with_cleanfid_frechet_distance(n, d):
    (cf_frechet,) = _cleanfid_functions("frechet_distance")
    rng = np.random.default_rng(8)
    m1, s1 = feature_stats(_features(rng, n, d))
    m2, s2 = feature_stats(_features(rng, n, d, shift=0.1, scale=1.2))
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(float(cf_frechet(m1, s1, m2, s2)), rel=1e-3)


class _PrecomputedFeatures(torch.nn.Module):
    """torchmetrics `feature=` module returning stored features for the row indices it is fed."""

    def __init__(self, feats: np.ndarray):
        super().__init__()
        self.register_buffer("feats", torch.from_numpy(feats))
        self.num_features = feats.shape[1]

    def forward(self, idx):
        return self.feats[idx]


def test_agrees_with_torchmetrics_fid():
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(9)
    real, fake = _features(rng, 500, 64), _features(rng, 400, 64, shift=0.15, scale=0.9)
    module = _PrecomputedFeatures(np.concatenate([real, fake]))
    metric = FrechetInceptionDistance(feature=module)
    metric.update(torch.arange(500), real=True)
    metric.update(torch.arange(500, 900), real=False)
    theirs = float(metric.compute())
    ours = fid_from_features(fake, RefStats.from_features(real))
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_kid_agrees_with_torchmetrics_on_full_sets():
    """subset_size = n: every subset is the whole set, so the draws cannot differ."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(10)
    real, fake = _features(rng, 150, 32), _features(rng, 150, 32, shift=0.2)
    module = _PrecomputedFeatures(np.concatenate([real, fake]))
    metric = KernelInceptionDistance(feature=module, subsets=3, subset_size=150)
    metric.update(torch.arange(150), real=True)
    metric.update(torch.arange(150, 300), real=False)
    tm_mean, tm_std = (float(v) for v in metric.compute())
    mean, std = kernel_inception_distance(fake, real, subsets=3, subset_size=150)
    assert mean > 0
    assert mean == pytest.approx(tm_mean, rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-12) and tm_std == pytest.approx(0.0, abs=1e-7)


def test_kid_agrees_with_torchmetrics_on_random_subsets():
    """Different random draws: the subset means must agree within sampling error."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(11)
    real, fake = _features(rng, 300, 16), _features(rng, 300, 16, shift=0.15)
    module = _PrecomputedFeatures(np.concatenate([real, fake]))
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=module, subsets=200, subset_size=100)
    metric.update(torch.arange(300), real=True)
    metric.update(torch.arange(300, 600), real=False)
    tm_mean, tm_std = (float(v) for v in metric.compute())
    mean, std = kernel_inception_distance(fake, real, subsets=200, subset_size=100, seed=0)
    se = np.hypot(std, tm_std) / np.sqrt(200)
    assert abs(mean - tm_mean) < 4 * se
    assert std == pytest.approx(tm_std, rel=0.25)


def test_kid_is_unbiased_for_equal_distributions_and_seeded():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    mean, std = kernel_inception_distance(a, b, subsets=50, subset_size=100)
    assert abs(mean) < 4 * std / np.sqrt(50) + 1e-12
    assert kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=3) == kernel_inception_distance(
        a, b, subsets=5, subset_size=50, seed=3
    )
    shifted, _ = kernel_inception_distance(a + 0.5, b, subsets=20, subset_size=100)
    assert shifted > 10 * std


def test_kid_caps_subset_size_and_rejects_tiny_sets():
    rng = np.random.default_rng(13)
    mean, std = kernel_inception_distance(rng.normal(size=(30, 4)), rng.normal(size=(50, 4)), subsets=4)
    assert np.isfinite(mean) and std >= 0
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="reference features"):
        kernel_inception_distance(np.zeros((5, 4)), None)  # e.g. a clean-fid stats file


# ----------------------------------------------------------------------------- stats files


def test_stats_file_round_trip(tmp_path):
    x = np.random.default_rng(14).normal(size=(50, 8))
    mu, sigma = feature_stats(x)
    path = save_stats(tmp_path / "ref.npz", mu, sigma, 50, "inception", "clean", 299, features=x)
    s = load_stats(path)
    np.testing.assert_array_equal(s.mu, mu)
    np.testing.assert_array_equal(s.sigma, sigma)
    assert (s.n, s.extractor, s.resize_mode, s.image_size, s.dim) == (50, "inception", "clean", 299, 8)
    np.testing.assert_array_equal(s.features, x)
    assert not list(tmp_path.glob("*.tmp*"))


def test_cleanfid_style_stats_file_loads_with_unknown_metadata(tmp_path):
    mu, sigma = feature_stats(np.random.default_rng(15).normal(size=(30, 6)))
    np.savez(tmp_path / "cifar10_clean_train_2048.npz", mu=mu, sigma=sigma)  # what clean-fid writes
    s = load_stats(tmp_path / "cifar10_clean_train_2048.npz")
    assert s.extractor is None and s.n is None and s.resize_mode is None and s.features is None
    notes = check_compatible(s, {"extractor": "inception", "resize_mode": "clean", "image_size": 299})
    assert len(notes) == 3 and "cannot check" in notes[0]


def test_mismatched_extractor_is_a_clear_error(tmp_path):
    mu, sigma = feature_stats(np.random.default_rng(16).normal(size=(30, 6)))
    s = load_stats(save_stats(tmp_path / "ref.npz", mu, sigma, 30, "embedded", "clip-processor", 64))
    assert check_compatible(s, {"extractor": "embedded", "resize_mode": "clip-processor", "image_size": 64}) == []
    with pytest.raises(ValueError, match=r"extractor='embedded'.*extractor='inception'"):
        check_compatible(s, {"extractor": "inception", "resize_mode": "clean", "image_size": 299})


def test_not_a_stats_file(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        load_stats(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=".npz"):
        save_stats(tmp_path / "x.stats", np.zeros(2), np.eye(2), 2, "inception", "clean", 299)


def test_reference_stats_are_computed_once_then_reused(tmp_path):
    x = np.random.default_rng(17).normal(size=(40, 5))
    calls = []

    def compute():
        calls.append(1)
        return x

    meta = dict(extractor="inception", resize_mode="clean", image_size=299)
    first = reference_stats(tmp_path / "ref.npz", compute, **meta)
    second = reference_stats(tmp_path / "ref.npz", compute, **meta)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert second.n == 40 and second.features.shape == (40, 5)
    with pytest.raises(ValueError, match="recompute the reference"):
        reference_stats(tmp_path / "ref.npz", compute, extractor="embedded", resize_mode="clean", image_size=299)
