"""The metrics table: one row per configuration, every aggregate with its uncertainty.

Rows of one configuration (the values of the grouping keys, by default the run key) are one
group; each group gets its FID and KID against the reference, CLIP score, diversity, Vendi
score, attribute accuracy (embedded domain) and cost, with bootstrap intervals where they are
defined. Inputs are plain arrays aligned with the rows, so the table can be recomputed from
cached features without touching images or models.

FID comes twice, because the plain FID of n images is biased upward by about c / n
(evals/fid_infinity.py, docs/evaluation.md "FID-infinity"):

- `fid_inf`, `fid_inf_lo`, `fid_inf_hi`: FID-infinity, the bias-corrected headline, with an
  interval that covers the population FID (NaN below FID_INF_MIN_N images);
- `fid`: the plain "FID at n", n recorded in `fid_n` (all the group's images, or a seeded
  subset of exactly `fid_n` with jobs/evaluate.py --fid-n, so groups compare at equal bias).
  `fid_ci_lo`, `fid_ci_hi` are the recentred bootstrap of `evals.stats.fid_bootstrap_ci` on
  the same images: the spread of FID at that n (whether two groups at equal n differ), *not*
  an interval for the population FID, which they miss (0% coverage at d = 64). They stay in
  metrics.parquet for that use; the tables do not show them.

Beyond FID (docs/evaluation.md "Precision, recall, density, coverage" and "CMMD"), on the
same features against the same reference's features: `precision`, `recall` (k = 3),
`density`, `coverage` (k = 5), and `cmmd` with `cmmd_ci_lo`, `cmmd_ci_hi` when those features
are CLIP embeddings (`cmmd_features` names them; "none", and CMMD NaN, for Inception's).

Every row also says how it was measured (DESCRIPTION_COLUMNS: extractor, image processor,
weights, reference and its n, CLIP model, n_boot), so a metrics.parquet read on its own, or
concatenated with another run's, cannot be misread.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from evals.clip_score import aggregate_clip_score, raw_clip_scores
from evals.cmmd import cmmd, cmmd_bootstrap_ci, l2_normalize, within_kernel_mean
from evals.cost import COST_COLUMNS, cost_metrics, flag_comparable
from evals.diversity import diversity_by_prompt
from evals.fid import RefStats, kernel_inception_distance
from evals.fid_infinity import MIN_SUBSET, fid_at_n, fid_infinity
from evals.memory import MEMORY_COLUMNS
from evals.messages import listing
from evals.prdc import DC_K, PR_K, density_coverage, neighbour_radii, precision_recall
from evals.stats import bootstrap_ci, fid_bootstrap_ci, kid_bootstrap_ci, weak_comparison_warnings

# What group_metrics writes, and the columns that say how every row was measured: together
# with the grouping keys, that is every column of the table.
METRIC_COLUMNS = (
    "n", "n_error", "fid_inf", "fid_inf_lo", "fid_inf_hi", "fid", "fid_n", "fid_ci_lo", "fid_ci_hi", "kid",
    "kid_ci_lo", "kid_ci_hi", "kid_std", "precision", "recall", "density", "coverage", "cmmd", "cmmd_ci_lo",
    "cmmd_ci_hi", "clip_score",
    "clip_score_ci_lo", "clip_score_ci_hi", "diversity", "vendi", "attribute_accuracy", "attribute_accuracy_ci_lo",
    "attribute_accuracy_ci_hi", "gen_seconds", "images_per_gpu_second",
)
DESCRIPTION_COLUMNS = (
    "extractor", "image_processor", "resize_mode", "image_size", "feature_dim", "weights", "reference",
    "reference_n", "clip_model", "clip_image_processor", "clip_weights", "diversity_features", "n_boot", "ci_level",
    "fid_inf_n_boot", "pr_k", "dc_k", "cmmd_features",
)
METRIC_COLUMNS += COST_COLUMNS  # evals/cost.py: the spread of gen_seconds, the calls, device and dtype
METRIC_COLUMNS += MEMORY_COLUMNS  # evals/memory.py: weights memory, from _run.json (jobs/evaluate.py adds it)
CI_LEVEL = 0.95  # every interval of the table
KID_SUBSETS = 50  # KID's point estimate: mean over this many subsets (clean-fid / torchmetrics style)
FID_INF_MIN_N = 2 * MIN_SUBSET  # FID-infinity fits subsets of several sizes >= MIN_SUBSET: 16 images at least
# FID-infinity's bootstrap refits 6 subset sizes per resample: (8 + n_boot) x 6 eigenvalue
# problems of min(m, dim) square per group, 3.6x fewer at 50 than at the job's default 200.
# Its coverage (docs/evaluation.md "FID-infinity") was measured at n_boot = 50.
FID_INF_MAX_BOOT = 50
FID_N_SEED = 0  # the seed of --fid-n's subset (evals.fid_infinity.fid_at_n's rule)
# Where each metric's interval is; the others are f"{col}_ci_lo", f"{col}_ci_hi".
INTERVAL_COLUMNS = {"fid_inf": ("fid_inf_lo", "fid_inf_hi")}


def interval_columns(col: str) -> tuple[str, str]:
    """The (lower, upper) interval columns of metric `col`."""
    return INTERVAL_COLUMNS.get(col, (f"{col}_ci_lo", f"{col}_ci_hi"))


def headline_fid(metrics: pd.DataFrame) -> str:
    """The distance a report leads with (plots, Pareto front): `fid_inf` when the frame has a
    value of it, else `fid` (metrics files of older versions, groups all below FID_INF_MIN_N
    images); but `kid` when every group has fewer images than the feature dimension, where
    both FIDs are invalid (`fid_inf_warnings`) and KID, unbiased at any n, is not."""
    values = lambda col: pd.to_numeric(metrics[col], errors="coerce") if col in metrics else pd.Series([], dtype=float)  # noqa: E731
    n, dim = values("n"), values("feature_dim")
    if len(n) and len(dim) and (n < dim).all() and np.isfinite(values("kid")).any():
        return "kid"
    return "fid_inf" if np.isfinite(values("fid_inf")).any() else "fid"


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


def is_clip_extractor(name: str | None) -> bool:
    """Whether an extractor's features are CLIP image embeddings (CMMD's features): a CLIP
    model ('clip:<name>') or the embedded domain's CLIP; not Inception, nor unknown (None)."""
    return name is not None and (name == "embedded" or name.startswith("clip"))


