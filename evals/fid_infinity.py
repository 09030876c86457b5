"""Bias-corrected FID (FID-infinity) with an interval that covers the population FID, and plain
FID at a fixed n.

Why: the plain FID of n images is biased upward, by roughly c / n with c growing with the
feature dimension (Gaussian features, d=64, n=256: +100% and more). Its bootstrap interval
(`evals.stats.fid_bootstrap_ci`) is centred on that biased value, so it measures spread at this
n but does not contain the population FID. Two ways out, both here:

- `fid_at_n`: plain FID on a seeded subset of exactly n images. Groups evaluated at the same n
  carry (nearly) the same bias, so their plain FIDs compare, though none equals the population
  value.
- `fid_infinity`: Chong & Forsyth 2020 ("Effectively Unbiased FID and Inception Score and where
  to find them"): E[FID_m] = FID_inf + c / m + O(1 / m^2), so FID is computed on random subsets
  of several sizes m, regressed linearly on 1 / m, and the intercept (1 / m = 0) is the estimate.
  Random subsets of an iid sample are iid samples of size m, so each point is an honest FID_m.

The interval bootstraps the whole estimator (resample the n images with replacement, redo the
subsets and the fit) and reads it as a *basic* (pivotal) bootstrap around the plug-in value:
in the bootstrap world the population is the empirical distribution, whose FID is the Frechet
distance of (mean, covariance with ddof=0) to the reference, and the bootstrap estimates scatter
around that value, not around FID-infinity. So the interval is
`[est - (q_hi - plug), est - (q_lo - plug)]` with q the bootstrap quantiles of FID-infinity and
`plug` the plug-in FID. A percentile interval (or one recentred on the plain FID) would inherit
the plain FID's bias; docs/evaluation.md "FID-infinity" has the measured coverages.

The reference is fixed statistics (mu, sigma), as the evaluation job has them. A reference given
as features is turned into fixed statistics. Its own finite-sample bias is therefore *not*
removed: with n_ref reference images the estimate is biased by about c_ref / n_ref (the same
for every group compared against that reference, so it shifts all values but not rankings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evals.fid import RefStats, as_features, fid_from_features, frechet_distance

_MAX_BATCH_ELEMS = 8_000_000  # matrices per batched eigvalsh call: at most this many values
MIN_SUBSET = 8  # smallest subset any fit uses: below this a covariance says little


@dataclass(frozen=True)
class FIDInfinity:
    """FID-infinity of one group of images, its interval, and what the fit used.

    `value` is the intercept of the fit, `ci` the basic-bootstrap interval at `level`;
    `fid_at_n` is the plain FID of all `n` images (for the "FID at n" column); `sizes` and
    `fids` are the subset sizes of the fit and the mean FID over subsets at each (for a plot of
    FID against 1/n); `slope` is the fitted c in FID_m = value + c / m."""

    value: float
    ci: tuple[float, float]
    level: float
    n: int
    fid_at_n: float
    sizes: tuple[int, ...]
    fids: tuple[float, ...]
    slope: float
    n_boot: int


def _as_ref(ref) -> RefStats:
    return ref if isinstance(ref, RefStats) else RefStats.from_features(as_features(ref, "reference features"))


def _checked(features, ref) -> tuple[np.ndarray, RefStats]:
    x = as_features(features, "generated features")
    ref = _as_ref(ref)
    if x.shape[1] != ref.dim:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference statistics have dim {ref.dim}")
    return x, ref


def fid_at_n(features, ref: RefStats | np.ndarray, n: int, seed: int = 0) -> float:
    """Plain FID of a seeded random subset of exactly `n` of `features` (without replacement)
    against `ref`, so that groups of different sizes are compared at the same bias.

    `n` equal to the number of rows gives the FID of all of them. Raises ValueError when the
    group has fewer than `n` rows (it cannot be compared at n) or n < 2."""
    x, ref = _checked(features, ref)
    n = int(n)
    if n < 2:
        raise ValueError(f"fid_at_n: n must be >= 2, got {n}")
    if x.shape[0] < n:
        raise ValueError(f"fid_at_n: the group has {x.shape[0]} images, fewer than n={n}; lower n or drop the group")
    if x.shape[0] > n:
        x = x[np.random.default_rng(seed).permutation(x.shape[0])[:n]]
    return fid_from_features(x, ref)


def subset_sizes(n: int, n_sizes: int = 6, min_fraction: float = 0.5) -> tuple[int, ...]:
    """Subset sizes for the fit: `n_sizes` sizes from `min_fraction * n` to n, evenly spaced in
    1 / m (the regressor), so the points weigh evenly in the fit.

    Why 0.5 and not Chong & Forsyth's 0.1: their n (50k) is far above the feature dimension;
    here n may be a few times the dimension, where FID_m bends away from a line in 1 / m as m
    approaches d. Sizes from n/2 keep the fit in the near-linear range (docs/evaluation.md)."""
    if not 0 < min_fraction < 1:
        raise ValueError(f"min_fraction must be in (0, 1), got {min_fraction}")
    if n_sizes < 2:
        raise ValueError(f"n_sizes must be >= 2 (a line needs two points), got {n_sizes}")
    lo = max(MIN_SUBSET, int(np.ceil(min_fraction * n)))
    if n < 2 * MIN_SUBSET or lo >= n:
        raise ValueError(f"FID-infinity needs at least {2 * MIN_SUBSET} images for subsets of several sizes, got {n}")
    inv = np.linspace(1.0 / lo, 1.0 / n, n_sizes)
    sizes = sorted({int(round(1.0 / v)) for v in inv})
    if len(sizes) < 2:
        raise ValueError(f"n={n} too small for {n_sizes} distinct subset sizes from {lo}")
    return tuple(sizes)


def _intercept_weights(sizes) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights: FID values y at `sizes` give intercept = a @ y and slope = b @ y."""
    design = np.column_stack([np.ones(len(sizes)), 1.0 / np.asarray(sizes, np.float64)])
    a, b = np.linalg.pinv(design)
    return a, b


