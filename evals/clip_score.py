"""CLIP score: 100 x cosine similarity between an image and its prompt, in CLIP space.

One definition everywhere in diffsweep (the evaluation job, its bootstrap interval, the
embedded model's measurements): torchmetrics' `CLIPScore`, checked against it in
tests/test_clip_score.py. Note what torchmetrics actually computes, which is not quite its
docstring's formula: each pair scores 100 * cos(image, text), the scores are averaged, and only
the average is clamped at 0:

    CLIPScore(set) = max(mean_i 100 cos(I_i, C_i), 0)

So the per-image score (torchmetrics on a single pair) is max(100 cos, 0), but the set's score
is not the mean of the per-image scores when some cosines are negative (on noise images the
mean of clamped scores is several times the set's score). The raw, unclamped per-pair scores
are the primitive: the set's score and its bootstrap interval (resample pairs, then
mean-then-clamp) are computed from them, and the evaluation job writes them per image
(image_scores.parquet, column clip_score_raw) for analysis.
"""

from __future__ import annotations

import numpy as np


def unit_vectors(x, what: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product); zero rows are an error."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected [n, dim] embeddings, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"{what}: {int((norm == 0).sum())} embedding(s) have zero norm; cosine is undefined")
    return x / norm


def raw_clip_scores(image_emb, text_emb) -> np.ndarray:
    """100 * cos(image_i, text_i) per pair, unclamped, float64 [n]."""
    a, b = unit_vectors(image_emb, "image embeddings"), unit_vectors(text_emb, "text embeddings")
    if a.shape != b.shape:
        raise ValueError(f"image embeddings {a.shape} and text embeddings {b.shape} must pair up row by row")
    return 100.0 * (a * b).sum(axis=1)


def clip_score_per_image(image_emb, text_emb) -> np.ndarray:
    """Per-image CLIP score, max(100 cos, 0): what torchmetrics reports for one image-text pair.
    Do not average these for a set: use `clip_score` (or `aggregate_clip_score` of the raw scores)."""
    return np.maximum(raw_clip_scores(image_emb, text_emb), 0.0)


def aggregate_clip_score(raw_scores, axis=None):
    """The set's CLIP score from raw per-pair scores: max(mean, 0), like torchmetrics.
    Accepts `axis` so that `evals.stats.bootstrap_ci` can vectorise over resamples."""
    mean = np.mean(np.asarray(raw_scores, dtype=np.float64), axis=axis)
    return np.maximum(mean, 0.0)


def clip_score(image_emb, text_emb) -> float:
    """torchmetrics `CLIPScore` of a set of (image, prompt) embedding pairs."""
    raw = raw_clip_scores(image_emb, text_emb)
    if raw.size == 0:
        raise ValueError("clip_score needs at least one image-text pair")
    return float(aggregate_clip_score(raw))
