"""The engine on features and responses that push float arithmetic (issue 17's hardening): a
spectrum running continuously into the Gram matrix's round-off, and voxels in large units."""

import contextlib
import warnings
from collections import Counter

import numpy as np
import pytest

from neurotask.pipeline import ridge
from neurotask.pipeline.ridge import decomposition as dec
from neurotask.pipeline.ridge.solve import unit_scale


def _wide_features(n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, p) features whose centred singular values span 1..1e-8 log-uniformly, and responses
    (n, 12) with signal spread evenly over every direction (each direction adds the same
    variance to y, so the smallest directions matter as much as the largest)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, p)))
    U -= U.mean(0)  # centred columns: the spectrum is the centred features' one
    U, _ = np.linalg.qr(U)
    V, _ = np.linalg.qr(rng.standard_normal((p, p)))
    S = np.logspace(0, -8, p) * np.sqrt(n)
    X = (U * S) @ V.T + 3.0  # an offset the intercept absorbs
    signal = U @ rng.standard_normal((p, 12))  # unit variance per direction, in the column space
    Y = signal * np.sqrt(n / p) + 0.3 * rng.standard_normal((n, 12))
    return X, Y


def _reference_predictions(X: np.ndarray, Y: np.ndarray, splits, alphas: np.ndarray) -> np.ndarray:
    """Test predictions of ridge with intercept at each voxel's alpha, from numpy's float64 SVD
    of the centred training rows (the reference the issue measured against)."""
    tr, te = splits.train, splits.test
    mx, my = X[tr].mean(0), Y[tr].mean(0)
    U, S, Vt = np.linalg.svd(X[tr] - mx, full_matrices=False)
    E = (X[te] - mx) @ Vt.T
    UtY = U.T @ (Y[tr] - my)
    out = np.empty((te.size, Y.shape[1]))
    for j, a in enumerate(alphas):
        out[:, j] = E @ (S / (S * S + a) * UtY[:, j]) + my[j]
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_spectrum_running_into_round_off_keeps_its_directions(dtype):
    n, p = 700, 200
    X, Y = _wide_features(n, p, seed=0)
    splits = ridge.make_splits(n, n_folds=5, seed=3)
    d = ridge.prepare(X, splits, dtype=dtype)
    # the Gram matrix's eigh resolves eigenvalues to ~1e-12 of the largest, i.e. singular values
    # to ~1e-6: it would keep ~3/4 of these directions; the rows' SVD keeps them all
    assert d.final.eigvals.size == p
    assert all(b.eigvals.size == p for b in d.folds)
    assert np.all(np.diff(d.final.eigvals) >= 0)  # ascending, as every consumer expects
    alphas = np.logspace(-14, 4, 37)
    res = ridge.ridge_cv(d, Y, alphas, search="exhaustive")
    ref = _reference_predictions(X, Y, splits, res.alpha)
    if dtype == np.float64:
        np.testing.assert_allclose(res.test_prediction, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    r = [np.corrcoef(res.test_prediction[:, j], Y[splits.test, j])[0, 1] for j in range(Y.shape[1])]
    r_ref = [np.corrcoef(ref[:, j], Y[splits.test, j])[0, 1] for j in range(Y.shape[1])]
    np.testing.assert_allclose(r, r_ref, atol=1e-5 if dtype == np.float32 else 1e-8)
    assert (d.centred is None) == (dtype == np.float32)  # direct form in float32: cross-products would lose the small directions


def test_the_gram_path_is_kept_where_the_spectrum_has_a_gap():
    """Rank-deficient features (a duplicated and a constant column): null directions at
    round-off and real ones far above it. The fast path is exact there and stays in use."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 40))
    X[:, 5] = X[:, 4]
    X[:, 7] = 2.0
    s = np.linalg.eigvalsh(np.cov(X[:250].T) * 249)
    keep = s > s[-1] * dec._EIG_RTOL_FACTOR * 40 * np.finfo(float).eps
    assert not dec._too_wide(s, keep)
    d = ridge.prepare(X, ridge.make_splits(300, n_folds=5, seed=0), dtype=np.float64)
    assert d.final.eigvals.size == 38  # two null directions dropped, as before


class _Tally:
    """An engine observer that sums the flops of each phase and the counts it reports."""

    def __init__(self):
        self.totals = Counter()

    @contextlib.contextmanager
    def phase(self, name, flops):
        self.totals[name] += flops
        yield

    def count(self, name, value):
        self.totals[name] += value

    def maximum(self, name, value):
        self.totals[name] = max(self.totals[name], value)


@pytest.mark.parametrize("units", [1e6, 1e8])
def test_voxels_in_large_units_give_the_same_alphas_without_overflow(units):
    rng = np.random.default_rng(4)
    n, p = 240, 30
    X = rng.standard_normal((n, p))
    Y = X @ rng.standard_normal((p, 50)) * 0.2 + rng.standard_normal((n, 50))
    splits = ridge.make_splits(n, n_folds=5, seed=1)
    d = ridge.prepare(X, splits)
    alphas = ridge.paper_alphas(p, 30)
    seen, seen_big = _Tally(), _Tally()
    base = ridge.ridge_cv(d, Y, alphas, observer=seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 overflow raised a RuntimeWarning here before
        big = ridge.ridge_cv(d, Y * units, alphas, observer=seen_big)
    assert seen_big.totals == seen.totals  # as much work, as many exact checks, whatever the units
    np.testing.assert_array_equal(big.alpha_index, base.alpha_index)
    np.testing.assert_allclose(big.test_prediction, base.test_prediction * units, rtol=1e-5,
                               atol=1e-5 * units * np.abs(base.test_prediction).max())
    np.testing.assert_allclose(big.cv_error, base.cv_error * units**2, rtol=1e-4)


def test_unit_scale_is_exact_and_leaves_unit_variance_responses_alone():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((100, 4))
    Y[:, 2] *= 3e7
    Y[:, 3] = 5.0  # constant: scale 1
    scaled, scale = unit_scale(Y)
    assert scale[0] == scale[1] == scale[3] == 1.0
    assert scale[2] == 2.0 ** round(np.log2(Y[:, 2].std()))
    np.testing.assert_array_equal(scaled[:, 2] * scale[2], Y[:, 2])  # a power of two: exact
    z = rng.standard_normal((100, 3))
    assert unit_scale(z)[0] is z
