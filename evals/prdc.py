"""Precision, recall, density and coverage: fidelity and diversity as separate numbers.

FID mixes "are the images realistic" and "do they cover the real variety" into one distance.
These metrics split the two, from k-nearest-neighbour balls in feature space (arrays in,
numbers out; the features come from evals/features.py, as for FID):

- precision (Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing
  generative models"): the fraction of generated samples inside the real manifold, the union
  of balls B(x_i, NND_k(x_i)) around every real x_i, NND_k being the distance to its k-th
  nearest other real sample; recall: the fraction of real samples inside the generated
  manifold (the same with the roles swapped). k = 3, as in the paper and torch-fidelity.
  A sample on a ball's boundary is inside (<=), as in the paper's code and torch-fidelity.
- density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for
  generative models"), on the real balls only, k = 5 as in the paper:

      density  = 1 / (k M) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]
      coverage = 1 / N sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]

  for N real X and M generated Y. Density counts how many real balls hold each generated
  sample (1 on average when both sides come from one distribution; it can exceed 1), so a
  few outlier real samples with huge balls do not make everything "precise"; coverage asks
  whether each real sample has a generated one nearby. Boundaries are outside (<), as in the
  paper's code (clovaai/generative-evaluation-prdc).

Every value needs more than k samples on the side whose balls it uses (precision, density,
coverage: the real side; recall: the generated side); with fewer it is NaN and a warning
says why, since the k-th neighbour does not exist.

Distances are Euclidean, computed in float64 in row blocks (||a||^2 + ||b||^2 - 2 a.b), so a
large reference never holds an N x N matrix. The real balls do not depend on the generated
set: `kth_neighbour_distances` of the reference is computed once and passed to every group.
"""

from __future__ import annotations

import warnings

import numpy as np

from evals.fid import as_features

PR_K = 3  # precision / recall neighbourhood (Kynkaanniemi et al. 2019; torch-fidelity's prc_neighborhood)
DC_K = 5  # density / coverage neighbourhood (Naeem et al. 2020)
_BLOCK_ELEMS = 4_000_000  # distances held at once (32 MB of float64)


def _rows_per_block(m: int) -> int:
    return max(1, _BLOCK_ELEMS // max(m, 1))


def _distance_blocks(a: np.ndarray, b: np.ndarray):
    """(start, Euclidean distances of a[start:start+r] to every row of b) blocks."""
    bb = (b * b).sum(axis=1)
    step = _rows_per_block(b.shape[0])
    for start in range(0, a.shape[0], step):
        block = a[start:start + step]
        d2 = (block * block).sum(axis=1)[:, None] + bb[None, :] - 2.0 * block @ b.T
        yield start, np.sqrt(np.maximum(d2, 0.0))


def _pair(real, fake):
    x, y = as_features(real, "real features"), as_features(fake, "generated features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real features have dim {x.shape[1]}, generated features have dim {y.shape[1]}")
    return x, y


def kth_neighbour_distances(x, k: int) -> np.ndarray:
    """NND_k: the distance of each row of `x` to its k-th nearest *other* row (the row itself,
    at distance 0, is not counted). All NaN when x has k rows or fewer (no k-th neighbour)."""
    return neighbour_radii(x, (k,))[k]


def neighbour_radii(x, ks) -> dict[int, np.ndarray]:
    """`kth_neighbour_distances` for every k in `ks`, from one pass over the distances (a
    reference's radii for precision/recall and for density/coverage at once)."""
    x = as_features(x)
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    n = x.shape[0]
    out = {k: np.full(n, np.nan) for k in ks}
    usable = [k for k in ks if k < n]
    if not usable:
        return out
    for start, d in _distance_blocks(x, x):
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = 0.0  # the row itself: exactly 0, whatever the round-off
        part = np.partition(d, usable, axis=1)  # index 0 is the row itself
        for k in usable:
            out[k][start:start + d.shape[0]] = part[:, k]
    return out


def _too_few(what: str, side: str, n: int, k: int) -> float:
    warnings.warn(f"{what}: {side} has {n} sample(s), needs more than k={k} for a k-th nearest neighbour; "
                  "the value is NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _inside_any(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point: is it in some closed ball B(centre_i, radii_i)?"""
    out = np.empty(points.shape[0], dtype=bool)
    for start, d in _distance_blocks(points, centres):
        out[start:start + d.shape[0]] = (d <= radii[None, :]).any(axis=1)
    return out


def precision_recall(real, fake, k: int = PR_K, *, real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """(precision, recall) of generated `fake` against `real` features (module docstring).
    `real_radii`: `kth_neighbour_distances(real, k)` when already computed (a reference shared
    by many groups). NaN, with a RuntimeWarning, for a side with k samples or fewer."""
    x, y = _pair(real, fake)
    rx = _reference_radii(x, k, real_radii)
    if x.shape[0] <= k:
        precision = _too_few("precision", "the reference", x.shape[0], k)
    else:
        precision = float(_inside_any(y, x, rx).mean())
    if y.shape[0] <= k:
        recall = _too_few("recall", "the generated set", y.shape[0], k)
    else:
        recall = float(_inside_any(x, y, kth_neighbour_distances(y, k)).mean())
    return precision, recall


def _reference_radii(x: np.ndarray, k: int, given) -> np.ndarray:
    """The reference's k-th neighbour distances: `given` (checked) or computed now."""
    rx = kth_neighbour_distances(x, k) if given is None else np.asarray(given, np.float64)
    if rx.shape != (x.shape[0],):
        raise ValueError(f"real_radii: expected shape ({x.shape[0]},), got {rx.shape}")
    return rx


def density_coverage(real, fake, k: int = DC_K, *, real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """(density, coverage) of generated `fake` against `real` features (module docstring),
    with open balls as in the paper's code. `real_radii` as in `precision_recall`. NaN, with a
    RuntimeWarning, when the reference has k samples or fewer."""
    x, y = _pair(real, fake)
    rx = _reference_radii(x, k, real_radii)
    if x.shape[0] <= k:
        nan = _too_few("density and coverage", "the reference", x.shape[0], k)
        return nan, nan
    inside = 0  # sum_j sum_i 1[Y_j in B(X_i)]
    covered = np.empty(x.shape[0], dtype=bool)
    for start, d in _distance_blocks(x, y):  # rows: real samples, columns: generated
        hit = d < rx[start:start + d.shape[0], None]
        inside += int(hit.sum())
        covered[start:start + d.shape[0]] = hit.any(axis=1)
    return inside / (k * y.shape[0]), float(covered.mean())
