"""The ridge engine against an independent reference: scikit-learn Ridge fit voxel by voxel."""

import contextlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from neurotask.pipeline import ridge
from neurotask.pipeline.ridge import expansion
from neurotask.pipeline.ridge.certified import _MARGIN, _certified_bounds, _fold_expansion, _located_optima
from neurotask.pipeline.ridge.exhaustive import _exact_q
from neurotask.pipeline.ridge.fold_terms import _batch_terms, _fit_inputs, _fold_terms, _on_device

# CUDA variants run where a GPU is (scripts/gpu_check runs them on the lent GPU machine).
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


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


class _Recorder:
    """An observer (ridge.Observer) that keeps each phase's flops and the scalars."""

    def __init__(self):
        self.flops, self.scalars = {}, {}

    @contextlib.contextmanager
    def phase(self, name, flops):
        yield
        self.flops[name] = self.flops.get(name, 0.0) + flops

    def count(self, name, value):
        self.scalars[name] = self.scalars.get(name, 0) + value

    def maximum(self, name, value):
        self.scalars[name] = max(self.scalars.get(name, 0), value)


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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- certified search,
# float32 accuracy, backends


def _realistic(n=600, p=120, v=300, seed=0, noise_fraction=0.4, log_snr=(-1.5, 0.5)):
    """Features with a power-law spectrum (eigenvalues over ~4 decades) and positive means;
    voxels with planted signal of log-uniform SNR (10^log_snr), pure-noise voxels and raw-BOLD
    means."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((p, p)))
    X = (rng.standard_normal((n, p)) / np.arange(1, p + 1)) @ rot.T
    X = 3.0 * X + 2.0 * rng.random(p)
    Xc = X - X.mean(0)
    sig = Xc @ (rot @ (rng.standard_normal((p, v)) / np.sqrt(np.arange(1, p + 1))[:, None]))
    sig /= sig.std(0)
    snr = 10 ** rng.uniform(*log_snr, v)
    snr[rng.random(v) < noise_fraction] = 0.0
    Y = sig * np.sqrt(snr) + rng.normal(size=(n, v)) + rng.normal(100, 20, v)
    return X.astype(np.float32), Y.astype(np.float32)


def _tie_scale(X, splits, Y, alphas):
    """Per (alpha, voxel) the certified search's round-off scale (2 Σ|c terms| + q) / n, mean over
    folds, in float64 - the unit of the margin within which two alphas count as tied."""
    dec = ridge.prepare(X, splits, cross_products=False)
    total = 0.0
    for b in dec.folds:
        Yf = Y[b.fit_rows].astype(np.float64)
        m = Yf.mean(0)
        P = b.proj_fit.astype(np.float64)
        E = b.proj_eval.astype(np.float64)
        Z = P @ (Yf - m)
        C = E.T @ (Y[b.eval_rows] - m)
        W = 1.0 / (b.eigvals[None, :] + alphas[:, None])
        q = np.stack([np.sum((E @ (Z * w[:, None])) ** 2, 0) for w in W])
        total = total + (2 * W @ np.abs(C * Z) + q) / b.eval_rows.size
    return total / len(dec.folds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certified_search_equals_exhaustive(seed):
    X, Y = _realistic(seed=seed)
    alphas = ridge.paper_alphas(X.shape[1])  # the paper's 100 alphas
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=seed)
    dec = ridge.prepare(X, splits)
    seen = _Recorder()
    cert = ridge.ridge_cv(dec, Y, alphas, search="certified", observer=seen, voxel_batch=128)
    full = ridge.ridge_cv(dec, Y, alphas, search="exhaustive", voxel_batch=128)
    assert 0 < seen.scalars["rank"] <= 50  # the expansion really replaced most of the 100 products
    differ = np.flatnonzero(cert.alpha_index != full.alpha_index)
    # Identical alphas except near-ties within the stated round-off margin.
    assert differ.size <= 0.001 * Y.shape[1] + 1
    if differ.size:
        scale = _tie_scale(X, splits, Y, alphas)
        e = full.cv_error
        for j in differ:
            gap = abs(e[cert.alpha_index[j], j] - e[full.alpha_index[j], j])
            assert gap <= _MARGIN[np.dtype(np.float32)] * 2 * scale[full.alpha_index[j], j]
    np.testing.assert_allclose(cert.test_prediction[:, cert.alpha_index == full.alpha_index],
                               full.test_prediction[:, cert.alpha_index == full.alpha_index], rtol=0, atol=0)
    # cv_error: exact at the chosen alpha's near-ties, an estimate within the bound elsewhere:
    # tight from the smallest chosen alpha up, looser towards least squares (the profile).
    strong = alphas >= alphas[full.alpha_index].min()
    np.testing.assert_allclose(cert.cv_error[strong], full.cv_error[strong], rtol=2e-3)
    np.testing.assert_allclose(cert.cv_error, full.cv_error, rtol=5e-2)


@pytest.mark.slow
def test_certified_search_equals_exhaustive_on_strong_signals():
    # SNR 100 to 10^4: optima at weak regularisation, where the tolerance profile must tighten
    # (a batch's profile follows its located optima); mixed batches, one all-signal batch.
    X, Y = _realistic(v=400, seed=3, noise_fraction=0.1, log_snr=(2.0, 4.0))
    alphas = ridge.paper_alphas(X.shape[1])
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=3)
    dec = ridge.prepare(X, splits)
    full = ridge.ridge_cv(dec, Y, alphas, search="exhaustive")
    assert np.median(full.alpha_index[full.alpha_index < alphas.size - 1]) < 48  # weakly regularised (50-85 above)
    cert = ridge.ridge_cv(dec, Y, alphas, voxel_batch=100)
    # Strong signals make float32 ties common (the error is a small difference of large terms:
    # the exhaustive float32 search itself agrees with float64 on 98.75% of these voxels); every
    # difference must be such a tie.
    differ = np.flatnonzero(cert.alpha_index != full.alpha_index)
    assert differ.size <= 0.02 * Y.shape[1]
    scale = _tie_scale(X, splits, Y, alphas)
    for j in differ:
        gap = abs(full.cv_error[cert.alpha_index[j], j] - full.cv_error[full.alpha_index[j], j])
        assert gap <= _MARGIN[np.dtype(np.float32)] * 2 * scale[full.alpha_index[j], j]
    same = cert.alpha_index == full.alpha_index
    # Same alpha, same refit; only float32 round-off differs: OpenBLAS's sgemm kernels (chosen per
    # CPU at run time) may block a 100-voxel batch's products differently from a 1000-voxel one's.
    scale_pred = np.abs(full.test_prediction).max()
    np.testing.assert_allclose(cert.test_prediction[:, same], full.test_prediction[:, same], rtol=0,
                               atol=1e-4 * scale_pred)


def test_located_optima_are_near_the_exact_ones():
    X, Y = _realistic(v=300, seed=7)
    alphas = ridge.paper_alphas(X.shape[1])
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=0)
    dec = ridge.prepare(X, splits)
    bk = ridge.get_backend("numpy")
    batch, _ = _batch_terms(bk, _on_device(bk, dec), Y.astype(np.float64), alphas, ridge.NULL_OBSERVER)
    located = _located_optima(batch)
    exact = ridge.cv_errors(dec, Y, alphas).argmin(0)
    assert np.mean(np.abs(located - exact) <= 2) >= 0.95


def _plan(s, alphas, plan):
    """A planned expansion for a tolerance, or one group of rank r for "rank r"."""
    if isinstance(plan, str):
        return (expansion.GroupPlan(0, s.size, int(plan.split()[1])),)
    return expansion.plan_groups(s, alphas, plan)


@pytest.mark.slow
def test_certified_bounds_enclose_the_exact_errors():
    X, Y = _realistic(v=200, seed=4)
    alphas = ridge.paper_alphas(X.shape[1])
    splits = ridge.make_splits(X.shape[0], n_folds=5, seed=0)
    dec = ridge.prepare(X, splits)
    ref = ridge.prepare(X, splits, dtype=np.float64)
    bk = ridge.get_backend("numpy")
    Y64 = Y.astype(np.float64)
    exact = [_fold_cv_errors(bk, ref, Y64, alphas, f) for f in range(len(splits.folds))]
    dd = _on_device(bk, dec)
    bases = dd.folds + (dd.final,)
    inputs = _fit_inputs(bk, dd, Y64)
    # Crude and good expansions, one group or planned groups: the bound must hold for all.
    for plan in ("rank 4", "rank 12", 3e-2, 4e-4, "profile"):
        for db, inp, e in zip(bases, inputs, exact):
            t = _fold_terms(bk, db, Y64, alphas, inp)
            if plan == "profile":  # per-alpha tolerances, loose towards least squares
                tol = expansion.tolerance_profile(db.s_np, alphas, 1e-3, tight_df=0.05 * db.n_fit)
                ex = expansion.expand(db.s_np, alphas, expansion.plan_groups(db.s_np, alphas, tol), tol)
            else:
                ex = expansion.expand(db.s_np, alphas, _plan(db.s_np, alphas, plan))
            fx = _fold_expansion(bk, db, ex)
            est, low, high = _certified_bounds(bk, db, t, alphas, fx)
            assert np.all(low <= e) and np.all(e <= high)
            assert np.all(low <= est) and np.all(est <= high)
            # the same products into a larger buffer, as the search reuses one
            work = np.empty(Y.shape[1] * ex.rank * db.n_eval + 7, np.float32)
            again = _certified_bounds(bk, db, t, alphas, fx, work)
            for x, y in zip(again, (est, low, high)):
                np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_product_and_direct_forms_agree(dtype):
    # Two routes to the same eigen-coefficients: the folds' shared cross-products (chosen when
    # features are fewer than fit rows) and the direct projection of each fold's responses.
    X, Y = _realistic(v=200, seed=9)
    alphas = ridge.paper_alphas(X.shape[1])
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=1)
    cross = ridge.prepare(X, splits, dtype=dtype)
    direct = ridge.prepare(X, splits, dtype=dtype, cross_products=False)
    assert cross.centred is not None and cross.folds[0].rotation is not None and cross.folds[0].proj_fit is None
    assert direct.centred is None and direct.folds[0].proj_fit is not None and direct.folds[0].rotation is None
    a, b = ridge.ridge_cv(cross, Y, alphas), ridge.ridge_cv(direct, Y, alphas)
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(a.cv_error, b.cv_error, rtol=tol)
    assert np.mean(a.alpha_index == b.alpha_index) >= 0.99  # float32 near-ties may differ
    same = a.alpha_index == b.alpha_index
    np.testing.assert_allclose(a.test_prediction[:, same], b.test_prediction[:, same], rtol=tol, atol=tol * 100)
    # Features outnumbering fit rows (the kernel path) keep the direct form by default, and
    # the forced cross-product form gives the same results there too.
    Xw, Yw = _realistic(n=200, p=240, v=80, seed=10)
    sw = ridge.make_splits(Xw.shape[0], n_folds=4, seed=1)
    assert ridge.prepare(Xw, sw, dtype=dtype).centred is None
    forced = ridge.ridge_cv(ridge.prepare(Xw, sw, dtype=dtype, cross_products=True), Yw, alphas)
    plain = ridge.ridge_cv(ridge.prepare(Xw, sw, dtype=dtype), Yw, alphas)
    np.testing.assert_allclose(forced.cv_error, plain.cv_error, rtol=tol * 10)
    assert np.mean(forced.alpha_index == plain.alpha_index) >= 0.97
    # The cross-product form needs folds that partition the training part.
    single = ridge.make_splits(X.shape[0], cv="single_split", seed=1)
    assert ridge.prepare(X, single).centred is None
    with pytest.raises(ValueError, match="partition"):
        ridge.prepare(X, single, cross_products=True)


def _fold_cv_errors(bk, dec, Y, alphas, f):
    """Exact validation MSE of fold f for every alpha: (a, v)."""
    dd = _on_device(bk, dec)
    t = _fold_terms(bk, dd.folds[f], Y, alphas, _fit_inputs(bk, dd, Y)[f])
    return (t.rr[None, :] - 2.0 * t.cross + _exact_q(bk, dd.folds[f], t.Z, alphas, 10)) / dd.folds[f].n_eval


def test_float32_selects_the_float64_alphas_on_flat_noise_curves():
    # Pure-noise voxels with raw-BOLD means have nearly flat CV curves: residual-based float32
    # scoring got 20% of them wrong at BOLD5000 shape; the cross-term form must not.
    X, Y = _realistic(v=400, seed=5, noise_fraction=0.8)
    alphas = ridge.paper_alphas(X.shape[1])
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=0)
    e64 = ridge.cv_errors(ridge.prepare(X, splits, dtype=np.float64), Y, alphas)
    e32 = ridge.cv_errors(ridge.prepare(X, splits, dtype=np.float32), Y, alphas)
    assert np.mean(e32.argmin(0) == e64.argmin(0)) >= 0.995
    np.testing.assert_allclose(e32, e64, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("search", ["certified", "exhaustive"])
def test_torch_backend_matches_numpy(search, device):
    X, Y = _realistic(v=150, seed=6)
    alphas = ridge.paper_alphas(X.shape[1], 60)
    splits = ridge.make_splits(X.shape[0], n_folds=4, seed=0)
    dec = ridge.prepare(X, splits)
    # Same batches: the certified search's profile, hence its estimates away from the optima,
    # follows each batch's located optima.
    a = ridge.ridge_cv(dec, Y, alphas, search=search, backend="numpy", voxel_batch=64)
    b = ridge.ridge_cv(dec, Y, alphas, search=search, backend="torch", device=device, voxel_batch=64)
    assert np.mean(a.alpha_index == b.alpha_index) >= 0.99  # different BLAS: near-ties may differ
    same = a.alpha_index == b.alpha_index
    np.testing.assert_allclose(b.test_prediction[:, same], a.test_prediction[:, same], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b.cv_error, a.cv_error, rtol=1e-4)
    assert b.test_prediction.dtype == np.float64 and isinstance(b.alpha, np.ndarray)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("n_fit_below_p", [False, True])
def test_torch_decomposition_matches_scipy(device, n_fit_below_p):
    # Gram (n_fit >= p) and kernel (n_fit < p) paths; eigenvector signs may differ, the
    # engine's results may not.
    X, Y = _realistic(n=200, p=240, v=120, seed=8) if n_fit_below_p else _realistic(v=120, seed=8)
    alphas = ridge.paper_alphas(X.shape[1], 40)
    splits = ridge.make_splits(X.shape[0], n_folds=4, seed=0)
    a = ridge.prepare(X, splits)
    b = ridge.prepare(X, splits, backend="torch", device=device)
    for ba, bb in zip(a.folds + (a.final,), b.folds + (b.final,)):
        np.testing.assert_allclose(bb.eigvals, ba.eigvals, rtol=1e-9, atol=1e-9 * ba.eigvals.max())
        assert bb.whitened_norm == pytest.approx(ba.whitened_norm, rel=1e-9)
        for name in ("proj_fit", "rotation", "proj_eval"):  # the same form, float32 either way
            x, y = getattr(ba, name), getattr(bb, name)
            assert (x is None) == (y is None)
            assert x is None or (y.dtype == np.float32 and y.shape == x.shape)
        assert ba.fit_shift is None or np.allclose(bb.fit_shift, ba.fit_shift, rtol=1e-9, atol=1e-12)
    ra = ridge.ridge_cv(a, Y, alphas)
    rb = ridge.ridge_cv(b, Y, alphas)
    assert np.mean(ra.alpha_index == rb.alpha_index) >= 0.99  # float32 projections: near-ties may differ
    same = ra.alpha_index == rb.alpha_index
    np.testing.assert_allclose(rb.test_prediction[:, same], ra.test_prediction[:, same], rtol=1e-5, atol=1e-4)


def test_rank_choice_and_fallback():
    X, Y = _realistic(v=60, seed=7)
    splits = ridge.make_splits(X.shape[0], n_folds=3, seed=0)
    dec = ridge.prepare(X, splits)
    full = ridge.ridge_cv(dec, Y, ridge.paper_alphas(X.shape[1]), search="exhaustive")
    for rank in (1, 3, 30):  # any rank is exact; a low one only leaves more near-ties to check
        seen = _Recorder()
        res = ridge.ridge_cv(dec, Y, ridge.paper_alphas(X.shape[1]), rank=rank, observer=seen)
        np.testing.assert_array_equal(res.alpha_index, full.alpha_index)
        assert seen.scalars["rank"] == rank and seen.flops["lowrank"] > 0
    for tol in (1e-1, 1e-2, 1e-5):  # any tolerance too
        seen = _Recorder()
        res = ridge.ridge_cv(dec, Y, ridge.paper_alphas(X.shape[1]), tolerance=tol, observer=seen)
        np.testing.assert_array_equal(res.alpha_index, full.alpha_index)
        assert seen.scalars["groups"] >= 1 and seen.flops["lowrank"] > 0
    # An expansion costlier than half the exhaustive sweep is not used: every alpha is evaluated.
    few = ridge.paper_alphas(X.shape[1], 8)
    seen = _Recorder()
    res = ridge.ridge_cv(dec, Y, few, observer=seen, tolerance=1e-12)
    assert "sweep" in seen.flops and "lowrank" not in seen.flops
    np.testing.assert_array_equal(res.alpha_index, ridge.ridge_cv(dec, Y, few, search="exhaustive").alpha_index)
    with pytest.raises(ValueError, match="tolerance"):
        ridge.ridge_cv(dec, Y, few, tolerance=0.0)


def test_decomposition_is_picklable_and_compact():
    import pickle

    X, _ = _realistic(v=1)
    splits = ridge.make_splits(X.shape[0], n_folds=7, seed=0)
    dec = ridge.prepare(X, splits)
    back = pickle.loads(pickle.dumps(dec))
    assert back.n_samples == X.shape[0] and back.final.whitened_norm == dec.final.whitened_norm
    k, p = dec.final.eigvals.size, X.shape[1]
    assert dec.nbytes <= 8 * 4 * k * (X.shape[0] + p) + 8 * 8 * k  # float32 projections + eigvals


def test_backend_and_search_errors():
    X, Y = _data()
    splits = ridge.make_splits(180)
    dec = ridge.prepare(X, splits)
    alphas = ridge.paper_alphas(25, 10)
    with pytest.raises(ValueError, match="backend must be one of"):
        ridge.ridge_cv(dec, Y, alphas, backend="jax")
    with pytest.raises(ValueError, match="CPU only"):
        ridge.ridge_cv(dec, Y, alphas, backend="numpy", device="cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ridge.ridge_cv(dec, Y, alphas, backend="torch", device="cuda")
    with pytest.raises(ValueError, match="search must be one of"):
        ridge.ridge_cv(dec, Y, alphas, search="golden")
    with pytest.raises(ValueError, match="rows"):
        ridge.ridge_cv(dec, Y[:-1], alphas)
    Yn = Y.copy()
    Yn[5, 7] = np.nan
    with pytest.raises(ValueError, match=r"columns \[7\]"):
        ridge.ridge_cv(dec, Yn, alphas)
    with pytest.raises(ValueError, match="dtype"):
        ridge.prepare(X, splits, dtype=np.float16)
