"""CMMD: the maximum mean discrepancy between CLIP embeddings of generated and reference images.

Jayasumana et al., "Rethinking FID: Towards a Better Evaluation Metric for Image Generation"
(CVPR 2024). FID fits a Gaussian to Inception features and is biased in n; CMMD instead
compares the two embedding distributions with a kernel, with no normality assumption, and
its estimator is unbiased at every n:

    CMMD = scale * [ 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
                     - 2/(n m) sum_{i,j} k(x_i, y_j) ]
    k(x, y) = exp(-||x - y||^2 / (2 sigma^2)),   sigma = 10,   scale = 1000

on L2-normalised CLIP image embeddings x (generated) and y (reference): sigma and scale as
in the paper's reference implementation (google-research/cmmd, distance.py). That code
averages over all pairs, the diagonal k(x, x) = 1 included (a V-statistic, larger by
scale * [(1 - kxx)/n + (1 - kyy)/m], kxx and kyy the within-side means over distinct
pairs: biased upward); `cmmd(..., unbiased=False)` gives that value
for comparison with published numbers. Population CMMD is 0 exactly when the two embedding
distributions agree (the Gaussian kernel is characteristic); the unbiased estimate can then
be slightly negative.

The interval (`cmmd_bootstrap_ci`) is a percentile bootstrap that resamples both the
generated and the reference images, as KID's does (evals.stats.mmd2_bootstrap_samples):
it covers the population CMMD of the two distributions. tests/test_cmmd.py measures its
coverage against the closed-form MMD of Gaussian features.
"""

from __future__ import annotations

import numpy as np

from evals.fid import as_features
from evals.stats import mmd2_bootstrap_ci

SIGMA = 10.0  # Gaussian kernel bandwidth (google-research/cmmd distance.py _SIGMA)
SCALE = 1000.0  # reported value = SCALE x MMD^2 (google-research/cmmd distance.py _SCALE)
_BLOCK_ELEMS = 4_000_000  # kernel values held at once


def l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit length, as the CMMD reference does to CLIP embeddings (an all-zero
    row is refused: it has no direction)."""
    x = as_features(x, "CLIP embeddings")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("CLIP embeddings: a row is all zeros and cannot be L2-normalised")
    return x / norms


def rbf_kernel(a: np.ndarray, b: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """exp(-||a_i - b_j||^2 / (2 sigma^2)) for every pair of rows."""
    d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(d2, 0.0) / (2.0 * sigma**2))


def _kernel_sum(a: np.ndarray, b: np.ndarray, sigma: float, same: bool) -> float:
    """sum_{i,j} k(a_i, b_j) in row blocks; with `same` (a is b), without the i == j terms."""
    total, step = 0.0, max(1, _BLOCK_ELEMS // max(b.shape[0], 1))
    for start in range(0, a.shape[0], step):
        k = rbf_kernel(a[start:start + step], b, sigma)
        total += float(k.sum())
        if same:
            rows = np.arange(k.shape[0])
            total -= float(k[rows, start + rows].sum())
    return total


def mmd2_rbf(x, y, sigma: float = SIGMA, *, unbiased: bool = True, y_within: float | None = None) -> float:
    """MMD^2 between the rows of x and y with the Gaussian kernel (no scale, no normalising):
    the unbiased U-statistic, or with `unbiased=False` the all-pairs V-statistic. `y_within`:
    `within_kernel_mean(y, sigma, unbiased)` when already computed (one reference, many groups)."""
    x, y = as_features(x, "generated features"), as_features(y, "reference features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference features have dim {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {x.shape[0]} and {y.shape[0]}")
    kyy = within_kernel_mean(y, sigma, unbiased) if y_within is None else float(y_within)
    kxy = _kernel_sum(x, y, sigma, same=False) / (x.shape[0] * y.shape[0])
    return within_kernel_mean(x, sigma, unbiased) + kyy - 2.0 * kxy


def within_kernel_mean(x: np.ndarray, sigma: float = SIGMA, unbiased: bool = True) -> float:
    """Mean of k(x_i, x_j) over pairs i != j (unbiased), or over all pairs."""
    n = x.shape[0]
    if unbiased:
        return _kernel_sum(x, x, sigma, same=True) / (n * (n - 1))
    return _kernel_sum(x, x, sigma, same=False) / (n * n)


def cmmd(gen_embeddings, ref_embeddings, *, sigma: float = SIGMA, scale: float = SCALE, unbiased: bool = True,
         ref_within: float | None = None) -> float:
    """CMMD of generated against reference CLIP image embeddings (module docstring): both are
    L2-normalised here, so raw projection outputs can be passed. `ref_within`:
    `within_kernel_mean(l2_normalize(ref), sigma, unbiased)`, to reuse across groups."""
    x, y = l2_normalize(gen_embeddings), l2_normalize(ref_embeddings)
    return scale * mmd2_rbf(x, y, sigma, unbiased=unbiased, y_within=ref_within)


def cmmd_bootstrap_ci(gen_embeddings, ref_embeddings, n_boot: int = 200, level: float = 0.95, seed: int = 0, *,
                      sigma: float = SIGMA, scale: float = SCALE, subset_size: int = 2000,
                      normalize: bool = True) -> tuple[float, float]:
    """Percentile bootstrap interval of the unbiased CMMD, resampling generated and reference
    images (pairs of copies of one image left out: evals.stats.mmd2_bootstrap_samples).
    At most `subset_size` rows per side (drawn once, without replacement) keep the kernel
    matrices small; above that it is the interval of a `subset_size` estimate (wider).
    `normalize=False` skips the L2 normalisation (for features that are not CLIP embeddings,
    e.g. the Gaussian features of the coverage test)."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level {level}, n_boot {n_boot}")
    if normalize:
        x, y = l2_normalize(gen_embeddings), l2_normalize(ref_embeddings)
    else:
        x, y = as_features(gen_embeddings, "generated features"), as_features(ref_embeddings, "reference features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference features have dim {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"CMMD needs at least 2 images on each side, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    mx, my = min(subset_size, x.shape[0]), min(subset_size, y.shape[0])
    xs, ys = x[rng.permutation(x.shape[0])[:mx]], y[rng.permutation(y.shape[0])[:my]]
    kxx, kyy, kxy = rbf_kernel(xs, xs, sigma), rbf_kernel(ys, ys, sigma), rbf_kernel(xs, ys, sigma)
    lo, hi = mmd2_bootstrap_ci(kxx, kyy, kxy, n_boot, level, rng)
    return scale * lo, scale * hi
