"""Precision/recall against torch-fidelity's implementation; density/coverage against the
formulas of Naeem et al. 2020 on points whose answer is worked out by hand; the small-n guard
and the metrics table's columns."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from evals import prdc
from evals.fid import RefStats
from evals.metrics_table import RowFeatures, comparison_warnings, measurement_description, metrics_table
from evals.prdc import density_coverage, kth_neighbour_distances, precision_recall


# torch-fidelity 0.4.0, torch_fidelity/metric_prc.py (Apache-2.0, github.com/toshas/torch-fidelity), copied
# line for line: importing the package needs torchvision, which this torch build has none of. Checked once
# against the wheel's own functions (pip download --no-deps torch-fidelity==0.4.0): identical on these inputs.
def calc_cdist_full(features_1, features_2, batch_size=10000):
    dists = []
    for feat1_batch in features_1.split(batch_size):
        dists_batch = []
        for feat2_batch in features_2.split(batch_size):
            dists_batch.append(torch.cdist(feat1_batch, feat2_batch).cpu())
        dists.append(torch.cat(dists_batch, dim=1))
    return torch.cat(dists, dim=0)


def calculate_precision_recall_full(features_1, features_2, neighborhood=3, batch_size=10000):
    dist_nn_1 = calc_cdist_full(features_1, features_1, batch_size).kthvalue(neighborhood + 1).values
    dist_nn_2 = calc_cdist_full(features_2, features_2, batch_size).kthvalue(neighborhood + 1).values
    dist_2_1 = calc_cdist_full(features_2, features_1, batch_size)
    dist_1_2 = dist_2_1.T
    # Recall: for each real sample (features_2), is it inside any generated sample's (features_1) ball?
    recall = (dist_2_1 <= dist_nn_1).any(dim=1).float().mean().item()
    # Precision: for each generated sample (features_1), is it inside any real sample's (features_2) ball?
    precision = (dist_1_2 <= dist_nn_2).any(dim=1).float().mean().item()
    return precision, recall


@pytest.mark.parametrize("n_real,n_gen,dim,shift,k", [(300, 200, 16, 0.0, 3), (250, 400, 64, 0.7, 3),
                                                       (120, 90, 8, 1.5, 5), (200, 200, 2048, 0.0, 3)])
def test_precision_recall_agree_with_torch_fidelity(n_real, n_gen, dim, shift, k):
    """Tolerance: torch-fidelity's values are float32 fractions of n; ours equal them to
    float32 precision (the same samples are inside the same balls; a near-tie could flip
    one sample, 1/n, and does not occur on these seeded draws)."""
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n_real, dim))
    gen = rng.normal(size=(n_gen, dim)) * (1.2 if dim < 1000 else 1.0) + shift
    theirs = calculate_precision_recall_full(torch.from_numpy(gen), torch.from_numpy(real), neighborhood=k)
    ours = precision_recall(real, gen, k)
    assert ours == pytest.approx(theirs, abs=1e-7)
    assert 0.0 < min(ours) and max(ours) < 1.0  # an informative case, not all-in or all-out


def test_density_coverage_on_a_hand_checked_case():
    """1-d, k = 2. Real X = 0, 1, 3, 6, 10: NND_2 = 3, 2, 3, 4, 7 (the 2nd nearest other point),
    balls (-3, 3), (-1, 3), (0, 6), (2, 10), (3, 17). Generated Y = 0.5, 2.5, 20: 0.5 lies in
    3 balls (of 0, 1, 3), 2.5 in 4 (0, 1, 3, 6), 20 in none. density = (3 + 4 + 0) / (2 x 3)
    = 7/6; coverage: the balls of 0, 1, 3, 6 hold a generated point, that of 10 none: 4/5.
    Precision (closed balls, same radii): 0.5 and 2.5 inside, 20 outside: 2/3. Recall: the
    generated NND_2 are 19.5, 17.5, 19.5 (the outlier 20 inflates them), every real point is
    within 19.5 of 0.5: 1, the failure density/coverage were designed to avoid."""
    real, gen = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]]), np.array([[0.5], [2.5], [20.0]])
    np.testing.assert_allclose(kth_neighbour_distances(real, 2), [3, 2, 3, 4, 7])
    density, coverage = density_coverage(real, gen, k=2)
    assert density == pytest.approx(7 / 6, abs=1e-12) and coverage == pytest.approx(4 / 5, abs=1e-12)
    assert precision_recall(real, gen, k=2) == pytest.approx((2 / 3, 1.0), abs=1e-12)


def test_boundaries_follow_each_reference_implementation():
    """-3 is at exactly NND_2(0) = 3 from the real point 0, and in no other ball: inside for
    precision (<=, Kynkaanniemi's code, torch-fidelity), outside for density and coverage
    (<, Naeem's code)."""
    real, gen = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]]), np.array([[-3.0]])
    with pytest.warns(RuntimeWarning, match="recall: the generated set has 1 sample"):
        precision, recall = precision_recall(real, gen, k=2)
    assert precision == 1.0 and np.isnan(recall)
    assert density_coverage(real, gen, k=2) == (0.0, 0.0)


