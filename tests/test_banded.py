"""Banded ridge against the engine (one band) and against himalaya's banded ridge."""

import numpy as np
import pytest
from himalaya.backend import set_backend
from himalaya.ridge import solve_group_ridge_random_search
from himalaya.scoring import r2_score_split

from neurotask.pipeline import ridge


def _bands(n=160, widths=(12, 20, 8), v=40, seed=0, driven_by=None, noise=2.0):
    """Standardised bands and responses; ``driven_by``: only that band carries signal."""
    rng = np.random.default_rng(seed)
    blocks = [rng.normal(size=(n, p)) for p in widths]
    blocks = [(X - X.mean(0)) / X.std(0) for X in blocks]
    Y = rng.normal(scale=noise, size=(n, v)) + 5.0
    for b, X in enumerate(blocks):
        if driven_by is None or b == driven_by:
            Y += X @ (rng.normal(size=(X.shape[1], v)) * (0.3 + rng.random(v)) * (b + 1) / 3)
    return blocks, Y


def _fit(blocks, Y, candidates, **kw):
    splits = ridge.make_splits(Y.shape[0], n_folds=5, seed=1)
    alphas = np.logspace(-3, 4, 15)
    return splits, alphas, ridge.banded_ridge_cv(blocks, splits, Y, alphas, candidates, dtype=np.float64, **kw)


def test_candidates_are_deterministic_on_the_simplex():
    c = ridge.simplex_candidates(3, 10, seed=4)
    assert c.shape == (10, 3)
    np.testing.assert_allclose(c.sum(1), 1.0)
    assert (c >= 0).all()
    np.testing.assert_allclose(c[0], 1 / 3)
    np.testing.assert_array_equal(c[1:4], np.eye(3))
    np.testing.assert_array_equal(c, ridge.simplex_candidates(3, 10, seed=4))
    assert not np.array_equal(c[4:], ridge.simplex_candidates(3, 10, seed=5)[4:])
    np.testing.assert_array_equal(ridge.simplex_candidates(1, 5, 0), [[1.0]])


def test_one_band_equals_ridge_cv():
    blocks, Y = _bands(widths=(15,))
    splits, alphas, res = _fit(blocks, Y, ridge.simplex_candidates(1, 3, 0))
    ref = ridge.ridge_cv(ridge.prepare(blocks[0], splits, dtype=np.float64), Y, alphas)
    np.testing.assert_array_equal(res.alpha, ref.alpha)
    np.testing.assert_allclose(res.test_prediction, ref.test_prediction, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.cv_error, ref.cv_error[ref.alpha_index, np.arange(Y.shape[1])], rtol=1e-12)
    np.testing.assert_array_equal(res.band_alpha, res.alpha[None])


def test_band_predictions_sum_to_the_test_prediction():
    blocks, Y = _bands(driven_by=2)  # so that the corner (0, 0, 1) wins somewhere
    splits, _, res = _fit(blocks, Y, ridge.simplex_candidates(3, 8, 0))
    assert np.unique(res.candidate_index).size > 1  # several candidates chosen
    intercept = Y[splits.train].mean(0)
    np.testing.assert_allclose(res.band_prediction.sum(0) + intercept, res.test_prediction, atol=1e-8)
    # a band with weight 0 contributes nothing and has an infinite effective alpha
    zero = res.weights == 0
    assert zero.any()
    assert np.all(res.band_prediction.transpose(1, 0, 2)[:, zero] == 0)
    assert np.all(np.isinf(res.band_alpha[zero]))
    np.testing.assert_allclose(res.band_alpha[~zero], np.broadcast_to(res.alpha, zero.shape)[~zero] / res.weights[~zero])


def test_split_r2_sums_to_r2_and_matches_himalaya():
    blocks, Y = _bands(seed=3)
    splits, _, res = _fit(blocks, Y, ridge.simplex_candidates(3, 8, 0))
    y = Y[splits.test]
    split = ridge.split_r2(y, res.band_prediction)
    e = y - y.mean(0)
    P = res.band_prediction.sum(0)
    np.testing.assert_allclose(split.sum(0), 1 - ((e - P) ** 2).sum(0) / (e ** 2).sum(0), atol=1e-12)
    set_backend("numpy")
    np.testing.assert_allclose(split, r2_score_split(e, res.band_prediction), atol=1e-12)


