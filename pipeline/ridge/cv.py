"""Voxelwise ridge regression with a per-voxel alpha chosen by cross-validation.

Pure array code (no I/O, no Dask), after himalaya's solvers: every function documents its
arrays' shapes, voxels (targets) are processed in batches to bound memory, and one switch
(:mod:`pipeline.ridge.backend`) runs the same code on numpy or on torch (CPU or CUDA).

Notation: ``n`` samples (images), ``p`` features, ``v`` voxels, ``k`` retained eigen-directions
of a fold's training features, ``a`` alphas, ``r_g``/``R`` ranks of the certified search's expansion.

The protocol is the paper's: a seeded held-out test set; on the training part, each voxel's
alpha is chosen on a log grid by K-fold cross-validation scoring mean squared error (the mean
over folds of each fold's MSE, as scikit-learn's ``cross_val_score``); then a refit on the whole
training part with each voxel's alpha predicts the test set. Every model has an intercept.
Ties go to the smallest alpha.

Shared decompositions. For a training matrix with centred columns ``Xc = U S Vᵀ`` (eigenvalues
``s = S²``), the ridge prediction of evaluation rows ``E = (X_eval - mean) V`` is
``P(alpha) = E diag(1 / (s + alpha)) Z`` with ``Z = (Xc V)ᵀ y``. The decomposition depends on the
features only: it is computed once per (feature space, split), in float64 (float32
eigendecompositions of XᵀX are unreliable on ill-conditioned features), and shared by every
voxel. The large products run in ``dtype`` (float32 by default).

Cross-products. ``Z = Vᵀ (Xcᵀ y)``: with K folds whose validation sets partition the training
part, the folds' validation cross-products ``X_valᵀ y`` (n_val p each) add up to the training
ones, every fold's ``Xc_fitᵀ y`` is the total minus its own, and ``Z`` costs p² per fold instead of
p n_fit (see :func:`_fold_order`; the direct form ``(Xc V)ᵀ y`` is kept where it is cheaper).

Validation error without forming residuals. With centred validation targets ``R``,
``||R - P||² = ||R||² - 2 c(alpha) + ||P||²`` where ``c(alpha) = Σ_k (EᵀR)_k Z_k / (s_k + alpha)``
costs one small product for all alphas at once (float64). Only ``q(alpha) = ||P(alpha)||²``
needs a large product per alpha. Besides halving the work of a residual, this is far more
accurate in float32: round-off scales with ``c`` and ``q`` instead of with ``||R||²``, which
matters on the flat CV curves of noise voxels (measured: float32 picks the float64 alpha for
100% of voxels this way, 80% with float32 residuals).

Certified search (``search="certified"``, the default). The filter factors
``F[alpha, k] = s_k / (s_k + alpha)`` form an (a, k) matrix of low numerical rank, and its
columns for directions of similar eigenvalue are lower still. The directions are cut into
contiguous groups g, each with a truncated SVD ``F[:, g] ≈ A_g B_g`` of its own rank r_g (groups
and ranks planned to minimise the products for a given accuracy). Then
``P(alpha) ≈ Σ_j A[alpha, j] Q_j`` where the R = Σ r_g products ``Q_j = E_g diag(B_j / s_g) Z_g``
(each over its group's k_g columns only) replace a full products, and every alpha's ``q``
follows from the R x R Gram matrix of the ``Q_j``. The truncation error is bounded rigorously:
``||P - P̂|| <= τ ||(F - Σ_g A_g B_g)[alpha] ∘ Z / √s||`` with ``τ = ||E diag(s^-1/2)||₂`` (computed
once per fold), which gives every alpha's CV error an interval. An alpha whose lower bound
exceeds the smallest upper bound cannot be the minimum; the few remaining candidates of a voxel
(the minimum and its near-ties) are evaluated exactly, as the exhaustive search would.

The accuracy an alpha needs depends on how close its CV error comes to the voxel's minimum.
Alphas near least squares fit noise: their errors are far above the minimum, yet their filter
factors are the costly ones to expand. So each batch first locates its voxels' optima cheaply
(:func:`_located_optima`, a diagonal approximation of q), and the expansion's tolerance is
tight (``_EXPANSION_TOL``) down to a margin beyond the weakest-regularised located optimum and
loosens towards least squares (:func:`pipeline.ridge.expansion.tolerance_profile`). The profile only
moves work between the expansion and the exact checks: the bound is the expansion's own.

The result equals the exhaustive search's except where two alphas' CV errors differ by less than
the round-off margin ``_MARGIN[dtype] * (2 Σ|c terms| + q) / n`` (a tie at working precision,
which the exhaustive search also decides by round-off).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from neurotask.pipeline.ridge.backend import Backend, get_backend
from neurotask.pipeline.ridge.expansion import Expansion, degrees_of_freedom, expand, plan_groups, tolerance_profile

# Eigen-directions whose eigenvalue is below this fraction of the largest are round-off:
# they carry no signal and would only amplify noise at tiny alphas.
_EIG_RTOL_FACTOR = 10.0

# Relative round-off margin of a computed CV error (times 2|c| + q): float32 errors measured
# against float64 stay below 1.1e-6 of the error itself; 2e-5 leaves a factor >= 10.
_MARGIN = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}

# Certified search: the filter-factor expansion is planned for a row residual of at most this
# fraction of each alpha's largest filter factor (measured cost optimum, see
# docs/performance.md; :mod:`pipeline.ridge.expansion`). The search evaluates every alpha instead when
# the expansion's products would exceed _LOWRANK_MAX_FRACTION of the exhaustive sweep's.
_EXPANSION_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}
_LOWRANK_MAX_FRACTION = 0.5
# The tolerance is tight down to the alphas of this many times the degrees of freedom of the
# batch's smallest located optimum (see _located_optima; 1.5 is ~2 steps of the paper's grid).
_LOCATE_DF_MARGIN = 1.5

SEARCHES = ("certified", "exhaustive")


def paper_alphas(n_features: int, n_alphas: int = 100) -> np.ndarray:
    """The paper's grid: ``logspace(-8, 0.5 * log10(p) + 8, n_alphas)``. -> (a,)"""
    if n_features < 1 or n_alphas < 1:
        raise ValueError(f"need n_features >= 1 and n_alphas >= 1, got {n_features}, {n_alphas}")
    return np.logspace(-8.0, 0.5 * np.log10(n_features) + 8.0, n_alphas)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Row indices of a study's split into training/test and of the CV folds.

    ``train`` (n_train,) and ``test`` (n_test,) index the rows of the full (n, ...) arrays;
    ``folds`` is a tuple of (fit rows, validation rows) pairs, also indexing the full arrays,
    and always subsets of ``train``.
    """

    train: np.ndarray
    test: np.ndarray
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]


def make_splits(
    n_samples: int,
    *,
    test_fraction: float = 0.15,
    cv: str = "kfold",
    n_folds: int = 7,
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
    """Seeded random test set, then K folds (``cv='kfold'``) or one validation split
    (``cv='single_split'``, the authors' released code) of the training part.

    The same ``(n_samples, seed, ...)`` always gives the same indices.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_samples)
    n_test = int(round(test_fraction * n_samples))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    shuffled = train[rng.permutation(train.size)]
    if cv == "kfold":
        if not 2 <= n_folds <= train.size:
            raise ValueError(f"n_folds must be in [2, {train.size}], got {n_folds}")
        parts = np.array_split(shuffled, n_folds)
        folds = tuple(
            (np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), np.sort(parts[i]))
            for i in range(n_folds)
        )
    elif cv == "single_split":
        n_val = int(round(validation_fraction * train.size))
        if not 0 < n_val < train.size:
            raise ValueError(f"validation_fraction {validation_fraction} leaves an empty split")
        folds = ((np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])),)
    else:
        raise ValueError(f"cv must be 'kfold' or 'single_split', got {cv!r}")
    return Splits(train=train, test=test, folds=folds)