@dataclass
class ReferenceTerms:
    """What precision/recall, density/coverage and CMMD need of the reference's features,
    computed once for every group: the k-NN radii (k = PR_K, DC_K) and CMMD's within-reference
    kernel mean (None when the features are not CLIP embeddings)."""

    features: np.ndarray
    radii_pr: np.ndarray
    radii_dc: np.ndarray
    cmmd_within: float | None

    @classmethod
    def of(cls, ref: RefStats) -> ReferenceTerms | None:
        """None when `ref` has no features (a statistics file of mu and sigma only)."""
        if ref is None or ref.features is None:
            return None
        x = ref.features
        clip = is_clip_extractor(ref.extractor) and len(x) >= 2
        radii = neighbour_radii(x, (PR_K, DC_K))
        return cls(x, radii[PR_K], radii[DC_K], within_kernel_mean(l2_normalize(x)) if clip else None)


def more_than_fid(x: np.ndarray, terms: ReferenceTerms, n_boot: int) -> dict:
    """Precision, recall, density, coverage of the group's features `x`, and CMMD with its
    interval when the features are CLIP embeddings; NaN where a side has too few samples
    (evals/prdc.py; `manifold_warnings` says which)."""
    out = dict(zip(("precision", "recall"), precision_recall(terms.features, x, PR_K, real_radii=terms.radii_pr)))
    out.update(zip(("density", "coverage"), density_coverage(terms.features, x, DC_K, real_radii=terms.radii_dc)))
    if terms.cmmd_within is not None and len(x) >= 2:
        out["cmmd"] = cmmd(x, terms.features, ref_within=terms.cmmd_within)
        out["cmmd_ci_lo"], out["cmmd_ci_hi"] = cmmd_bootstrap_ci(x, terms.features, n_boot=n_boot, level=CI_LEVEL)
    return out


