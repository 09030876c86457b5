"""Diversity of images generated for the same prompt across seeds.

A sampler that collapses (the same picture for every seed) can still score a good FID on a
varied prompt set, so diversity is measured within each prompt's group of seeds:

- mean pairwise cosine distance: mean over pairs i < j of 1 - cos(e_i, e_j); 0 when all
  embeddings point the same way.
- Vendi score (Friedman & Dieng, 2023): exp of the Shannon entropy of the eigenvalues of K / n,
  K the cosine-similarity kernel. The "effective number of distinct images": 1 for identical
  embeddings, n for mutually orthogonal ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from evals.clip_score import unit_vectors


def mean_pairwise_cosine_distance(emb) -> float:
    """Mean of 1 - cos over the n(n-1)/2 distinct pairs; NaN for fewer than 2 embeddings."""
    u = unit_vectors(emb)
    n = u.shape[0]
    if n < 2:
        return float("nan")
    # sum_{i != j} cos = ||sum u||^2 - n, without forming the n x n matrix.
    s = u.sum(axis=0)
    mean_cos = (s @ s - n) / (n * (n - 1))
    return float(1.0 - mean_cos)


def vendi_score(emb) -> float:
    """exp(-sum lambda log lambda), lambda the eigenvalues of K/n, K_ij = cos(e_i, e_j).
    Uses the smaller of the n x n kernel and the d x d covariance (same nonzero spectrum)."""
    u = unit_vectors(emb)
    n, d = u.shape
    if n == 0:
        return float("nan")
    m = (u @ u.T if n <= d else u.T @ u) / n
    lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()  # trace(K/n) = 1 exactly in theory; renormalise round-off
    return float(np.exp(-(lam * np.log(lam)).sum()))


def diversity_by_prompt(emb, prompts: Sequence[str]) -> pd.DataFrame:
    """Per prompt: n (seeds), mean_pairwise_cosine_distance, vendi_score. Rows of `emb`
    pair with `prompts`; group order is first appearance."""
    x = np.asarray(emb, dtype=np.float64)
    prompts = list(prompts)
    if x.ndim != 2 or x.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for embeddings of shape {x.shape}; need one prompt per row")
    codes, uniques = pd.factorize(pd.Series(prompts, dtype=object), sort=False)
    rows = []
    for k, prompt in enumerate(uniques):
        g = x[codes == k]
        rows.append(
            {
                "prompt": prompt,
                "n": int(g.shape[0]),
                "mean_pairwise_cosine_distance": mean_pairwise_cosine_distance(g),
                "vendi_score": vendi_score(g),
            }
        )
    return pd.DataFrame(rows, columns=["prompt", "n", "mean_pairwise_cosine_distance", "vendi_score"])
