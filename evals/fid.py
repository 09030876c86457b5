"""Frechet distance, KID, and reference statistics files (numpy, float64).

Frechet distance between N(mu1, S1) and N(mu2, S2):

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

How the last term is computed (and why not `scipy.linalg.sqrtm(S1 @ S2)` like clean-fid /
pytorch-fid): S1 S2 is not symmetric, so its square root needs a Schur decomposition, goes
complex or non-finite when the covariances are singular (always, when n < dim), and needs the
"add eps to the diagonal" fallback, which changes the answer. Instead we use the identity

    tr((S1 S2)^{1/2}) = tr((R S2 R)^{1/2}) = sum_i sqrt(lambda_i(R S2 R)),   R = S1^{1/2}

where R is the symmetric PSD root of S1 (from `eigh`, negative round-off eigenvalues clipped)
and R S2 R is symmetric PSD, so `eigvalsh` is stable and exact for singular matrices. No eps
fudge is applied. When the generated side is given as features (n < dim), R S2 R = A^T A with
A = Xc R / sqrt(n-1), and the trace is the sum of singular values of A, computed from the
smaller n x n Gram matrix; that is what makes `fid_bootstrap_ci` affordable.

KID is the unbiased polynomial-kernel MMD^2 (k(x, y) = (x.y / d + 1)^3) averaged over random
subsets, as in Binkowski et al. and torchmetrics/clean-fid.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals import files

STATS_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- Gaussian fit


def as_features(feats, what="features") -> np.ndarray:
    """`feats` as a float64 [n, dim] array; a ValueError naming `what` for any other shape or a NaN/inf."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return x


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (n-1) covariance in float64, as clean-fid and torchmetrics compute them."""
    x = as_features(feats)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    tol = np.abs(w).max(initial=0.0) * w.shape[0] * np.finfo(np.float64).eps  # see _trace_sqrt_psd
    return (v * np.sqrt(np.where(w > tol, w, 0.0))) @ v.T


def _trace_sqrt_psd(m: np.ndarray) -> float:
    """tr(m^{1/2}) for symmetric PSD m, from its eigenvalues. Eigenvalues below the round-off
    level (max |lambda| * size * machine eps, the rank cutoff `pinv` uses) are taken as 0: for a
    singular m (n < dim) round-off leaves +-1e-16 relative noise on the zero eigenvalues, and
    sqrt would amplify each to 1e-8 relative."""
    lam = np.linalg.eigvalsh(m)
    tol = np.abs(lam).max(initial=0.0) * m.shape[-1] * np.finfo(np.float64).eps
    return float(np.sqrt(np.where(lam > tol, lam, 0.0)).sum())


def _check_pair(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
            " (features from different extractors?)"
        )
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, *, sqrt_sigma1: np.ndarray | None = None) -> float:
    """Squared Frechet distance between two Gaussians (see module docstring for the method).
    `sqrt_sigma1` may pass a precomputed `S1^{1/2}` (e.g. of reference statistics) to skip an eigh."""
    mu1, sigma1, mu2, sigma2 = _check_pair(mu1, sigma1, mu2, sigma2)
    r = _psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    m = r @ sigma2 @ r
    tr_covmean = _trace_sqrt_psd((m + m.T) / 2)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    # Exact arithmetic gives >= 0; only round-off (~1e-12 of the traces) can go below.
    return float(max(value, 0.0))


def _fid_features_vs_stats(x: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, sqrt_ref: np.ndarray) -> float:
    """FID of feature rows `x` against reference (mu, sigma), using the smaller Gram matrix."""
    n, d = x.shape
    mu = x.mean(axis=0)
    xc = x - mu
    a = (xc @ sqrt_ref) / np.sqrt(n - 1)
    g = a @ a.T if n < d else a.T @ a
    tr_covmean = _trace_sqrt_psd(g)
    diff = mu - mu_ref
    value = diff @ diff + (xc * xc).sum() / (n - 1) + np.trace(sigma_ref) - 2 * tr_covmean
    return float(max(value, 0.0))


# ----------------------------------------------------------------------------- reference stats


@dataclass
class RefStats:
    """Gaussian statistics of a feature set plus what produced them. `extractor`, `resize_mode`
    and `image_size` are None for files from other tools (clean-fid writes only mu, sigma)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    extractor: str | None = None
    resize_mode: str | None = None
    image_size: int | None = None
    features: np.ndarray | None = None  # optional, kept for KID (needs samples, not moments)
    path: Path | None = None
    _sqrt_sigma: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def sqrt_sigma(self) -> np.ndarray:
        """sigma^{1/2}, computed once (an eigh of dim x dim) and reused for every comparison."""
        if self._sqrt_sigma is None:
            self._sqrt_sigma = _psd_sqrt(self.sigma)
        return self._sqrt_sigma

    @classmethod
    def from_features(cls, feats, extractor=None, resize_mode=None, image_size=None, keep_features=False) -> RefStats:
        x = as_features(feats)
        mu, sigma = feature_stats(x)
        return cls(mu, sigma, x.shape[0], extractor, resize_mode, image_size, x if keep_features else None)