# --------------------------------------------------------------------------- decomposition


@dataclass(frozen=True)
class Basis:
    """One training set's features in their own eigenbasis, and some evaluation rows.

    fit_rows (n_fit,), eval_rows (n_eval,): row indices into the full arrays.
    eigvals (k,) float64: squared singular values of the centred training features.
    Responses reach the eigenbasis, ``Z = (Xc V)ᵀ (y - mean)``, in one of two forms:
    - direct: proj_fit (k, n_fit) ``(Xc V)ᵀ``, applied to the fit rows' responses;
    - cross-product: rotation (p, k) ``V``, applied to ``Xcᵀ (y - mean)``, which the
      Decomposition's shared cross-products give for every fold at once; fit_shift (p,) float64:
      the mean over the fit rows of the train-centred features (for that centring).
    The other form's arrays are None.
    proj_eval (n_eval, k): ``(X_eval - mean) V``, maps eigen-coefficients to predictions.
    whitened_norm: ``||proj_eval diag(eigvals^-1/2)||₂`` (float64), the constant of the
    certified search's error bound.
    """

    fit_rows: np.ndarray
    eval_rows: np.ndarray
    eigvals: np.ndarray
    proj_fit: np.ndarray | None
    rotation: np.ndarray | None
    fit_shift: np.ndarray | None
    proj_eval: np.ndarray
    whitened_norm: float

    @property
    def nbytes(self) -> int:
        arrays = (self.proj_fit, self.rotation, self.fit_shift, self.proj_eval, self.eigvals)
        return sum(a.nbytes for a in arrays if a is not None)


def _decompose(bk: Backend, Xd, fit_rows: np.ndarray, eval_rows: np.ndarray, dtype, train_mean=None,
               gram=None) -> Basis:
    """Eigen-decompose the centred features of ``fit_rows`` in float64 on the backend's device.

    Xd (n, p) float64 backend array. Uses the p x p Gram matrix when n_fit >= p, else the
    n_fit x n_fit kernel. ``train_mean`` (p,) float64 (device): the cross-product form, with
    fit_shift relative to this mean; None: the direct form. ``gram``: (the fit rows' mean (p,),
    their centred Gram matrix (p, p)) float64 on the device, when the caller has them (see
    :func:`_fold_grams`), else None. Eigenvector signs differ between LAPACK and cuSOLVER; every
    result of the engine is invariant to them. The Basis holds numpy arrays.
    """
    cross = train_mean is not None
    n_fit, p = int(np.asarray(fit_rows).size), int(Xd.shape[1])
    eps = np.finfo(np.float64).eps
    proj_fit = None
    if gram is not None and n_fit >= p:
        mean, G = gram
        Xf = None if cross else Xd[bk.index(fit_rows)] - mean  # only the direct form reads the rows
    else:
        Xf = Xd[bk.index(fit_rows)]
        mean = bk.mean(Xf, 0)
        Xf = Xf - mean
        G = Xf.T @ Xf if n_fit >= p else None
    if n_fit >= p:
        s, V = bk.eigh(G)
        del G
        keep = s > s[-1] * _EIG_RTOL_FACTOR * p * eps
        s, V = s[keep], V[:, keep]
        if not cross:  # the cross-product form never needs the fit rows' projection
            proj_fit = (Xf @ V).T
    else:
        s, U = bk.eigh(Xf @ Xf.T)
        keep = s > s[-1] * _EIG_RTOL_FACTOR * n_fit * eps
        s, U = s[keep], U[:, keep]
        V = (Xf.T @ U) / bk.sqrt(s)  # right singular vectors, (p, k)
        proj_fit = U.T * bk.sqrt(s)[:, None]  # (Xc V)ᵀ = S Uᵀ
    del Xf
    proj_eval = (Xd[bk.index(eval_rows)] - mean) @ V
    whitened = proj_eval / bk.sqrt(s)
    small = whitened @ whitened.T if whitened.shape[0] <= whitened.shape[1] else whitened.T @ whitened
    top = float(bk.eigvalsh(small)[-1])

    def out(x):
        return np.ascontiguousarray(bk.to_numpy(x), dtype=dtype)

    return Basis(
        fit_rows=np.asarray(fit_rows),
        eval_rows=np.asarray(eval_rows),
        eigvals=bk.to_numpy(s),
        proj_fit=None if cross else out(proj_fit),
        rotation=out(V) if cross else None,
        fit_shift=np.asarray(bk.to_numpy(mean - train_mean), dtype=np.float64) if cross else None,
        proj_eval=out(proj_eval),
        whitened_norm=float(np.sqrt(max(top, 0.0))),
    )


