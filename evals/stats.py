"""Uncertainty for every aggregate: percentile bootstrap intervals, and warnings where a
comparison is statistically weak.

Sweeps compare many small groups (a scheduler x steps cell may have a few hundred images), so
a metric without an interval invites reading noise as a ranking. All intervals here are
percentile bootstrap intervals with a seeded generator, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from evals.fid import RefStats, as_features, fid_from_features, poly_kernel

_MAX_CHUNK_ELEMS = 20_000_000  # resample matrices are built in chunks of at most this many values


def _quantiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check_level(level, n_boot):
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def bootstrap_ci(
    values,
    statistic: Callable = np.mean,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(values)`, resampling values with replacement.

    NaN values are dropped first (e.g. the diversity of a prompt with a single seed). Returns
    (nan, nan) when nothing is left, (v, v) for a single value. `statistic` is called as
    `statistic(resamples, axis=1)` when it accepts `axis` (np.mean, np.median,
    `aggregate_clip_score`, ...), which is vectorised; otherwise once per resample."""
    _check_level(level, n_boot)
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_ELEMS // n)
    out = []
    vectorised = True
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        if vectorised:
            try:
                s = np.asarray(statistic(x[idx], axis=1), dtype=np.float64)
                if s.shape != (idx.shape[0],):
                    raise TypeError("statistic ignored axis")
                out.append(s)
                continue
            except TypeError:
                vectorised = False
        out.append(np.array([statistic(x[row]) for row in idx], dtype=np.float64))
    return _quantiles(np.concatenate(out), level)