def save_stats(
    path: str | os.PathLike,
    mu,
    sigma,
    n: int,
    extractor: str,
    resize_mode: str,
    image_size: int,
    features: np.ndarray | None = None,
) -> Path:
    """Write reference statistics as .npz (mu, sigma, n, extractor, resize_mode, image_size,
    format_version; optional features for KID). Written to a temp file then renamed, so a crash
    never leaves a truncated file that later loads as a reference."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"reference statistics path must end in .npz, got {path}")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_pair(mu, sigma, mu, sigma)
    payload = dict(
        mu=mu,
        sigma=sigma,
        n=np.int64(n),
        extractor=np.str_(extractor),
        resize_mode=np.str_(resize_mode),
        image_size=np.int64(image_size),
        format_version=np.int64(STATS_FORMAT_VERSION),
    )
    if features is not None:
        payload["features"] = as_features(features)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    files.write_bytes(path, buf.getvalue())  # a local path or an object-store URI
    return path if files.is_uri(path) else Path(path)


def load_stats(path: str | os.PathLike) -> RefStats:
    """Load statistics written by `save_stats`, or a clean-fid / pytorch-fid .npz with only mu
    and sigma (metadata then None: such a file cannot be checked against the extractor)."""
    with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not a statistics file: missing {sorted(missing)} (has {sorted(z.files)})")

        def meta(key, cast):
            return cast(z[key][()]) if key in z.files else None

        stats = RefStats(
            mu=np.asarray(z["mu"], np.float64),
            sigma=np.asarray(z["sigma"], np.float64),
            n=meta("n", int),
            extractor=meta("extractor", str),
            resize_mode=meta("resize_mode", str),
            image_size=meta("image_size", int),
            features=np.asarray(z["features"], np.float64) if "features" in z.files else None,
            path=path if files.is_uri(path) else Path(path),
        )
    _check_pair(stats.mu, stats.sigma, stats.mu, stats.sigma)
    return stats


def check_compatible(a: RefStats, b: RefStats | dict) -> list[str]:
    """Raise ValueError when both sides name a different extractor / resize mode / image size
    (comparing such features is meaningless). Returns warnings for fields one side lacks."""
    other = b if isinstance(b, dict) else {k: getattr(b, k) for k in ("extractor", "resize_mode", "image_size")}
    notes = []
    for key in ("extractor", "resize_mode", "image_size"):
        x, y = getattr(a, key), other.get(key)
        if x is None or y is None:
            notes.append(f"reference statistics lack '{key}'; cannot check they match ({x!r} vs {y!r})")
        elif x != y:
            where = f" ({a.path})" if a.path else ""
            raise ValueError(
                f"reference statistics{where} were made with {key}={x!r} but the features to compare use "
                f"{key}={y!r}; recompute the reference with the same extractor"
            )
    if "dim" in other and other["dim"] is not None and int(other["dim"]) != a.dim:
        raise ValueError(f"reference statistics have dim {a.dim}, features have dim {other['dim']}")
    return notes


def reference_stats(
    path: str | os.PathLike, compute_features, *, extractor: str, resize_mode: str, image_size: int, keep_features=True
) -> RefStats:
    """Load `path` if it exists (checking it matches), else call `compute_features()` once,
    save, and return. `compute_features` returns the [n, dim] reference features."""
    want = {"extractor": extractor, "resize_mode": resize_mode, "image_size": image_size}
    if files.is_file(path):
        stats = load_stats(path)
        for note in check_compatible(stats, want):
            warnings.warn(note, stacklevel=2)
        return stats
    feats = as_features(compute_features(), "reference features")
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, feats.shape[0], extractor, resize_mode, image_size, feats if keep_features else None)
    return load_stats(path)


# ----------------------------------------------------------------------------- FID / KID


def fid_from_features(feats_gen, ref: RefStats | np.ndarray) -> float:
    """FID of generated features against reference statistics (or reference features)."""
    x = as_features(feats_gen, "generated features")
    if x.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {x.shape[0]}")
    if not isinstance(ref, RefStats):
        ref = RefStats.from_features(ref)
    if x.shape[1] != ref.dim:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference statistics have dim {ref.dim}")
    return _fid_features_vs_stats(x, ref.mu, ref.sigma, ref.sqrt_sigma)


def poly_kernel(x, y, degree, gamma, coef):
    """KID's polynomial kernel matrix, k(x, y) = (gamma x.y + coef)^degree, row by row."""
    return (x @ y.T * gamma + coef) ** degree


def _mmd2_unbiased(k_xx, k_xy, k_yy) -> float:
    m = k_xx.shape[0]
    sxx = k_xx.sum() - np.trace(k_xx)
    syy = k_yy.sum() - np.trace(k_yy)
    return float((sxx + syy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    feats_gen,
    feats_ref,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets), the estimator of torchmetrics' KernelInceptionDistance and
    clean-fid: each subset draws `subset_size` rows without replacement from each side and takes
    the unbiased MMD^2 with k(x, y) = (gamma x.y + coef)^degree, gamma = 1/dim by default.
    Differences from torchmetrics: std is the sample std (ddof=1; torchmetrics' kid_std uses
    ddof=0), subset_size is capped at the smaller set (torchmetrics raises), and draws come from a
    seeded numpy generator, so results are reproducible. The std describes subset-to-subset
    spread only; for an interval use evals.stats.kid_bootstrap_ci."""
    if feats_ref is None:
        raise ValueError(
            "KID needs reference features, not just mu/sigma: build the reference with "
            "save_stats(..., features=feats) / reference_stats(..., keep_features=True)"
        )
    x = as_features(feats_gen, "generated features")
    y = as_features(feats_ref, "reference features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"generated features have dim {x.shape[1]}, reference features have dim {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {x.shape[0]} and {y.shape[0]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for i in range(subsets):
        a = y[rng.permutation(y.shape[0])[:m]]  # torchmetrics draws the real side first
        b = x[rng.permutation(x.shape[0])[:m]]
        scores[i] = _mmd2_unbiased(
            poly_kernel(a, a, degree, gamma, coef), poly_kernel(a, b, degree, gamma, coef), poly_kernel(b, b, degree, gamma, coef)
        )
    std = float(scores.std(ddof=1)) if subsets > 1 else 0.0
    return float(scores.mean()), std