@dataclass(frozen=True)
class Decomposition:
    """Everything voxel-independent of one (feature space, split): one Basis per CV fold
    (evaluating the validation rows) and one for the whole training part (evaluating test).
    ``n_samples``: the number of rows of the features (and of the responses to come).

    The cross-product form (see Basis and :func:`_fold_order`) adds the training features
    centred on their mean, ``centred`` (n_train, p) dtype, in the row order ``order`` (n_train,)
    (indices into the full arrays): fold after fold, each fold's validation rows contiguous.
    Both are None in the direct form.
    """

    folds: tuple[Basis, ...]
    final: Basis
    n_samples: int
    centred: np.ndarray | None = None
    order: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        shared = 0 if self.centred is None else self.centred.nbytes + self.order.nbytes
        return sum(b.nbytes for b in self.folds) + self.final.nbytes + shared


def _fold_order(splits: Splits, p: int, force: bool = False) -> np.ndarray | None:
    """The training rows fold by fold (each fold's validation rows contiguous) when the
    cross-product form applies and needs fewer flops, else None (the direct form).

    It applies when the validation sets partition the training part and each fold fits on the
    rest (K-fold): the training cross-products are then the sum of the folds'. Per voxel
    (k = p, full rank) it costs ``Σ_f (p n_val + p²) + p²`` flops against the direct form's
    ``Σ_f p n_fit + p n_train``: 30% fewer at BOLD5000's shape (n_train 4179, p 2048, 7 folds),
    more with more folds; fewer features than samples is the condition.
    """
    train = np.sort(np.asarray(splits.train))
    vals = [np.asarray(val) for _, val in splits.folds]
    order = np.concatenate(vals)
    applies = order.size == train.size and np.array_equal(np.sort(order), train)
    applies = applies and all(fit.size + val.size == train.size for (fit, _), val in zip(splits.folds, vals))
    if force and not applies:
        raise ValueError("the cross-product form needs validation sets that partition the training part (K-fold)")
    direct = sum(p * fit.size for fit, _ in splits.folds) + p * train.size
    cross = sum(p * val.size + p * p for val in vals) + p * p
    return order if applies and (force or cross < direct) else None


def _fold_grams(bk: Backend, Xc, train_mean, n_vals: list[int]):
    """Every fold's fit-row mean and centred Gram matrix, then the training part's, from one pass
    over the training rows: yields (mean (p,), G (p, p)) float64 (the folds', then the final's).

    Xc (n_train, p) float64: the training rows centred on ``train_mean``, fold after fold (each
    fold's validation rows contiguous, n_vals[f] of them). With H_f = X̃_valᵀ X̃_val and H = Σ_f H_f
    (the training Gram matrix), fold f fits on the rest: G_f = H - H_f - n_fit d dᵀ with d its
    fit rows' mean of X̃. That is n_train p² multiply-adds in all, against (K n_fit + n_train) p²
    for a product per basis: 3.5x fewer at 7 folds. The subtraction is exact to float64 round-off
    of H (~1e-16 of its norm), far below the eigenvalues the bases keep (>= 1e-12 of the largest).
    The H_f are held until their fold's turn (K p² floats).
    """
    parts, start = [], 0
    for n_val in n_vals:
        block = Xc[start : start + n_val]
        parts.append((block.T @ block, bk.sum(block, 0)))
        start += n_val
    H = sum((h for h, _ in parts[1:]), parts[0][0])  # a new array: the H_f stay as they are
    total = sum((t for _, t in parts[1:]), parts[0][1])
    n_train = Xc.shape[0]
    for f, n_val in enumerate(n_vals):
        h, t = parts[f]
        parts[f] = None  # free each fold's H_f once used
        n_fit = n_train - n_val
        d = (total - t) / n_fit
        G = H - h
        del h
        G -= n_fit * (d[:, None] * d[None, :])
        yield train_mean + d, G
    d = total / n_train
    H -= n_train * (d[:, None] * d[None, :])
    yield train_mean + d, H