def fid_bootstrap_samples(feats_gen, ref: RefStats, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """FID of `n_boot` resamples (with replacement) of the generated images against fixed
    reference statistics. The interval therefore covers the generated sample's variability
    only; the reference is treated as exact (it is usually much larger, or rendered exactly).

    Cost: with Z = X sigma_ref^{1/2} precomputed, each resample needs only the spectrum of the
    centred Gram matrix of Z[idx] (n x n when n < dim, else dim x dim), batched through one
    `eigvalsh` call per chunk. Note resampling duplicates images, which lowers the sample's
    diversity, so bootstrap FIDs sit slightly above the point estimate (a known bias)."""
    x = as_features(feats_gen, "generated features")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {n}")
    if d != ref.dim:
        raise ValueError(f"generated features have dim {d}, reference statistics have dim {ref.dim}")
    z = x @ ref.sqrt_sigma
    sq = (x * x).sum(axis=1)
    tr_ref = np.trace(ref.sigma)
    small = n < d
    p = z @ z.T if small else None
    rng = np.random.default_rng(seed)
    k = min(d, n)
    chunk = max(1, min(n_boot, 10_000_000 // (k * k + n * (1 if small else d))))
    out = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        b = idx.shape[0]
        mu = x[idx].mean(axis=1)  # [b, d]
        tr_gen = (sq[idx].sum(axis=1) - n * (mu * mu).sum(axis=1)) / (n - 1)
        if small:
            g = p[idx[:, :, None], idx[:, None, :]]  # [b, n, n]
            g = g - g.mean(axis=1, keepdims=True) - g.mean(axis=2, keepdims=True) + g.mean(axis=(1, 2), keepdims=True)
        else:
            zb = z[idx]  # [b, n, d]
            zb = zb - zb.mean(axis=1, keepdims=True)
            g = np.einsum("bni,bnj->bij", zb, zb)
        lam = np.linalg.eigvalsh(g / (n - 1))
        tol = np.abs(lam).max(axis=1, keepdims=True) * lam.shape[1] * np.finfo(np.float64).eps
        tr_covmean = np.sqrt(np.where(lam > tol, lam, 0.0)).sum(axis=1)  # same cutoff as evals.fid
        diff = mu - ref.mu
        fid = (diff * diff).sum(axis=1) + tr_gen + tr_ref - 2 * tr_covmean
        out.append(np.maximum(fid, 0.0).reshape(b))
    return np.concatenate(out)


def fid_bootstrap_ci(
    feats_gen, ref: RefStats, n_boot: int = 200, level: float = 0.95, seed: int = 0, recenter: bool = True
) -> tuple[float, float]:
    """Bootstrap interval of FID over image resamples (see `fid_bootstrap_samples`).

    Resampling with replacement duplicates images, which inflates FID; at small n the whole
    bootstrap distribution can sit above the point estimate, so a raw percentile interval would
    not even contain it. With `recenter` (default) the bootstrap distribution is shifted to have
    its mean at the point estimate: the interval then reflects FID's sampling spread at this n,
    which is what decides whether two groups of equal n differ. `recenter=False` gives the raw
    percentile interval."""
    _check_level(level, n_boot)
    samples = fid_bootstrap_samples(feats_gen, ref, n_boot, seed)
    if recenter:
        point = fid_from_features(feats_gen, ref)
        samples = np.maximum(samples - samples.mean() + point, 0.0)
    return _quantiles(samples, level)


def kid_bootstrap_ci(
    feats_gen,
    feats_ref,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    *,
    subset_size: int = 2000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of KID, the unbiased MMD^2 between generated and reference
    features, covering the population KID (the MMD^2 of the two feature distributions).

    Both sides are samples of their distribution, so both are resampled: holding the
    reference fixed would leave out part of the spread (a smaller reference, a narrower
    interval than the truth). A resample repeats images, and a pair of copies of one image
    would add k(x, x) terms that the unbiased estimate never has (an upward bias comparable
    to the interval at small n). So pairs of copies are left out: with counts c (how often each
    image was drawn), the within-sample sum is c^T K0 c, K0 being K with a zero diagonal, over
    the number of pairs it holds, n^2 - sum c^2. The bootstrap mean is then the sample's MMD^2
    (up to O(1/n^2)), with no re-centring, and a constant offset of the kernel cancels in every
    resample, as it does in the estimate. Cross terms c^T K_xy e / (n m) are unbiased as they
    are. A resample of copies of a single image has no pairs and is skipped (only likely at n < 5).

    At most `subset_size` rows per side (drawn once, without replacement) keep the kernel
    matrices small; above that the interval is that of a `subset_size` estimate, somewhat
    wider than needed for an estimate from more images. tests/test_kid_interval.py checks the
    coverage against the closed-form population value of Gaussian features."""
    _check_level(level, n_boot)
    if feats_ref is None:
        raise ValueError("KID needs reference features (save_stats(..., features=feats))")
    x = as_features(feats_gen, "generated features")
    y = as_features(feats_ref, "reference features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference features have dim {y.shape[1]}")
    rng = np.random.default_rng(seed)
    mx, my = min(subset_size, x.shape[0]), min(subset_size, y.shape[0])
    if mx < 2 or my < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {x.shape[0]} and {y.shape[0]}")
    xs, ys = x[rng.permutation(x.shape[0])[:mx]], y[rng.permutation(y.shape[0])[:my]]
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx, kyy = poly_kernel(xs, xs, degree, gamma, coef), poly_kernel(ys, ys, degree, gamma, coef)
    return mmd2_bootstrap_ci(kxx, kyy, poly_kernel(xs, ys, degree, gamma, coef), n_boot, level, rng)


def mmd2_bootstrap_ci(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, n_boot: int, level: float,
                      rng: np.random.Generator) -> tuple[float, float]:
    """Percentile interval of `mmd2_bootstrap_samples` (KID's and CMMD's interval)."""
    _check_level(level, n_boot)
    return _quantiles(mmd2_bootstrap_samples(kxx, kyy, kxy, n_boot, rng), level)


def mmd2_bootstrap_samples(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, n_boot: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Unbiased MMD^2 of `n_boot` resamples of both sides, from the kernel matrices of the
    sample (any kernel: KID's polynomial one, CMMD's Gaussian one). Pairs of copies of one
    image are left out (`kid_bootstrap_ci` says why); a resample without pairs is skipped.
    The diagonals of `kxx` and `kyy` are overwritten with 0."""
    mx, my = kxx.shape[0], kyy.shape[0]
    np.fill_diagonal(kxx, 0.0)
    np.fill_diagonal(kyy, 0.0)
    samples = []
    chunk = max(1, 20_000_000 // (mx * my + mx * mx + my * my))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        c = rng.multinomial(mx, np.full(mx, 1.0 / mx), size=b).astype(np.float64)  # [b, mx] counts
        e = rng.multinomial(my, np.full(my, 1.0 / my), size=b).astype(np.float64)
        pairs_x, pairs_y = mx * mx - (c * c).sum(axis=1), my * my - (e * e).sum(axis=1)
        ok = (pairs_x > 0) & (pairs_y > 0)
        c, e, pairs_x, pairs_y = c[ok], e[ok], pairs_x[ok], pairs_y[ok]
        sxx = ((c @ kxx) * c).sum(axis=1) / pairs_x
        syy = ((e @ kyy) * e).sum(axis=1) / pairs_y
        sxy = ((c @ kxy) * e).sum(axis=1) / (mx * my)
        samples.append(sxx + syy - 2 * sxy)
    return np.concatenate(samples)


def weak_comparison_warnings(
    n_by_group: Mapping[str, int],
    dim: int | None = None,
    *,
    ref_n: int | None = None,
    metric: str = "FID",
) -> list[str]:
    """Plain-language warnings for one table of `metric` values, one per problem:

    - a group (or the reference) with n below the feature dimension: its covariance is
      singular and FID is strongly biased upward, so values are not comparable to
      published ones;
    - groups of unequal n: FID's bias shrinks with n (roughly as 1/n), so a group with more
      images looks better for that reason alone; compare at equal n (subsample)."""
    notes = []
    if dim is not None:
        small = {g: int(n) for g, n in n_by_group.items() if int(n) < dim}
        if small:
            listed = ", ".join(f"{g} (n={n})" for g, n in sorted(small.items(), key=lambda kv: kv[1])[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            notes.append(
                f"{metric}: {len(small)} group(s) have fewer images than the feature dimension {dim}: {listed}{more}. "
                f"Their covariance is singular and {metric} is biased upward; rank groups only at equal n, "
                f"and prefer KID (unbiased) for small groups."
            )
        if ref_n is not None and int(ref_n) < dim:
            notes.append(
                f"{metric}: the reference has n={int(ref_n)} images, fewer than the feature dimension {dim}; "
                f"its covariance is singular, so {metric} values are not comparable to published ones."
            )
    ns = sorted({int(n) for n in n_by_group.values()})
    if len(ns) > 1:
        notes.append(
            f"{metric}: groups have unequal image counts (n from {ns[0]} to {ns[-1]}). {metric} is biased by n "
            f"(larger n gives lower values), so part of the differences is sample size; "
            f"subsample every group to n={ns[0]} to compare."
        )
    return notes
