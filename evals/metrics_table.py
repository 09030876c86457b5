"""The metrics table: one row per configuration, every aggregate with its uncertainty.

Rows of one configuration (the values of the grouping keys, by default the run key) are one
group; each group gets its FID and KID against the reference, CLIP score, diversity, Vendi
score, attribute accuracy (embedded domain) and cost, with bootstrap intervals where they are
defined. Inputs are plain arrays aligned with the rows, so the table can be recomputed from
cached features without touching images or models.

Every row also says how it was measured (DESCRIPTION_COLUMNS: extractor, image processor,
weights, reference and its n, CLIP model, n_boot), so a metrics.parquet read on its own, or
concatenated with another run's, cannot be misread.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from evals.clip_score import aggregate_clip_score, raw_clip_scores
from evals.diversity import diversity_by_prompt
from evals.fid import RefStats, fid_from_features, kernel_inception_distance
from evals.stats import bootstrap_ci, fid_bootstrap_ci, kid_bootstrap_ci, weak_comparison_warnings

# What group_metrics writes, and the columns that say how every row was measured: together
# with the grouping keys, that is every column of the table.
METRIC_COLUMNS = (
    "n", "n_error", "fid", "fid_ci_lo", "fid_ci_hi", "kid", "kid_ci_lo", "kid_ci_hi", "kid_std", "clip_score",
    "clip_score_ci_lo", "clip_score_ci_hi", "diversity", "vendi", "attribute_accuracy", "attribute_accuracy_ci_lo",
    "attribute_accuracy_ci_hi", "gen_seconds", "images_per_gpu_second",
)
DESCRIPTION_COLUMNS = (
    "extractor", "image_processor", "resize_mode", "image_size", "feature_dim", "weights", "reference",
    "reference_n", "clip_model", "clip_image_processor", "clip_weights", "diversity_features", "n_boot", "ci_level",
)
CI_LEVEL = 0.95  # every interval of the table
KID_SUBSETS = 50  # KID's point estimate: mean over this many subsets (clean-fid / torchmetrics style)


@dataclass
class RowFeatures:
    """Per-row arrays, aligned with the ok rows: FID features always; CLIP image and prompt
    embeddings when a CLIP model is set; attribute accuracy on the embedded model."""

    fid: np.ndarray
    clip: np.ndarray | None = None
    text: np.ndarray | None = None
    attributes: np.ndarray | None = None

    def take(self, idx) -> RowFeatures:
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return RowFeatures(self.fid[idx], pick(self.clip), pick(self.text), pick(self.attributes))


def group_metrics(rows: pd.DataFrame, f: RowFeatures, ref: RefStats | None, n_boot: int) -> dict:
    """The metrics of one configuration's ok rows (columns prompt, gen_seconds) and their features."""
    n, nan = len(rows), float("nan")
    out = {"n": n}
    if ref is not None and n >= 2:
        out["fid"] = fid_from_features(f.fid, ref)
        out["fid_ci_lo"], out["fid_ci_hi"] = fid_bootstrap_ci(f.fid, ref, n_boot=n_boot, level=CI_LEVEL)
        if ref.features is not None:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                f.fid, ref.features, subsets=KID_SUBSETS, subset_size=min(n, ref.features.shape[0], 1000))
            out["kid_ci_lo"], out["kid_ci_hi"] = kid_bootstrap_ci(f.fid, ref.features, n_boot=n_boot, level=CI_LEVEL)
    if f.clip is not None:  # torchmetrics' CLIPScore: max(mean 100 cos, 0), clamped after the mean
        raw = raw_clip_scores(f.clip, f.text)
        out["clip_score"] = float(aggregate_clip_score(raw))
        out["clip_score_ci_lo"], out["clip_score_ci_hi"] = bootstrap_ci(raw, aggregate_clip_score, n_boot=n_boot,
                                                                        level=CI_LEVEL)
    div = diversity_by_prompt(f.clip if f.clip is not None else f.fid, list(rows.prompt))
    div = div[div.n >= 2]  # a prompt with one image has no diversity
    out["diversity"] = float(div.mean_pairwise_cosine_distance.mean()) if len(div) else nan
    out["vendi"] = float(div.vendi_score.mean()) if len(div) else nan
    if f.attributes is not None and np.isfinite(f.attributes).any():
        out["attribute_accuracy"] = float(np.nanmean(f.attributes))
        out["attribute_accuracy_ci_lo"], out["attribute_accuracy_ci_hi"] = bootstrap_ci(f.attributes, n_boot=n_boot,
                                                                                        level=CI_LEVEL)
    sec = rows.gen_seconds.to_numpy(dtype=float)
    out["gen_seconds"] = float(sec.mean())
    out["images_per_gpu_second"] = float(1.0 / sec.mean()) if sec.mean() > 0 else nan
    return out