def prepare(X: np.ndarray, splits: Splits, dtype=np.float32, backend: str = "numpy",
            device: str | None = None, cross_products: bool | None = None) -> Decomposition:
    """Decompose every fold and the full training part. X (n, p) -> Decomposition.

    ``cross_products``: the form in which responses reach each eigenbasis (see Basis); None
    picks the one with fewer flops (:func:`_fold_order`), False forces the direct form, True
    the cross-product form (an error where it does not apply).

    ``backend``/``device`` as for :func:`ridge_cv`: with torch on CUDA the float64 Gram
    matrices and eigendecompositions run on the GPU (on a GPU node they would otherwise be
    most of a (subject, task)'s time). The result is numpy arrays either way.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (n, p), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinite values")
    if np.dtype(dtype) not in _MARGIN:
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    bk = get_backend(backend, device)
    Xd = bk.asarray(X, bk.float64)
    order = None if cross_products is False else _fold_order(splits, X.shape[1], force=bool(cross_products))
    if order is None:
        folds = tuple(_decompose(bk, Xd, fit, val, dtype) for fit, val in splits.folds)
        final = _decompose(bk, Xd, splits.train, splits.test, dtype)
        return Decomposition(folds=folds, final=final, n_samples=X.shape[0])
    train_mean = bk.mean(Xd[bk.index(splits.train)], 0)
    Xc = Xd[bk.index(order)] - train_mean  # (n_train, p): the folds' validation rows contiguous
    # With more training rows than features, the Gram matrices come from one pass (_fold_grams);
    # the kernel path (fewer fit rows than features) decomposes each fold's rows itself.
    n_vals = [val.size for _, val in splits.folds]
    grams = _fold_grams(bk, Xc, train_mean, n_vals) if Xc.shape[0] - max(n_vals) >= Xc.shape[1] else None
    bases = [_decompose(bk, Xd, fit, val, dtype, train_mean, None if grams is None else next(grams))
             for fit, val in list(splits.folds) + [(splits.train, splits.test)]]
    folds, final = tuple(bases[:-1]), bases[-1]
    centred = np.ascontiguousarray(bk.to_numpy(Xc), dtype=dtype)
    return Decomposition(folds=folds, final=final, n_samples=X.shape[0], centred=centred, order=order)


# --------------------------------------------------------------------------- per-fold terms


@dataclass(frozen=True)
class _DeviceBasis:
    """A Basis as backend arrays; eigvals both on the device and in numpy (float64)."""

    fit_rows: object
    eval_rows: object
    s: object  # (k,) float64
    s_np: np.ndarray
    proj_fit: object | None  # (k, n_fit) dtype, direct form
    rotation: object | None  # (p, k) dtype, cross-product form
    fit_shift: object | None  # (p,) float64, cross-product form
    proj_eval: object  # (n_eval, k) dtype
    n_fit: int
    n_eval: int
    tau: float
    dtype: np.dtype  # numpy dtype of the products


def _on_device(bk: Backend, basis: Basis) -> _DeviceBasis:
    def put(x, dtype=None):
        return None if x is None else bk.asarray(x, dtype)

    return _DeviceBasis(
        fit_rows=bk.index(basis.fit_rows),
        eval_rows=bk.index(basis.eval_rows),
        s=bk.asarray(basis.eigvals, bk.float64),
        s_np=np.asarray(basis.eigvals, dtype=np.float64),
        proj_fit=put(basis.proj_fit),
        rotation=put(basis.rotation),
        fit_shift=put(basis.fit_shift, bk.float64),
        proj_eval=bk.asarray(basis.proj_eval),
        n_fit=int(basis.fit_rows.size),
        n_eval=int(basis.eval_rows.size),
        # the bound uses the float32-rounded matrices: pad the float64 norm against that
        tau=float(basis.whitened_norm) * (1.0 + 1e-5),
        dtype=np.dtype(basis.proj_eval.dtype),
    )


@dataclass(frozen=True)
class _FitInput:
    """What one basis needs from a batch of v responses in the cross-product form:
    g (p, v) dtype ``Xc_fitᵀ (y_fit - ȳ_fit)``, mean (v,) float64 ``ȳ_fit``."""

    g: object
    mean: object


def _fit_inputs(bk: Backend, dec: Decomposition, centred, bases: list[_DeviceBasis], Y) -> list[_FitInput | None]:
    """Cross-products of every basis (the folds, then the final) for a batch of responses.

    Y (n, v) float64 on the device; centred (n_train, p) dtype on the device (the
    decomposition's). With responses centred on the training mean (in float64, before
    rounding: raw BOLD means ~1e3 would swamp float32 sums) and the folds' validation rows
    contiguous, ``S_f = X̃_valᵀ Ỹ_val`` costs n_val p per fold, the training total is
    ``S = Σ_f S_f``, and a fold's ``g = S - S_f - n_fit μx μyᵀ`` with μ the fit rows' means of
    the centred features (fit_shift) and responses. Direct form: Nones.
    """
    if dec.centred is None:
        return [None] * len(bases)
    dtype = bases[0].dtype
    Yo = Y[bk.index(dec.order)]
    n_train = Yo.shape[0]
    ybar = bk.mean(Yo, 0)
    Yo = Yo - ybar
    total = bk.sum(Yo, 0)  # ~0: kept for exactness
    Yt = bk.astype(Yo, dtype)
    parts, S, start = [], None, 0
    for db in bases[:-1]:
        stop = start + db.n_eval
        Sw = centred[start:stop].T @ Yt[start:stop]
        parts.append((Sw, bk.sum(Yo[start:stop], 0)))
        S = Sw if S is None else S + Sw
        start = stop
    del Yo, Yt
    out = []
    for db, (Sw, wsum) in zip(bases[:-1], parts):
        shift = (total - wsum) / db.n_fit  # mean over the fit rows of the centred responses
        g = S - Sw
        # the rank-one correction is small (centred means): float32 is enough for it
        g -= bk.astype(db.n_fit * db.fit_shift, dtype)[:, None] * bk.astype(shift, dtype)[None, :]
        out.append(_FitInput(g=g, mean=ybar + shift))
    final = bases[-1]
    shift = total / n_train
    S -= bk.astype(n_train * final.fit_shift, dtype)[:, None] * bk.astype(shift, dtype)[None, :]
    out.append(_FitInput(g=S, mean=ybar + shift))
    return out


def _to_eigenbasis(bk: Backend, db: _DeviceBasis, Y, inp: _FitInput | None):
    """-> (Z (k, v) dtype, fit mean (v,) float64) of a batch of responses Y (n, v) float64."""
    if inp is not None:
        return db.rotation.T @ inp.g, inp.mean
    Yf = Y[db.fit_rows]
    mean = bk.mean(Yf, 0)
    # Centre in float64 before rounding: proj_fit's columns sum to zero only up to float32
    # round-off, which a large response mean (raw BOLD ~ 1e3) would amplify.
    return db.proj_fit @ bk.astype(Yf - mean, db.dtype), mean


def _basis_flops(db: _DeviceBasis) -> int:
    """Multiply-adds per voxel of bringing its responses to the eigenbasis (for the meter)."""
    if db.rotation is not None:
        return int(db.rotation.shape[0] * db.rotation.shape[1])
    return int(db.proj_fit.shape[0] * db.proj_fit.shape[1])


@dataclass
class _FoldTerms:
    """The voxel-dependent, alpha-independent part of one fold for a batch of v voxels.

    Z (k, v) dtype: eigen-coefficients of the centred fit targets; CZ (k, v) dtype:
    ``(EᵀR) ∘ Z``; rr (v,) float64: ``||R||²``; cross (a, v) float64: ``c(alpha)``.
    """

    Z: object
    CZ: object
    rr: object
    cross: object


def _fold_terms(bk: Backend, db: _DeviceBasis, Y, alphas, inp: _FitInput | None = None) -> _FoldTerms:
    """Y (n, v) float64 on the device, alphas (a,) float64 on the device, inp: the fold's
    cross-products (cross-product form) or None (direct form)."""
    Z, mean = _to_eigenbasis(bk, db, Y, inp)
    R = Y[db.eval_rows] - mean
    rr = bk.sum(R * R, 0)
    C = db.proj_eval.T @ bk.astype(R, db.dtype)
    CZ = C * Z
    W = 1.0 / (db.s[None, :] + alphas[:, None])  # (a, k) float64
    return _FoldTerms(Z=Z, CZ=CZ, rr=rr, cross=W @ bk.astype(CZ, bk.float64))


def _sum_sq(bk: Backend, P3):
    """(b, m, v) -> (b, v) float64: sums of squares over axis 1, in float32 blocks of 64 rows
    added in float64 (bounds the summation error by 64 ulps)."""
    b, m, v = P3.shape
    if bk.name != "numpy":
        return bk.astype(bk.sum(P3 * P3, 1), bk.float64)
    full = m - m % 64
    out = np.zeros((b, v))
    if full:
        blocks = P3[:, :full].reshape(b, full // 64, 64, v)
        out += np.einsum("bkij,bkij->bkj", blocks, blocks).sum(axis=1, dtype=np.float64)
    if full < m:
        out += np.einsum("bij,bij->bj", P3[:, full:], P3[:, full:])
    return out


def _exact_q(bk: Backend, db: _DeviceBasis, Z, alphas, alpha_batch: int):
    """q(alpha) = ||E diag(1/(s + alpha)) Z||² for every alpha: (a, v) float64.

    Alphas are stacked ``alpha_batch`` at a time into one (batch * n_eval, k) @ (k, v) product:
    scaling E (n_eval x k) per alpha is cheaper than scaling Z (k x v) for wide voxel batches.
    """
    dtype = db.proj_eval.dtype
    n, k = db.proj_eval.shape
    out = []
    for start in range(0, alphas.shape[0], alpha_batch):
        a_b = alphas[start : start + alpha_batch]
        w = bk.astype(1.0 / (db.s[None, :] + a_b[:, None]), dtype)  # (b, k)
        Eb = (db.proj_eval[None, :, :] * w[:, None, :]).reshape(a_b.shape[0] * n, k)
        P = (Eb @ Z).reshape(a_b.shape[0], n, Z.shape[1])
        out.append(_sum_sq(bk, P))
    return bk.concatenate(out, 0)


# --------------------------------------------------------------------------- exhaustive search


def cv_errors(
    decomposition: Decomposition,
    Y: np.ndarray,
    alphas: np.ndarray,
    alpha_batch: int = 10,
    backend: str = "numpy",
    device: str | None = None,
) -> np.ndarray:
    """Mean over folds of each fold's validation MSE, every alpha evaluated.

    Y (n, v), alphas (a,) -> (a, v) float64.
    """
    bk = get_backend(backend, device)
    Yd = bk.asarray(np.asarray(Y), bk.float64)
    al = bk.asarray(np.asarray(alphas, dtype=np.float64))
    bases = [_on_device(bk, b) for b in decomposition.folds + (decomposition.final,)]
    centred = None if decomposition.centred is None else bk.asarray(decomposition.centred)
    inputs = _fit_inputs(bk, decomposition, centred, bases, Yd)
    total = 0.0
    for db, inp in zip(bases[:-1], inputs):
        t = _fold_terms(bk, db, Yd, al, inp)
        total = total + (t.rr[None, :] - 2.0 * t.cross + _exact_q(bk, db, t.Z, al, alpha_batch)) / db.n_eval
    return bk.to_numpy(total / len(decomposition.folds))


def best_alphas(errors: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the alpha of least CV error (the smallest alpha on exact ties).

    errors (a, v), alphas (a,) -> (alpha (v,), index (v,)).
    """
    index = np.argmin(errors, axis=0)
    return alphas[index], index