def test_too_few_samples_are_nan_with_a_warning_never_an_error():
    real, gen = np.random.default_rng(0).normal(size=(2, 3, 4))
    with pytest.warns(RuntimeWarning, match=r"needs more than k=3"):
        assert np.isnan(precision_recall(real, gen)).all()
    with pytest.warns(RuntimeWarning, match=r"density and coverage: the reference has 3 sample\(s\), needs more"):
        assert np.isnan(density_coverage(real, gen)).all()
    with pytest.raises(ValueError, match="dim"):
        precision_recall(real, gen[:, :3])


def test_blocked_distances_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(3)
    real, gen = rng.normal(size=(150, 6)), rng.normal(size=(70, 6)) + 0.3
    whole = precision_recall(real, gen), density_coverage(real, gen)
    monkeypatch.setattr(prdc, "_BLOCK_ELEMS", 500)  # a few rows per block
    assert (precision_recall(real, gen), density_coverage(real, gen)) == whole


def _table(ref_extractor: str, sizes=(3, 40)):
    rng = np.random.default_rng(4)
    ok = pd.DataFrame({"scheduler": [f"s{i}" for i, n in enumerate(sizes) for _ in range(n)],
                       "prompt": "a", "gen_seconds": 1.0})
    feats = rng.normal(size=(len(ok), 8))
    ref = RefStats.from_features(rng.normal(size=(60, 8)), extractor=ref_extractor, keep_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the table's small-n NaNs warn nothing: the notes say it
        m = metrics_table(ok, ok.iloc[:0], ["scheduler"], RowFeatures(feats), ref, n_boot=50)
    return m, ref


def test_metrics_table_columns_and_small_group_notes():
    m, ref = _table("clip:tiny")
    small, big = m.iloc[0], m.iloc[1]
    assert np.isnan(small.recall) and 0 <= small.precision <= 1 and small.density >= 0 and 0 <= small.coverage <= 1
    assert big[["precision", "recall", "density", "coverage", "cmmd"]].notna().all()
    assert big.cmmd_ci_lo <= big.cmmd_ci_hi
    notes = comparison_warnings(m, ["scheduler"], 8, ref)
    assert any(n.startswith("recall needs more than k=3 images per group") and "s0 (n=3)" in n for n in notes)
    assert not any("CMMD" in n for n in notes)
    desc = measurement_description({"extractor": "clip:tiny", "resize_mode": "clip-processor", "image_size": 64,
                                    "dim": 8}, None, "ref", 60, 50)
    assert (desc["pr_k"], desc["dc_k"], desc["cmmd_features"]) == (3, 5, "clip:tiny")


def test_cmmd_is_not_computed_on_inception_features():
    m, ref = _table("inception", sizes=(20, 20))
    assert m.cmmd.isna().all() if "cmmd" in m else True
    assert m.precision.notna().all()
    notes = comparison_warnings(m, ["scheduler"], 8, ref)
    assert any(n.startswith("CMMD is not computed: it compares CLIP embeddings and the features are inception's")
               for n in notes)
    stats_only = RefStats(ref.mu, ref.sigma, ref.n, "inception")
    assert any("KID, precision, recall, density, coverage and CMMD are not computed" in n
               for n in comparison_warnings(m, ["scheduler"], 8, stats_only))


def test_radii_of_several_k_in_one_pass():
    x = np.random.default_rng(5).normal(size=(40, 3))
    radii = prdc.neighbour_radii(x, (5, 3))
    full = np.sort(np.linalg.norm(x[:, None] - x[None], axis=2), axis=1)  # column 0: the row itself
    np.testing.assert_allclose(radii[3], full[:, 3], rtol=1e-12)
    np.testing.assert_allclose(radii[5], full[:, 5], rtol=1e-12)
    four = prdc.neighbour_radii(x[:4], (3, 5))  # a 3rd neighbour, no 5th
    assert np.isfinite(four[3]).all() and np.isnan(four[5]).all()
