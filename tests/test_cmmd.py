"""CMMD: the reference implementation's formula, an unbiased estimator (closed-form MMD of
Gaussian features, and 0 for one distribution), and a bootstrap interval that covers the
population value at its nominal rate.

Gaussian features have a closed-form Gaussian-kernel MMD: for z ~ N(mu, v I_d),
E exp(-||z||^2 / (2 s^2)) = (s^2 / (s^2 + v))^(d/2) exp(-||mu||^2 / (2 (s^2 + v))), and
x - x', y - y', x - y are such z. Features of norm about 1 (as L2-normalised CLIP embeddings
are) keep the kernel in the regime sigma = 10 puts it in for CMMD.
"""

from __future__ import annotations

import numpy as np
import pytest

from evals import cmmd as cmmd_module
from evals.cmmd import SCALE, SIGMA, cmmd, cmmd_bootstrap_ci, l2_normalize, mmd2_rbf

D, S_X, S_Y = 8, 0.35, 0.40  # dim, per-coordinate sd of the generated and the reference features


def gaussian_rbf_mean(mu: np.ndarray, v: float, sigma: float = SIGMA) -> float:
    """E exp(-||z||^2 / (2 sigma^2)) for z ~ N(mu, v I)."""
    s2 = sigma**2
    return (s2 / (s2 + v)) ** (len(mu) / 2) * np.exp(-(mu @ mu) / (2 * (s2 + v)))


def population_cmmd(shift: float) -> float:
    """SCALE x MMD^2 between N(0, S_X^2 I) and N(shift / sqrt(D) 1, S_Y^2 I)."""
    zero, delta = np.zeros(D), np.full(D, shift / np.sqrt(D))
    return SCALE * (gaussian_rbf_mean(zero, 2 * S_X**2) + gaussian_rbf_mean(zero, 2 * S_Y**2)
                    - 2 * gaussian_rbf_mean(delta, S_X**2 + S_Y**2))


def draw(rng, n: int, m: int, shift: float):
    return rng.normal(size=(n, D)) * S_X, rng.normal(size=(m, D)) * S_Y + shift / np.sqrt(D)


def reference_cmmd(x, y):
    """google-research/cmmd distance.py `mmd` (Apache-2.0), in numpy: means over all pairs,
    the diagonal included, on embeddings the reference normalises in embedding.py."""
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    x_sqnorms, y_sqnorms = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * 10**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sqnorms[:, None] + x_sqnorms[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sqnorms[:, None] + y_sqnorms[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sqnorms[:, None] + y_sqnorms[None, :])))
    return 1000 * (k_xx + k_yy - 2 * k_xy)


def test_biased_variant_is_the_reference_implementation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 32)), rng.normal(size=(90, 32)) + 0.2
    assert cmmd(x, y, unbiased=False) == pytest.approx(reference_cmmd(x, y), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(3.0 * x, y), rel=1e-12)  # embeddings are L2-normalised first
    assert cmmd(x, y) < cmmd(x, y, unbiased=False)


def test_unbiased_for_one_distribution_where_the_reference_formula_is_not():
    """CLIP-like unit vectors, both sides from one distribution (population CMMD 0): the
    mean over repetitions is 0 within its Monte-Carlo error; the V-statistic of the
    reference code sits many standard errors above."""
    rng = np.random.default_rng(1)
    centre = rng.normal(size=16)
    ours, theirs = [], []
    for _ in range(300):
        x, y = rng.normal(size=(2, 40, 16)) + centre
        ours.append(cmmd(x, y))
        theirs.append(cmmd(x, y, unbiased=False))
    se = np.std(ours, ddof=1) / np.sqrt(len(ours))
    assert abs(np.mean(ours)) < 4 * se
    assert np.mean(theirs) > 20 * se


def test_unbiased_against_the_closed_form_mmd():
    rng = np.random.default_rng(2)
    truth = population_cmmd(0.3)
    est = [SCALE * mmd2_rbf(*draw(rng, 30, 50, 0.3)) for _ in range(400)]
    se = np.std(est, ddof=1) / np.sqrt(len(est))
    assert truth > 5 * se  # a real difference, resolved
    assert abs(np.mean(est) - truth) < 4 * se, (np.mean(est), truth, se)


def test_interval_covers_the_population_cmmd_at_the_nominal_rate():
    """Measured (population CMMD 0.890, n_boot = 200, the coverage's own sd ~1.5 points at
    200 repetitions): n = m = 80, this test's seed: 98.0% of 200; another seed: 95.3% of 1000
    (2.0% missed below, 2.7% above); n = m = 100: 93.0% of 200; n = m = 200: 94.5% of 400;
    n = 64, m = 256: 95.0% of 200. Near population CMMD 0 the interval is conservative (one
    distribution of unit vectors, n = m = 100: 99.7% of 300): the unbiased estimate is then
    a degenerate U-statistic, whose bootstrap is wider than its spread."""
    rng = np.random.default_rng(3)
    truth = population_cmmd(0.3)
    covered = above_zero = 0
    reps = 200
    for rep in range(reps):
        x, y = draw(rng, 80, 80, 0.3)
        lo, hi = cmmd_bootstrap_ci(x, y, n_boot=200, seed=rep, normalize=False)
        covered += lo <= truth <= hi
        above_zero += lo > 0
    assert 0.90 <= covered / reps <= 0.99, covered / reps
    assert above_zero / reps > 0.5  # informative: the difference is usually detected


def test_blocked_kernel_sums_and_bad_input(monkeypatch):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(70, 6))
    whole = cmmd(x, y)
    monkeypatch.setattr(cmmd_module, "_BLOCK_ELEMS", 100)
    assert cmmd(x, y) == pytest.approx(whole, rel=1e-9)  # sums of ~1 cancel to ~1e-4: round-off ~1e-12
    with pytest.raises(ValueError, match="all zeros"):
        l2_normalize(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        cmmd(x[:1], y)
    with pytest.raises(ValueError, match="dim"):
        cmmd_bootstrap_ci(x, y[:, :5])