# --------------------------------------------------------------------------- certified search


def _scaled_blocks(bk: Backend, db: _DeviceBasis, ex: Expansion) -> tuple:
    """Per group g, ``E_g diag(B_j / s_g)`` for each of its r_g rows j stacked: (r_g n, k_g) dtype.

    Voxel-independent: made once per expansion, they turn a group's Q_j into one product.
    """
    n = db.proj_eval.shape[0]
    out = []
    for (start, stop, _), B in zip(ex.groups, ex.B_over_s):
        B = bk.asarray(B, db.dtype)
        out.append((db.proj_eval[None, :, start:stop] * B[:, None, :]).reshape(B.shape[0] * n, stop - start))
    return tuple(out)


def _certified_bounds(bk: Backend, db: _DeviceBasis, t: _FoldTerms, alphas, ex: Expansion, work=None,
                      blocks: tuple | None = None):
    """One fold's CV-error estimate and certified interval for every alpha: three (a, v) float64.

    The estimate uses q̂ = ||Σ_j A_j Q_j||² (Σ_g r_g k_g columns of products instead of a k);
    the interval adds the truncation bound and the round-off margin. ``work``: a flat buffer of
    at least v r n elements of the products' dtype for the Q_j, or None (allocated here).
    ``blocks``: :func:`_scaled_blocks` of this fold and expansion, or None (made here).
    """
    dtype = db.proj_eval.dtype
    n, k = db.proj_eval.shape
    v = t.Z.shape[1]
    r = ex.rank
    # Q_j = E_g diag(B_j / s_g) Z_g, written straight into the (v, r, n) layout in which each
    # voxel's r x r Gram matrix is one batched product (transposing a stacked (r * n, v) result
    # instead cost as much as the products themselves). The groups' columns tile it: every
    # element is written. A buffer reused across folds and batches: a fresh one of this size
    # (~100 MB) is paged in by the products themselves, which cost a third more for it.
    if work is None:
        work = bk.empty((v * r * n,), dtype)
    Q = work[: v * r * n].reshape(v, r * n)
    if blocks is None:
        blocks = _scaled_blocks(bk, db, ex)
    for (start, stop, offset), block in zip(ex.groups, blocks):
        bk.matmul_into(t.Z[start:stop].T, block.T, Q[:, offset * n : offset * n + block.shape[0]])
    Q = Q.reshape(v, r, n)
    M = bk.astype((Q @ bk.swap_last(Q)).reshape(v, r * r), bk.float64)  # (v, r²)
    del Q
    A = bk.asarray(ex.A)
    AA = (A[:, :, None] * A[:, None, :]).reshape(A.shape[0], r * r)
    q_hat = bk.clip_min(AA @ M.T, 0.0)  # (a, v)
    # truncation bound: ||P - P̂|| <= tau * ||(F - expansion)[alpha] ∘ Z / sqrt(s)||
    y2 = t.Z * t.Z / bk.astype(db.s, dtype)[:, None]
    dev = db.tau * bk.sqrt(bk.clip_min(bk.astype(bk.asarray(ex.residual_sq, dtype) @ y2, bk.float64), 0.0))
    dev = dev * (1.0 + 1e-5)  # the float32 product that summed it
    W32 = bk.astype(1.0 / (db.s[None, :] + alphas[:, None]), dtype)
    cabs = bk.astype(W32 @ (t.CZ * t.CZ) ** 0.5, bk.float64)  # Σ_k |C_k Z_k| / (s_k + alpha)
    root = bk.sqrt(q_hat)
    high = (root + dev) ** 2
    low = bk.clip_min(root - dev, 0.0) ** 2
    margin = _MARGIN[db.dtype] * (2.0 * cabs + high)
    base = t.rr[None, :] - 2.0 * t.cross
    return (base + q_hat) / n, (base + low - margin) / n, (base + high + margin) / n


