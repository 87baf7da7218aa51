"""Variance partitioning (issue 17): the inclusion-exclusion of set-theoretic fits, its
significance test, and two groups through the ridge engine against scikit-learn's Ridge."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from neurotask.pipeline import ridge
from neurotask.pipeline.ridge.design import standardize
from neurotask.pipeline.stats import partition as vp
from neurotask.pipeline.stats.scores import r2_score


def test_subsets_are_ordered_by_size_then_groups():
    assert vp.subsets(["3D", "2D", "sem"]) == [("3D",), ("2D",), ("sem",), ("3D", "2D"), ("3D", "sem"),
                                               ("2D", "sem"), ("3D", "2D", "sem")]
    with pytest.raises(ValueError, match="distinct"):
        vp.subsets(["a", "a"])


def test_two_groups_give_the_textbook_formulas():
    r2 = {("a",): np.array([0.30, 0.10]), ("b",): np.array([0.20, 0.12]), ("a", "b"): np.array([0.40, 0.15])}
    out = vp.regions(r2, ["a", "b"])
    np.testing.assert_allclose(out[("a",)], [0.20, 0.03])  # R²(ab) - R²(b)
    np.testing.assert_allclose(out[("b",)], [0.10, 0.05])
    np.testing.assert_allclose(out[("a", "b")], [0.10, 0.07])  # R²(a) + R²(b) - R²(ab)


def test_three_groups_recover_planted_venn_regions_and_sum_to_the_full_model():
    rng = np.random.default_rng(0)
    groups = ["a", "b", "c"]
    keys = vp.subsets(groups)
    truth = {k: rng.uniform(0, 0.1, 50) for k in keys}
    # R²(S) = the regions touching S: an exact model of set-theoretic fits
    r2 = {S: sum(truth[T] for T in keys if set(T) & set(S)) for S in keys}
    out = vp.regions(r2, groups)
    for k in keys:
        np.testing.assert_allclose(out[k], truth[k], atol=1e-12)
    np.testing.assert_allclose(sum(out.values()), r2[("a", "b", "c")], atol=1e-12)
    # the explicit three-way formula
    shared = (r2[("a",)] + r2[("b",)] + r2[("c",)] - r2[("a", "b")] - r2[("a", "c")] - r2[("b", "c")]
              + r2[("a", "b", "c")])
    np.testing.assert_allclose(out[("a", "b", "c")], shared, atol=1e-12)


def test_a_missing_union_is_named():
    with pytest.raises(ValueError, match="missing: a\\+b"):
        vp.regions({("a",): np.zeros(2), ("b",): np.zeros(2)}, ["a", "b"])


def test_dominant_region_floors_negatives():
    keys, idx = vp.dominant_region({("a",): np.array([0.2, -0.1, -0.3]), ("b",): np.array([0.1, -0.2, 0.05])})
    assert keys == [("a",), ("b",)]
    assert idx.tolist() == [0, -1, 1]


def test_unique_pvalues_find_unique_signal_and_stay_uniform_without_it():
    rng = np.random.default_rng(1)
    n, v = 300, 400
    y = rng.standard_normal((n, v))
    reduced = 0.5 * y + rng.standard_normal((n, v))
    better = reduced + 0.3 * (y - reduced)  # closer to y: unique signal
    same = reduced.copy()  # exactly as good
    noisy_equal = 0.5 * y + rng.standard_normal((n, v))  # as good in expectation, different noise
    p_better = vp.unique_pvalues(y, better, reduced, n_permutations=500)
    p_null = vp.unique_pvalues(y, noisy_equal, reduced, n_permutations=500)
    assert (p_better < 0.01).mean() > 0.95
    assert 0.02 < (p_null < 0.05).mean() < 0.09  # ~ the test's size
    assert vp.unique_pvalues(y, same, reduced, n_permutations=200).min() > 0.3  # ties: never significant


def _two_group_data(seed: int):
    """(n, 40) features of two groups (20 + 20) and (n, 60) voxels: 20 driven by a alone, 20 by b
    alone, 20 by a shared latent carried by both groups."""
    rng = np.random.default_rng(seed)
    n = 400
    latent = rng.standard_normal((n, 4))
    Xa = np.hstack([rng.standard_normal((n, 16)), latent + 0.3 * rng.standard_normal((n, 4))])
    Xb = np.hstack([rng.standard_normal((n, 16)), latent + 0.3 * rng.standard_normal((n, 4))])
    wa, wb, ws = (rng.standard_normal((k, 20)) for k in (16, 16, 4))
    Y = np.hstack([Xa[:, :16] @ wa, Xb[:, :16] @ wb, latent @ ws]) / 3 + rng.standard_normal((n, 60))
    return Xa, Xb, Y


def test_two_groups_through_the_engine_match_sklearn_ridge_voxel_by_voxel():
    Xa, Xb, Y = _two_group_data(2)
    n = Y.shape[0]
    splits = ridge.make_splits(n, n_folds=5, seed=0)
    tr, te = splits.train, splits.test
    sets = {("a",): Xa, ("b",): Xb, ("a", "b"): np.hstack([Xa, Xb])}
    r2_engine, r2_sklearn = {}, {}
    for key, X in sets.items():
        Xz = standardize(X, tr)
        alphas = ridge.paper_alphas(X.shape[1], 40)
        res = ridge.ridge_cv(ridge.prepare(Xz, splits, dtype=np.float64), Y, alphas)
        r2_engine[key] = r2_score(Y[te], res.test_prediction)
        pred = np.empty((te.size, Y.shape[1]))
        for j in range(Y.shape[1]):
            model = Ridge(alpha=res.alpha[j]).fit(Xz[tr], Y[tr, j])
            pred[:, j] = model.predict(Xz[te])
        r2_sklearn[key] = r2_score(Y[te], pred)
    ours, theirs = vp.regions(r2_engine, ["a", "b"]), vp.regions(r2_sklearn, ["a", "b"])
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-8)
    # and the planted structure is what comes out, on average per voxel type
    assert ours[("a",)][:20].mean() > 5 * max(ours[("a",)][20:40].mean(), 0.01)
    assert ours[("b",)][20:40].mean() > 5 * max(ours[("b",)][:20].mean(), 0.01)
    assert ours[("a", "b")][40:].mean() > 2 * max(ours[("a",)][40:].mean(), ours[("b",)][40:].mean(), 0.01)