def fid_metrics(x: np.ndarray, ref: RefStats, n_boot: int, fid_n: int | None = None) -> dict:
    """FID-infinity of the group's features `x` with its interval (NaN below FID_INF_MIN_N
    images), and the plain FID at n with its spread (see the module docstring): n is the
    group's size, or `fid_n` (a seeded subset; NaN when the group has fewer images).

    FID-infinity is clipped at 0 like its interval's ends: the intercept of the fit can fall
    below 0 when the population FID is near 0, and the population FID never does."""
    nan = float("nan")
    out = dict.fromkeys(("fid_inf", "fid_inf_lo", "fid_inf_hi", "fid", "fid_ci_lo", "fid_ci_hi"), nan)
    if len(x) >= FID_INF_MIN_N:
        res = fid_infinity(x, ref, n_boot=min(n_boot, FID_INF_MAX_BOOT), level=CI_LEVEL)
        out["fid_inf"], (out["fid_inf_lo"], out["fid_inf_hi"]) = max(res.value, 0.0), res.ci
    out["fid_n"] = m = len(x) if fid_n is None else int(fid_n)
    if len(x) >= m:
        out["fid"] = fid_at_n(x, ref, m, seed=FID_N_SEED)
        same = x if m == len(x) else x[np.random.default_rng(FID_N_SEED).permutation(len(x))[:m]]  # fid_at_n's
        out["fid_ci_lo"], out["fid_ci_hi"] = fid_bootstrap_ci(same, ref, n_boot=n_boot, level=CI_LEVEL)
    return out


def group_metrics(rows: pd.DataFrame, f: RowFeatures, ref: RefStats | None, n_boot: int,
                  fid_n: int | None = None, terms: ReferenceTerms | None = None) -> dict:
    """The metrics of one configuration's ok rows (columns prompt, gen_seconds) and their
    features; `fid_n`: the plain FID's n (`fid_metrics`); `terms`: the reference's
    `ReferenceTerms` (computed here when None)."""
    n, nan = len(rows), float("nan")
    out = {"n": n}
    if ref is not None and n >= 2:
        out.update(fid_metrics(f.fid, ref, n_boot, fid_n))
        if ref.features is not None:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                f.fid, ref.features, subsets=KID_SUBSETS, subset_size=min(n, ref.features.shape[0], 1000))
            out["kid_ci_lo"], out["kid_ci_hi"] = kid_bootstrap_ci(f.fid, ref.features, n_boot=n_boot, level=CI_LEVEL)
            out.update(more_than_fid(f.fid, terms or ReferenceTerms.of(ref), n_boot))
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
    out.update(cost_metrics(rows, n_boot, CI_LEVEL))  # seconds per image, its interval over calls
    return out


def metrics_table(ok: pd.DataFrame, failed: pd.DataFrame, keys: list[str], features: RowFeatures,
                  ref: RefStats | None, n_boot: int, fid_n: int | None = None) -> pd.DataFrame:
    """One row per configuration of `ok` (sorted by `keys`): the keys, n, n_error (the rows of
    `failed` with those keys), then the metrics of `group_metrics` (plain FID at `fid_n`
    images when given, else at each group's n)."""
    errors = failed.groupby(keys, dropna=False).size()
    terms = ReferenceTerms.of(ref)
    rows = []
    for key, idx in ok.groupby(keys, sort=True, dropna=False).indices.items():
        key = key if isinstance(key, tuple) else (key,)
        with warnings.catch_warnings():  # NaN means of tiny groups: the table shows them as –
            warnings.simplefilter("ignore")
            metrics = group_metrics(ok.iloc[idx], features.take(idx), ref, n_boot, fid_n, terms)
        n_error = int(errors.get(key if len(keys) > 1 else key[0], 0))
        rows.append({**dict(zip(keys, key)), "n": metrics.pop("n"), "n_error": n_error, **metrics})
    table = pd.DataFrame(rows)
    if len(table):
        table["cost_comparable"] = flag_comparable(table)
    return table


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
        "n_boot": int(n_boot), "ci_level": CI_LEVEL, "fid_inf_n_boot": min(int(n_boot), FID_INF_MAX_BOOT),
        "pr_k": PR_K, "dc_k": DC_K,
        "cmmd_features": fid["extractor"] if is_clip_extractor(fid["extractor"]) else "none",
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