def _pairs_q(bk: Backend, db: _DeviceBasis, Z, alphas, alpha_idx, voxels):
    """Exact q for (alpha, voxel) pairs: alpha_idx, voxels (m,) device index arrays -> (m,) float64.

    All pairs go into one (n_eval, k) @ (k, m) product, each column Z[:, voxel] scaled by its
    alpha's weights: efficient however the pairs spread over alphas.
    """
    dtype = db.proj_eval.dtype
    W = bk.astype(1.0 / (db.s[None, :] + alphas[alpha_idx][:, None]), dtype)  # (m, k)
    P = db.proj_eval @ (Z[:, voxels] * W.T)
    return _sum_sq(bk, P[None])[0]


# --------------------------------------------------------------------------- refit and driver


def _predict(bk: Backend, db: _DeviceBasis, Y, alpha, inp: _FitInput | None = None):
    """Refit on the basis's fit rows with one alpha per voxel and predict its evaluation rows.

    Y (n, v) float64, alpha (v,) float64 (device) -> (n_eval, v) float64.
    """
    # The intercept (the training mean) is added in float64: in float32 it would quantise the
    # tiny variations of heavily regularised voxels.
    Z, mean = _to_eigenbasis(bk, db, Y, inp)
    w = bk.astype(1.0 / (db.s[:, None] + alpha[None, :]), db.dtype)
    return bk.astype(db.proj_eval @ (Z * w), bk.float64) + mean


@dataclass(frozen=True)
class RidgeCVResult:
    """alpha (v,), alpha_index (v,), cv_error (a, v) float64, test_prediction (n_test, v) float64.

    ``cv_error`` is exact for every alpha with ``search="exhaustive"``; with ``"certified"`` it
    is exact where the search evaluated an alpha exactly (every voxel's near-ties) and elsewhere
    the expansion's estimate, whose deviation is bounded as in the module docstring: within
    ~0.2% from the batch's optima up, looser (a few %) towards least squares, where the batch's
    tolerance profile is loose. The estimates therefore depend on how voxels are batched; the
    chosen alphas and predictions do not.
    """

    alpha: np.ndarray
    alpha_index: np.ndarray
    cv_error: np.ndarray
    test_prediction: np.ndarray


class _Meter:
    """Per-phase wall time, CPU time and floating-point operation counts, for benchmarks.

    ``stats`` is the caller's dict (or None: nothing is measured). Entries: phase name ->
    {"seconds", "cpu_seconds", "flops"}; scalars "rank" (total, the largest over folds and
    batches), "groups" (likewise) and "exact_pairs" (certified search).
    CPU time is the process's (all its threads): on a shared machine, with one BLAS thread, it
    is the work done whatever the load.
    """

    def __init__(self, bk: Backend, stats: dict | None):
        self.bk, self.stats = bk, stats

    @contextlib.contextmanager
    def phase(self, name: str, flops: float):
        if self.stats is None:
            yield
            return
        self.bk.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.bk.synchronize()
        entry = self.stats.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "flops": 0.0})
        entry["seconds"] += time.perf_counter() - start
        entry["cpu_seconds"] += time.process_time() - cpu
        entry["flops"] += float(flops)

    def count(self, name: str, value: float):
        if self.stats is not None:
            self.stats[name] = self.stats.get(name, 0) + value

    def maximum(self, name: str, value: float):
        if self.stats is not None:
            self.stats[name] = max(self.stats.get(name, 0), value)