def test_planted_band_gets_the_weight_and_the_split():
    blocks, Y = _bands(n=300, widths=(10, 10, 10), v=30, seed=2, driven_by=1, noise=1.0)
    splits, _, res = _fit(blocks, Y, ridge.simplex_candidates(3, 12, 0))
    split = ridge.split_r2(Y[splits.test], res.band_prediction)
    assert np.mean(res.weights.argmax(0) == 1) >= 0.9
    assert np.mean(split.argmax(0) == 1) >= 0.9
    assert np.median(split[1] / split.sum(0)) > 0.9


def test_against_himalaya_banded_ridge():
    """Same candidates, alphas, folds and intercept handling (per-fold centring, the refit's
    intercept the training means) as himalaya's solve_group_ridge_random_search, float64 both.

    Differences that are not errors: the corners (a band alone) are left out, since himalaya scales
    the union by sqrt(gamma) in place and divides by it afterwards (0/0: NaN); himalaya breaks ties
    between alphas towards the larger alpha (a 1e-10 log(alpha) slope) and between candidates by
    an eps margin, we towards the smaller alpha and the first candidate: a voxel may differ only
    where two choices' CV errors are within those margins, which the check below verifies.
    """
    blocks, Y = _bands(n=160, widths=(12, 20, 8), v=120, seed=5)
    candidates = ridge.simplex_candidates(3, 10, 0)
    candidates = candidates[(candidates > 0).all(1)]
    splits, alphas, res = _fit(blocks, Y, candidates)
    tr, te = splits.train, splits.test
    pos = np.empty(Y.shape[0], dtype=np.int64)
    pos[tr] = np.arange(tr.size)
    cv = [(pos[f.fit], pos[f.validation]) for f in splits.folds]
    set_backend("numpy")
    deltas, w, cv_scores, intercept = solve_group_ridge_random_search(
        [X[tr] for X in blocks], Y[tr], n_iter=candidates, alphas=alphas, fit_intercept=True, cv=cv,
        return_weights=True, local_alpha=True, progress_bar=False, warn=False)
    ours = np.log(res.weights / res.alpha[None])
    same = np.isclose(deltas, ours, rtol=0, atol=1e-9).all(0)
    # where the choices differ, both are optimal within the tie margins
    hs = -cv_scores.max(0)  # himalaya's best CV error per voxel (MSE)
    np.testing.assert_allclose(hs[~same], res.cv_error[~same], rtol=1e-6)
    assert same.mean() >= 0.999 or np.all(np.isclose(hs[~same], res.cv_error[~same], rtol=1e-6))
    np.testing.assert_allclose(hs, res.cv_error, rtol=1e-9)
    h_pred = np.concatenate([X[te] for X in blocks], 1) @ w + intercept
    y = Y[te]
    sst = ((y - y.mean(0)) ** 2).sum(0)
    r2_h = 1 - ((y - h_pred) ** 2).sum(0) / sst
    r2_o = 1 - ((y - res.test_prediction) ** 2).sum(0) / sst
    assert np.abs(r2_h - r2_o)[same].max() < 1e-4
    print(f"same choice {same.mean():.4f}")


@pytest.mark.parametrize("bad", ["shape", "simplex"])
def test_rejects_bad_arguments(bad):
    blocks, Y = _bands(widths=(5, 6), v=3)
    splits = ridge.make_splits(Y.shape[0], n_folds=3)
    cand = np.array([[0.5, 0.5]]) if bad == "shape" else np.array([[0.7, 0.7]])
    if bad == "shape":
        blocks[1] = blocks[1][:-1]
    with pytest.raises(ValueError, match="block 1|simplex"):
        ridge.banded_ridge_cv(blocks, splits, Y, np.logspace(-2, 2, 5), cand)