class _PrefixFID:
    """FID of the prefixes of many orderings of the same rows against one fixed reference.

    A fit needs FID at several subset sizes; taking the subsets as prefixes of one random
    ordering (a "chain") gives every size from one pass over the rows. With z = x
    sigma_ref^{1/2}, tr((sigma_ref^{1/2} S sigma_ref^{1/2})^{1/2}) is the sum of the square roots
    of the eigenvalues of the centred scatter of z[prefix] / (m - 1): dim x dim, accumulated
    segment by segment, or the m x m Gram block from z z^T when m < dim. Same arithmetic and
    round-off cutoff as `evals.fid`."""

    def __init__(self, x: np.ndarray, ref: RefStats):
        self.x, self.ref = x, ref
        self.z = x @ ref.sqrt_sigma
        self.sq = (x * x).sum(axis=1)
        self.tr_ref = float(np.trace(ref.sigma))
        self._zzt = None

    def __call__(self, chains: np.ndarray, sizes) -> np.ndarray:
        """chains [b, n] row indices (orderings, repeats allowed) -> FIDs [b, len(sizes)]."""
        b, n = chains.shape
        d = self.x.shape[1]
        chunk = max(1, _MAX_BATCH_ELEMS // (n * d + d * d + min(sizes[0], d) ** 2))
        return np.concatenate([self._fids(chains[s : s + chunk], sizes) for s in range(0, b, chunk)])

    def _fids(self, chains: np.ndarray, sizes) -> np.ndarray:
        d = self.x.shape[1]
        csum_x = np.cumsum(self.x[chains], axis=1)
        csum_sq = np.cumsum(self.sq[chains], axis=1)
        out = np.empty((chains.shape[0], len(sizes)))
        scatter, zsum, done = 0.0, 0.0, 0
        for j, m in enumerate(sizes):
            mu = csum_x[:, m - 1] / m
            tr_gen = (csum_sq[:, m - 1] - m * (mu * mu).sum(axis=1)) / (m - 1)
            if m < d:
                if self._zzt is None:
                    self._zzt = self.z @ self.z.T
                head = chains[:, :m]
                g = self._zzt[head[:, :, None], head[:, None, :]]
                g = g - g.mean(axis=1, keepdims=True) - g.mean(axis=2, keepdims=True) + g.mean(axis=(1, 2), keepdims=True)
            else:
                seg = self.z[chains[:, done:m]]
                scatter = scatter + np.matmul(seg.transpose(0, 2, 1), seg)
                zsum = zsum + seg.sum(axis=1)
                done = m
                zmu = zsum / m
                g = scatter - m * zmu[:, :, None] * zmu[:, None, :]
            lam = np.linalg.eigvalsh(g / (m - 1))
            tol = np.abs(lam).max(axis=1, keepdims=True) * lam.shape[1] * np.finfo(np.float64).eps
            tr_covmean = np.sqrt(np.where(lam > tol, lam, 0.0)).sum(axis=1)
            diff = mu - self.ref.mu
            out[:, j] = np.maximum((diff * diff).sum(axis=1) + tr_gen + self.tr_ref - 2 * tr_covmean, 0.0)
        return out


def _curves(fid: _PrefixFID, rows: np.ndarray, sizes, chains: int, rng) -> np.ndarray:
    """Mean FID over `chains` random orderings at each size, for each row of `rows` ([b, n]
    indices: the original sample or bootstrap resamples). Returns [b, len(sizes)]."""
    b, n = rows.shape
    perm = np.argsort(rng.random((b, chains, n)), axis=2)
    ordered = np.take_along_axis(rows[:, None, :], perm, axis=2).reshape(b * chains, n)
    return fid(ordered, sizes).reshape(b, chains, len(sizes)).mean(axis=1)


def fid_infinity(
    features,
    ref: RefStats | np.ndarray,
    *,
    sizes=None,
    n_sizes: int = 6,
    min_fraction: float = 0.5,
    subsets: int = 8,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> FIDInfinity:
    """FID-infinity of `features` against fixed reference statistics `ref`, with a basic
    bootstrap interval at `level` (see the module docstring for the method and why).

    sizes: subset sizes of the fit (default `subset_sizes(n, n_sizes, min_fraction)`). The
    subsets are prefixes of `subsets` seeded random orderings of the images, averaged per size.
    n_boot: bootstrap resamples of the images (0: no interval, ci is (nan, nan)); each resample
    fits one ordering (more noise than the estimate's `subsets` orderings, so the interval errs
    wide, never narrow). Cost: (subsets + n_boot) * len(sizes) eigvalsh calls of min(m, dim)
    square, e.g. 1,300 of 64 x 64 for the defaults at dim 64."""
    x, ref = _checked(features, ref)
    n = x.shape[0]
    sizes = subset_sizes(n, n_sizes, min_fraction) if sizes is None else tuple(sorted({int(m) for m in sizes}))
    if len(sizes) < 2 or sizes[0] < 2 or sizes[-1] > n:
        raise ValueError(f"sizes must hold at least two distinct sizes in [2, n={n}], got {sizes}")
    if subsets < 1 or n_boot < 0:
        raise ValueError(f"subsets must be >= 1 and n_boot >= 0, got subsets={subsets}, n_boot={n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    fid = _PrefixFID(x, ref)
    a, b = _intercept_weights(sizes)
    curve = _curves(fid, np.arange(n)[None, :], sizes, subsets, rng)[0]
    value = float(a @ curve)
    ci = (float("nan"), float("nan"))
    if n_boot:
        boot = _curves(fid, rng.integers(0, n, size=(n_boot, n)), sizes, 1, rng) @ a
        ci = _basic_interval(value, boot, _plug_in_fid(x, ref), level)
    return FIDInfinity(
        value=value,
        ci=ci,
        level=level,
        n=n,
        fid_at_n=float(curve[-1]) if sizes[-1] == n else fid_from_features(x, ref),
        sizes=sizes,
        fids=tuple(float(v) for v in curve),
        slope=float(b @ curve),
        n_boot=n_boot,
    )


def _plug_in_fid(x: np.ndarray, ref: RefStats) -> float:
    """FID of the empirical distribution of `x` (covariance with ddof=0): the population value
    of the bootstrap world, which bootstrap estimates scatter around."""
    mu = x.mean(axis=0)
    xc = x - mu
    return frechet_distance(ref.mu, ref.sigma, mu, xc.T @ xc / x.shape[0], sqrt_sigma1=ref.sqrt_sigma)


def _basic_interval(value: float, boot: np.ndarray, plug: float, level: float) -> tuple[float, float]:
    """Basic bootstrap interval: the estimate minus the bootstrap errors (boot - plug) at the
    upper and lower quantiles. It corrects the fit's own bias too (the bootstrap world's
    estimates sit below `plug` as far as the real ones sit below the population FID), so it
    need not be centred on `value`. The lower end is clipped at 0 (FID is never negative)."""
    q_lo, q_hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return max(float(value - (q_hi - plug)), 0.0), max(float(value - (q_lo - plug)), 0.0)