def ridge_cv(
    decomposition: Decomposition,
    Y: np.ndarray,
    alphas: np.ndarray,
    *,
    voxel_batch: int = 1000,
    alpha_batch: int = 10,
    search: str = "certified",
    backend: str = "numpy",
    device: str | None = None,
    rank: int | None = None,
    tolerance: float | None = None,
    stats: dict | None = None,
) -> RidgeCVResult:
    """Choose each voxel's alpha by CV and predict the test set.

    Y (n, v) responses for all n rows (finite); alphas (a,) positive. Voxels are processed
    ``voxel_batch`` at a time; memory grows linearly with it (see docs/performance.md).
    ``alpha_batch``: alphas per product of the exhaustive sweep (and of :func:`cv_errors`).
    ``search``: "certified" (default; same alphas as "exhaustive", see the module docstring) or
    "exhaustive" (every alpha evaluated). ``backend``/``device``: see :mod:`pipeline.ridge.backend`.
    ``tolerance``: the certified search's expansion accuracy (default ``_EXPANSION_TOL``); the
    groups and ranks follow from it, the grid and the spectrum, and the search evaluates every
    alpha when the expansion would cost more than half the exhaustive sweep. ``rank``: instead,
    one expansion of this rank over the whole spectrum (for comparisons). Any tolerance or rank
    gives the same alphas; they only move work between the expansion and the exact checks.
    ``stats``: a dict to fill with per-phase seconds and flop counts (see ``_Meter``).
    """
    Y = np.asarray(Y) if not hasattr(Y, "shape") else Y
    alphas = np.asarray(alphas, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"responses must be 2-D (n, v), got shape {Y.shape}")
    if Y.shape[0] != decomposition.n_samples:
        raise ValueError(
            f"responses have {Y.shape[0]} rows but the features had {decomposition.n_samples}"
        )
    if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError("alphas must be a non-empty 1-D array of positive values")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if voxel_batch < 1 or alpha_batch < 1:
        raise ValueError(f"voxel_batch and alpha_batch must be >= 1, got {voxel_batch}, {alpha_batch}")
    bk = get_backend(backend, device)
    meter = _Meter(bk, stats)
    folds = [_on_device(bk, b) for b in decomposition.folds]
    final = _on_device(bk, decomposition.final)
    centred = None if decomposition.centred is None else bk.asarray(decomposition.centred)
    al = bk.asarray(alphas)

    planner = None
    if search == "certified":
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        tol = _EXPANSION_TOL[folds[0].dtype] if tolerance is None else float(tolerance)
        planner = _Expansions(bk, folds, alphas, tol, rank)

    v = Y.shape[1]
    work = None  # the certified search's product buffer, reused by every fold and batch
    errors = np.empty((alphas.size, v))
    index = np.empty(v, dtype=np.int64)
    pred = np.empty((final.n_eval, v))
    for s0 in range(0, v, voxel_batch):
        sl = slice(s0, min(s0 + voxel_batch, v))
        Yb = np.asarray(Y[:, sl], dtype=np.float64)
        bad = ~np.isfinite(Yb).all(axis=0)
        if bad.any():
            cols = (np.flatnonzero(bad) + s0)[:10].tolist()
            raise ValueError(f"responses of voxel columns {cols} contain NaN or infinite values")
        Yd = bk.asarray(Yb)
        vb = Yb.shape[1]
        with meter.phase("fold_terms", 2 * vb * (0 if centred is None else centred.shape[0] * centred.shape[1])):
            inputs = _fit_inputs(bk, decomposition, centred, folds + [final], Yd)
        terms = []
        for db, inp in zip(folds, inputs):
            k = db.s_np.size
            with meter.phase("fold_terms", 2 * vb * (_basis_flops(db) + k * (db.n_eval + alphas.size))):
                terms.append(_fold_terms(bk, db, Yd, al, inp))
        expansions = None
        if planner is not None:
            with meter.phase("locate", 2 * vb * alphas.size * sum(db.s_np.size for db in folds)):
                located = _located_optima(bk, folds, terms, al)
            chosen = planner.for_optima(located)
            if chosen is not None:
                expansions, blocks = chosen
        if expansions is None:
            err = 0.0
            for db, t in zip(folds, terms):
                with meter.phase("sweep", 2 * vb * alphas.size * db.n_eval * db.proj_eval.shape[1]):
                    q = _exact_q(bk, db, t.Z, al, alpha_batch)
                    err = err + (t.rr[None, :] - 2.0 * t.cross + q) / db.n_eval
            err = bk.to_numpy(err) / len(folds)
            idx = np.argmin(err, axis=0)
        else:
            meter.maximum("rank", max(ex.rank for ex in expansions))
            meter.maximum("groups", max(len(ex.groups) for ex in expansions))
            need = vb * max(ex.rank for ex in expansions) * max(db.n_eval for db in folds)
            if work is None or work.shape[0] < need:
                work = None  # release the old buffer before the new one
                work = bk.empty((need,), folds[0].dtype)
            err, idx = _certified_search(bk, folds, terms, al, alphas, expansions, blocks, meter, work)
        del terms
        errors[:, sl] = err
        index[sl] = idx
        with meter.phase("refit", 2 * vb * (_basis_flops(final) + final.s_np.size * final.n_eval)):
            pred[:, sl] = bk.to_numpy(_predict(bk, final, Yd, bk.asarray(alphas[idx]), inputs[-1]))
        del inputs
    return RidgeCVResult(alpha=alphas[index], alpha_index=index, cv_error=errors, test_prediction=pred)


def _located_optima(bk: Backend, folds: list[_DeviceBasis], terms: list[_FoldTerms], alphas) -> np.ndarray:
    """Each voxel's alpha index under a diagonal approximation of q: (v,) int.

    ``q(alpha) = Zᵀ W EᵀE W Z`` (W = diag(1 / (s + alpha))) with ``EᵀE ≈ (n_eval / n_fit) diag(s)``,
    its expectation for evaluation rows drawn like the fit rows: one (a, k) @ (k, v) product per
    fold. Measured at BOLD5000's shape: within one grid step of the exact optimum for 98% of
    voxels, and rarely above it. It only places the certified search's tolerance profile.
    """
    err = 0.0
    for db, t in zip(folds, terms):
        W = bk.astype(1.0 / (db.s[None, :] + alphas[:, None]), db.dtype)
        q = bk.astype((W * W) @ (bk.astype(db.s, db.dtype)[:, None] * t.Z * t.Z), bk.float64)
        err = err + (t.rr[None, :] - 2.0 * t.cross + q * (db.n_eval / db.n_fit)) / db.n_eval
    return np.argmin(bk.to_numpy(err), axis=0)