def metrics_table(ok: pd.DataFrame, failed: pd.DataFrame, keys: list[str], features: RowFeatures,
                  ref: RefStats | None, n_boot: int) -> pd.DataFrame:
    """One row per configuration of `ok` (sorted by `keys`): the keys, n, n_error (the rows of
    `failed` with those keys), then the metrics of `group_metrics`."""
    errors = failed.groupby(keys, dropna=False).size()
    rows = []
    for key, idx in ok.groupby(keys, sort=True, dropna=False).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        with warnings.catch_warnings():  # NaN means of tiny groups: the table shows them as –
            warnings.simplefilter("ignore")
            metrics = group_metrics(ok.iloc[idx], features.take(idx), ref, n_boot)
        n_error = int(errors.get(key if len(keys) > 1 else key[0], 0))
        rows.append({**dict(zip(keys, key)), "n": metrics.pop("n"), "n_error": n_error, **metrics})
    return pd.DataFrame(rows)


def measurement_description(fid: dict, clip: dict | None, reference: str, reference_n: int | None,
                            n_boot: int) -> dict:
    """The DESCRIPTION_COLUMNS of every row: `fid` and `clip` are the feature descriptions
    (`evals.feature_cache.feature_description`) of the FID/KID extractor and of the CLIP model
    (None without one: then diversity uses the FID features)."""
    clip = clip or {}
    return {
        "extractor": fid["extractor"], "image_processor": fid.get("image_processor", ""),
        "resize_mode": fid["resize_mode"], "image_size": int(fid["image_size"]), "feature_dim": int(fid["dim"]),
        "weights": fid.get("weights", ""), "reference": reference,
        "reference_n": None if reference_n is None else int(reference_n),
        "clip_model": clip.get("extractor", "none"), "clip_image_processor": clip.get("image_processor", ""),
        "clip_weights": clip.get("weights", ""), "diversity_features": clip.get("extractor", fid["extractor"]),
        "n_boot": int(n_boot), "ci_level": CI_LEVEL,
    }


def image_scores(ok: pd.DataFrame, keys: list[str], f: RowFeatures) -> pd.DataFrame | None:
    """One row per evaluated image: sample_id, the keys, prompt, seed and `clip_score_raw`
    (100 cos(image, prompt), unclamped: the table's CLIP score of a group is
    max(mean clip_score_raw, 0)), plus attribute accuracy on the embedded model. None
    without a CLIP model."""
    if f.clip is None:
        return None
    cols = ["sample_id", *[k for k in keys if k != "sample_id"], "prompt", *(["seed"] if "seed" in ok else [])]
    out = ok[list(dict.fromkeys(cols))].reset_index(drop=True).copy()
    out["clip_score_raw"] = raw_clip_scores(f.clip, f.text)
    if f.attributes is not None:
        out["attribute_accuracy"] = f.attributes
    return out


def comparison_warnings(metrics: pd.DataFrame, keys: list[str], dim: int, ref: RefStats) -> list[str]:
    """`weak_comparison_warnings` for the table's groups, each named by its key values."""
    labels = {" ".join(str(r[k]) for k in keys): int(r["n"]) for r in metrics[[*keys, "n"]].to_dict("records")}
    return weak_comparison_warnings(labels, dim, ref_n=ref.n)
