"""The kernel form (fewer fit rows than features, as the variance partition's wide unions are)
holds no (p, k) array: its decomposition's size does not grow with p, and its predictions are a
float64 ridge solve's."""

from __future__ import annotations

import numpy as np
import pytest

from neurotask.pipeline import ridge

N = 60


def _features(p: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # a decaying spectrum with offsets, as standardised CNN features are not
    return (rng.standard_normal((N, p)) * np.linspace(2.0, 0.2, p) + 0.5).astype(np.float32)


def _direct_prediction(X: np.ndarray, y: np.ndarray, fit: np.ndarray, ev: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge with an intercept by the dual solve in float64: (n_eval,)."""
    X = np.asarray(X, dtype=np.float64)
    mean, ym = X[fit].mean(0), y[fit].mean()
    Xf = X[fit] - mean
    dual = np.linalg.solve(Xf @ Xf.T + alpha * np.eye(fit.size), y[fit] - ym)
    return (X[ev] - mean) @ (Xf.T @ dual) + ym


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_form_holds_no_feature_sized_array(dtype):
    splits = ridge.make_splits(N, n_folds=4, seed=1)
    small = ridge.prepare(_features(150), splits, dtype=dtype)
    wide = ridge.prepare(_features(600), splits, dtype=dtype)
    for dec in (small, wide):
        assert dec.centred is None
        for basis in dec.folds + (dec.final,):
            assert basis.rotation is None and basis.fit_shift is None
            assert basis.proj_fit.shape == (basis.eigvals.size, basis.fit_rows.size)
    # full rank in both (k = n_fit - 1): the same shapes, so the same bytes, at 4x the features
    assert wide.nbytes == small.nbytes


def test_kernel_form_predicts_as_a_direct_float64_solve():
    X = _features(400, seed=2)
    rng = np.random.default_rng(3)
    Y = X.astype(np.float64) @ rng.standard_normal((400, 5)) * 0.05 + rng.standard_normal((N, 5))
    splits = ridge.make_splits(N, n_folds=4, seed=4)
    alphas = np.logspace(-1, 4, 8)
    dec = ridge.prepare(X, splits, dtype=np.float64)
    assert dec.final.rotation is None
    res = ridge.ridge_cv(dec, Y, alphas, search="exhaustive")
    for v in range(Y.shape[1]):
        errors = [np.mean([np.mean((Y[val, v] - _direct_prediction(X, Y[:, v], fit, val, a)) ** 2)
                           for fit, val in splits.folds]) for a in alphas]
        np.testing.assert_allclose(res.cv_error[:, v], errors, rtol=1e-8)
        assert res.alpha_index[v] == int(np.argmin(errors))
        expected = _direct_prediction(X, Y[:, v], np.asarray(splits.train), np.asarray(splits.test), res.alpha[v])
        np.testing.assert_allclose(res.test_prediction[:, v], expected, rtol=1e-8, atol=1e-10)


def test_kernel_form_peak_memory_stays_below_a_float64_copy_of_the_features():
    import tracemalloc

    X = _features(20_000, seed=5)  # n x p float64 would be 9.6 MB
    splits = ridge.make_splits(N, n_folds=4, seed=6)
    tracemalloc.start()
    try:
        dec = ridge.prepare(X, splits, dtype=np.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.final.rotation is None
    # column blocks: ~3 n x _COLUMN_BLOCK float64 at a time (3 MB), never n x p float64 nor p x k
    assert peak < 0.5 * N * X.shape[1] * 8, peak