class _Expansions:
    """The certified search's expansions, one per fold, for each batch's tolerance profile.

    A batch's profile is tight down to ``_LOCATE_DF_MARGIN`` times the degrees of freedom of its
    smallest located optimum, rounded to a grid alpha's, so batches of one study share a few
    profiles: each is planned and expanded once (planning costs ~0.3 s, an expansion for a plan
    milliseconds). One plan serves every fold (their spectra barely differ). ``rank``: one
    expansion of that rank over the whole spectrum instead (for comparisons). None where the
    expansion would cost more than ``_LOWRANK_MAX_FRACTION`` of the exhaustive sweep.
    """

    def __init__(self, bk: Backend, folds: list[_DeviceBasis], alphas: np.ndarray, tol: float, rank: int | None):
        self.bk, self.folds, self.alphas, self.tol, self.rank = bk, folds, alphas, tol, rank
        self.df = degrees_of_freedom(folds[0].s_np, alphas)
        self.made: dict = {}
        self.blocks: tuple | None = None  # (key, per fold _scaled_blocks): the last profile's only

    def for_optima(self, located: np.ndarray) -> tuple[list[Expansion], list[tuple]] | None:
        """-> (one Expansion per fold, their _scaled_blocks) for a batch's located optima (v,),
        or None (the exhaustive sweep is cheaper)."""
        tight = None
        if self.rank is None:
            above = self.df[self.df >= _LOCATE_DF_MARGIN * self.df[located].max()]
            tight = float(above.min()) if above.size else float(self.df.max())
        if tight not in self.made:
            self.made[tight] = self._make(tight)
        expansions = self.made[tight]
        if expansions is None:
            return None
        if self.blocks is None or self.blocks[0] != tight:
            # ~12 MB per fold: kept for one profile at a time (batches of a study mostly share one)
            self.blocks = None
            self.blocks = (tight, [_scaled_blocks(self.bk, b, ex) for b, ex in zip(self.folds, expansions)])
        return expansions, self.blocks[1]

    def _make(self, tight_df: float | None) -> list[Expansion] | None:
        plans: dict[int, tuple] = {}
        for b in self.folds:
            k = b.s_np.size
            if k in plans:
                continue
            if self.rank is not None:
                plans[k] = ((0, k, min(self.rank, k, self.alphas.size)),), self.tol
            else:
                profile = tolerance_profile(b.s_np, self.alphas, self.tol, tight_df)
                plans[k] = plan_groups(b.s_np, self.alphas, profile), profile
        planned = [expand(b.s_np, self.alphas, *plans[b.s_np.size]) for b in self.folds]
        work = max(ex.products + ex.rank**2 for ex in planned)
        if work > _LOWRANK_MAX_FRACTION * self.alphas.size * max(b.s_np.size for b in self.folds):
            return None
        return planned


def _certified_search(bk, folds, terms, al, alphas, expansions, blocks, meter, work):
    """-> (cv error (a, v) numpy, chosen index (v,)) for one voxel batch; ``blocks``, ``work``: the
    scaled evaluation features and the Q_j buffer (see :func:`_certified_bounds`)."""
    est = low = high = 0.0
    for db, t, ex, blk in zip(folds, terms, expansions, blocks):
        n, k = db.proj_eval.shape
        v, r, a = t.Z.shape[1], ex.rank, alphas.size
        with meter.phase("lowrank", 2 * v * (ex.products * n + r * r * n + a * r * r + 2 * a * k)):
            e, lo, hi = _certified_bounds(bk, db, t, al, ex, work, blk)
            est, low, high = est + e, low + lo, high + hi
        t.CZ = None  # not needed any more: free it before the next fold's temporaries
    est, low, high = (bk.to_numpy(x) / len(folds) for x in (est, low, high))
    candidate = low <= high.min(axis=0)[None, :]
    n_cand = candidate.sum(axis=0)
    idx = np.argmax(candidate, axis=0)  # the only candidate where there is one
    tied = np.flatnonzero(n_cand > 1)
    if tied.size:
        # Near-ties, in two rounds. First each tied voxel's best estimate exactly; an exact
        # value lies within its own interval, so a candidate whose lower bound exceeds it cannot
        # win (measured: a fifth fewer exact pairs). Then the candidates that remain.
        exact = np.full((alphas.size, tied.size), np.inf)
        cand = candidate[:, tied]
        first = np.argmin(np.where(cand, est[:, tied], np.inf), axis=0)
        cols = np.arange(tied.size)
        exact[first, cols] = _exact_pairs(bk, folds, terms, al, first, tied, meter)
        cand[first, cols] = False
        cand &= low[:, tied] <= exact[first, cols][None, :]
        js, cols = np.nonzero(cand)
        if js.size:
            exact[js, cols] = _exact_pairs(bk, folds, terms, al, js, tied[cols], meter)
        idx[tied] = np.argmin(exact, axis=0)
        js, cols = np.nonzero(np.isfinite(exact))
        block = est[:, tied]
        block[js, cols] = exact[js, cols]
        est[:, tied] = block
    return est, idx


def _exact_pairs(bk, folds, terms, al, js: np.ndarray, voxels: np.ndarray, meter) -> np.ndarray:
    """Exact CV errors of (alpha index, voxel) pairs js, voxels (m,) -> (m,) numpy float64,
    in blocks of pairs (each one product per fold)."""
    meter.count("exact_pairs", js.size)
    out = np.empty(js.size)
    step = 2000  # (k, step) gathered coefficients per product: large enough for full speed
    for p0 in range(0, js.size, step):
        j_b, v_b = js[p0 : p0 + step], voxels[p0 : p0 + step]
        j_d, v_d = bk.index(j_b), bk.index(v_b)
        total = 0.0
        for db, t in zip(folds, terms):
            n, k = db.proj_eval.shape
            with meter.phase("ties", 2 * j_b.size * n * k):
                q = _pairs_q(bk, db, t.Z, al, j_d, v_d)
                total = total + (t.rr[v_d] - 2.0 * t.cross[j_d, v_d] + q) / db.n_eval
        out[p0 : p0 + step] = bk.to_numpy(total) / len(folds)
    return out
