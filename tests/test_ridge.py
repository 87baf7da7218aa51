"""The ridge engine against an independent reference: scikit-learn Ridge fit voxel by voxel."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from pipeline import ridge


def _data(n=180, p=25, v=12, seed=0, ill_conditioned=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    if ill_conditioned:  # a realistic decaying spectrum plus a near-duplicate column
        X = X * np.logspace(0, -4, p)
        X[:, -1] = X[:, 0] + 1e-7 * rng.normal(size=n)
    X += 3.0  # non-zero feature means exercise the intercept
    W = rng.normal(size=(p, v)) * (rng.random(v) < 0.7)  # some pure-noise voxels
    Y = X @ W + rng.normal(scale=3.0, size=(n, v)) + 10.0
    return X, Y


def _sklearn_reference(X, Y, splits, alphas):
    """Slow loop: per voxel, per alpha, per fold, sklearn Ridge with an intercept."""
    v = Y.shape[1]
    errors = np.zeros((alphas.size, v))
    for j in range(v):
        for a_i, a in enumerate(alphas):
            fold_mse = []
            for fit, val in splits.folds:
                m = Ridge(alpha=a, fit_intercept=True, solver="svd").fit(X[fit], Y[fit, j])
                fold_mse.append(np.mean((Y[val, j] - m.predict(X[val])) ** 2))
            errors[a_i, j] = np.mean(fold_mse)
    best = alphas[np.argmin(errors, axis=0)]
    pred = np.column_stack([
        Ridge(alpha=best[j], fit_intercept=True, solver="svd")
        .fit(X[splits.train], Y[splits.train, j]).predict(X[splits.test])
        for j in range(v)
    ])
    return errors, best, pred


@pytest.mark.parametrize("cv", ["kfold", "single_split"])
@pytest.mark.parametrize("shape", [(180, 25), (60, 90)])  # n_fit > p (Gram) and n_fit < p (kernel)
def test_matches_sklearn_ridge_float64(cv, shape):
    n, p = shape
    X, Y = _data(n=n, p=p, v=6)
    alphas = ridge.paper_alphas(p, 20)
    splits = ridge.make_splits(n, cv=cv, n_folds=5, seed=1)
    ref_err, ref_alpha, ref_pred = _sklearn_reference(X, Y, splits, alphas)
    res = ridge.ridge_cv(ridge.prepare(X, splits, dtype=np.float64), Y, alphas, voxel_batch=5)
    # Tolerances: float64 throughout; identical maths up to round-off.
    np.testing.assert_allclose(res.cv_error, ref_err, rtol=1e-8)
    np.testing.assert_array_equal(res.alpha, ref_alpha)
    np.testing.assert_allclose(res.test_prediction, ref_pred, rtol=1e-8, atol=1e-8)


def test_float32_products_agree_with_sklearn():
    X, Y = _data(n=240, p=40, v=16, seed=3, ill_conditioned=True)
    alphas = ridge.paper_alphas(40, 20)
    splits = ridge.make_splits(240, n_folds=7, seed=2)
    ref_err, ref_alpha, ref_pred = _sklearn_reference(X, Y, splits, alphas)
    res = ridge.ridge_cv(ridge.prepare(X, splits, dtype=np.float32), Y, alphas)
    # float32 products: CV errors to ~1e-4 relative; the selected alpha may differ only where
    # two alphas' errors are within that tolerance (flat CV curves).
    np.testing.assert_allclose(res.cv_error, ref_err, rtol=1e-4)
    differ = res.alpha != ref_alpha
    for j in np.flatnonzero(differ):
        e = ref_err[:, j]
        assert abs(e[alphas == res.alpha[j]][0] - e.min()) <= 1e-4 * e.min()
    # Test predictions equal sklearn's refit with the alpha we chose, for every voxel.
    ours = np.column_stack([
        Ridge(alpha=res.alpha[j], solver="svd").fit(X[splits.train], Y[splits.train, j]).predict(X[splits.test])
        for j in range(Y.shape[1])
    ])
    np.testing.assert_allclose(res.test_prediction, ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.test_prediction[:, ~differ], ref_pred[:, ~differ], rtol=1e-4, atol=1e-4)


def test_splits_are_seeded_disjoint_and_cover():
    a = ridge.make_splits(100, n_folds=7, seed=5)
    b = ridge.make_splits(100, n_folds=7, seed=5)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a.folds, b.folds))
    assert a.test.size == 15 and np.intersect1d(a.train, a.test).size == 0
    vals = np.concatenate([val for _, val in a.folds])
    assert np.array_equal(np.sort(vals), a.train)
    for fit, val in a.folds:
        assert np.intersect1d(fit, val).size == 0 and fit.size + val.size == a.train.size
    assert not np.array_equal(ridge.make_splits(100, seed=6).test, a.test)


def test_paper_grid():
    g = ridge.paper_alphas(2048)
    assert g.size == 100 and g[0] == pytest.approx(1e-8)
    assert g[-1] == pytest.approx(10 ** (0.5 * np.log10(2048) + 8))


def test_voxel_batching_does_not_change_results():
    X, Y = _data(v=23)
    splits = ridge.make_splits(180, seed=0)
    dec = ridge.prepare(X, splits)
    a = ridge.ridge_cv(dec, Y, ridge.paper_alphas(25, 15), voxel_batch=4)
    b = ridge.ridge_cv(dec, Y, ridge.paper_alphas(25, 15), voxel_batch=100)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    # float32 GEMM rounding depends on the batch width (~1e-7 of the predictions' scale), which
    # rtol alone cannot absorb for predictions that cross zero.
    scale = np.abs(b.test_prediction).max()
    np.testing.assert_allclose(a.test_prediction, b.test_prediction, rtol=1e-5, atol=1e-6 * scale)


def test_bad_inputs():
    X, Y = _data()
    splits = ridge.make_splits(180)
    Xn = X.copy(); Xn[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ridge.prepare(Xn, splits)
    with pytest.raises(ValueError, match="positive"):
        ridge.ridge_cv(ridge.prepare(X, splits), Y, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="cv must be"):
        ridge.make_splits(100, cv="loo")