def comparison_warnings(metrics: pd.DataFrame, keys: list[str], dim: int, ref: RefStats,
                        fid_n: int | None = None, labels: Sequence[str] | None = None) -> list[str]:
    """The table's warnings about FID, each group named by its entry of `labels` (jobs/evaluate.py
    passes evals.report.format.config_labels: "ddim 4 steps g7.5", the keys that vary), else
    by its key values: FID-infinity's (`fid_inf_warnings`), groups too small for `fid_n`, and
    `weak_comparison_warnings` for the plain FID at the n it was computed on."""
    if labels is None:
        labels = [" ".join(str(r[k]) for k in keys) for r in metrics[keys].to_dict("records")]
    rows = list(zip(labels, metrics["n"].astype(int)))
    notes = fid_inf_warnings(rows, dim)
    if fid_n is not None:
        small = [f"{g} (n={n})" for g, n in rows if n < fid_n]
        if small:
            notes.append(f"FID at n={fid_n} (--fid-n): {len(small)} group(s) have fewer images, their fid is NaN: "
                         f"{listing(small)}; lower --fid-n to compare them")
        rows = [(g, fid_n) for g, n in rows if n >= fid_n]
    return notes + weak_comparison_warnings(dict(rows), dim, ref_n=ref.n, metric="FID at n") + manifold_warnings(
        metrics, keys, ref)


def manifold_warnings(metrics: pd.DataFrame, keys: list[str], ref: RefStats) -> list[str]:
    """Why precision, recall, density, coverage or CMMD are missing: a reference without
    features, one of k images or fewer, groups of k images or fewer (recall), or features
    that are not CLIP embeddings (CMMD)."""
    if ref.features is None:
        return ["the reference is statistics only (mu, sigma; no features): KID, precision, recall, density, "
                "coverage and CMMD are not computed; make it with jobs/evaluate.py --make-reference, which keeps "
                "the features"]
    notes, n_ref = [], len(ref.features)
    if n_ref <= DC_K:
        what = "precision, density and coverage" if n_ref <= PR_K else "density and coverage"
        notes.append(f"{what} need more than k images in the reference for its k-th nearest neighbours (k={PR_K} "
                     f"for precision, {DC_K} for density/coverage); the reference has {n_ref}: NaN")
    small = [f"{' '.join(str(r[k]) for k in keys)} (n={int(r['n'])})" for r in metrics[[*keys, "n"]].to_dict("records")
             if int(r["n"]) <= PR_K]
    if small:
        notes.append(f"recall needs more than k={PR_K} images per group for their k-th nearest neighbours: "
                     f"{len(small)} group(s) have fewer, their recall is NaN: {listing(small)}")
    if not is_clip_extractor(ref.extractor):
        notes.append(f"CMMD is not computed: it compares CLIP embeddings and the features are "
                     f"{ref.extractor or 'unknown'}'s (use --features clip with --clip-model, or --features embedded)")
    return notes


def fid_inf_warnings(rows: list[tuple[str, int]], dim: int) -> list[str]:
    """Warnings for FID-infinity of groups (name, n): NaN below FID_INF_MIN_N images; invalid
    below the feature dimension (simulated, d = 64, population FID 1.06: +930% at n = 16,
    +390% at n = 32, its interval never covering); biased low below 4 x dim (-90% at n = d,
    -51% at 2d, -8% at 4d, intervals still covering). docs/evaluation.md "FID-infinity"."""
    notes = []
    nan = [f"{g} (n={n})" for g, n in rows if n < FID_INF_MIN_N]
    if nan:
        notes.append(f"FID-infinity: {len(nan)} group(s) have fewer than {FID_INF_MIN_N} images, too few for subsets "
                     f"of several sizes: fid_inf is NaN for {listing(nan)}")
    below = [f"{g} (n={n})" for g, n in rows if FID_INF_MIN_N <= n < dim]
    if below:
        notes.append(f"FID-infinity: {len(below)} group(s) have fewer images than the feature dimension {dim}: "
                     f"{listing(below)}. The extrapolation to n = infinity fails there (simulated at d=64: +390% at "
                     "n=32, intervals missing the population FID): these values are invalid and never ranked")
    low = [f"{g} (n={n})" for g, n in rows if dim <= n < 4 * dim]
    if low:
        notes.append(f"FID-infinity: {len(low)} group(s) have fewer than 4 x the feature dimension ({4 * dim}) images: "
                     f"{listing(low)}. FID-infinity is biased low there (simulated at d=64: -51% at n=2d, -8% at 4d; "
                     "its interval still covered the population FID)")
    return notes
