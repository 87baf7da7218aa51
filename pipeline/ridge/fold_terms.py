"""The voxel-dependent, alpha-independent half of the engine: a batch of responses brought into
each fold's eigenbasis, the terms every search reads, and the refit's predictions.

Validation error without forming residuals. With centred validation targets ``R``,
``||R - P||² = ||R||² - 2 c(alpha) + ||P||²`` where ``c(alpha) = Σ_k (EᵀR)_k Z_k / (s_k + alpha)``
costs one small product for all alphas at once (float64). Only ``q(alpha) = ||P(alpha)||²``
needs a large product per alpha (the searches' work: :mod:`neurotask.pipeline.ridge.exhaustive`,
:mod:`neurotask.pipeline.ridge.certified`). Besides halving the work of a residual, this is far
more accurate in float32: round-off scales with ``c`` and ``q`` instead of with ``||R||²``, which
matters on the flat CV curves of noise voxels (measured: float32 picks the float64 alpha for
100% of voxels this way, 80% with float32 residuals).

Notation of :mod:`neurotask.pipeline.ridge.decomposition`: ``E`` a basis's ``proj_eval``, ``s``
its eigenvalues, ``Z`` the eigen-coefficients of the centred fit targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurotask.pipeline.ridge.backend import Backend
from neurotask.pipeline.ridge.decomposition import Basis, Decomposition
from neurotask.pipeline.ridge.observer import Observer


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


def _basis_on_device(bk: Backend, basis: Basis) -> _DeviceBasis:
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
class _DeviceDecomposition:
    """A Decomposition as backend arrays: the folds' and the final's _DeviceBasis; in the
    cross-product form ``centred`` (n_train, p) dtype and ``order`` (n_train,) index, else None."""

    folds: tuple[_DeviceBasis, ...]
    final: _DeviceBasis
    centred: object | None
    order: object | None


def _on_device(bk: Backend, dec: Decomposition) -> _DeviceDecomposition:
    return _DeviceDecomposition(
        folds=tuple(_basis_on_device(bk, b) for b in dec.folds),
        final=_basis_on_device(bk, dec.final),
        centred=None if dec.centred is None else bk.asarray(dec.centred),
        order=None if dec.order is None else bk.index(dec.order),
    )


@dataclass(frozen=True)
class _FitInput:
    """What one basis needs from a batch of v responses in the cross-product form:
    g (p, v) dtype ``Xc_fitᵀ (y_fit - ȳ_fit)``, mean (v,) float64 ``ȳ_fit``."""

    g: object
    mean: object


def _fit_inputs(bk: Backend, dd: _DeviceDecomposition, Y) -> list[_FitInput | None]:
    """Cross-products of every basis (the folds, then the final) for a batch of responses.

    Y (n, v) float64 on the device. With responses centred on the training mean (in float64,
    before rounding: raw BOLD means ~1e3 would swamp float32 sums) and the folds' validation rows
    contiguous in ``dd.centred``, ``S_f = X̃_valᵀ Ỹ_val`` costs n_val p per fold, the training
    total is ``S = Σ_f S_f``, and a fold's ``g = S - S_f - n_fit μx μyᵀ`` with μ the fit rows'
    means of the centred features (fit_shift) and responses. Direct form: Nones.
    """
    if dd.centred is None:
        return [None] * (len(dd.folds) + 1)
    dtype = dd.final.dtype
    Yo = Y[dd.order]
    n_train = Yo.shape[0]
    ybar = bk.mean(Yo, 0)
    Yo = Yo - ybar
    total = bk.sum(Yo, 0)  # ~0: kept for exactness
    Yt = bk.astype(Yo, dtype)
    parts, S, start = [], None, 0
    for db in dd.folds:
        stop = start + db.n_eval
        Sw = dd.centred[start:stop].T @ Yt[start:stop]
        parts.append((Sw, bk.sum(Yo[start:stop], 0)))
        S = Sw if S is None else S + Sw
        start = stop
    del Yo, Yt
    out = []
    for db, (Sw, wsum) in zip(dd.folds, parts):
        shift = (total - wsum) / db.n_fit  # mean over the fit rows of the centred responses
        g = S - Sw
        # the rank-one correction is small (centred means): float32 is enough for it
        g -= bk.astype(db.n_fit * db.fit_shift, dtype)[:, None] * bk.astype(shift, dtype)[None, :]
        out.append(_FitInput(g=g, mean=ybar + shift))
    shift = total / n_train
    S -= bk.astype(n_train * dd.final.fit_shift, dtype)[:, None] * bk.astype(shift, dtype)[None, :]
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
    """Multiply-adds per voxel of bringing its responses to the eigenbasis (for the observer)."""
    if db.rotation is not None:
        return int(db.rotation.shape[0] * db.rotation.shape[1])
    return int(db.proj_fit.shape[0] * db.proj_fit.shape[1])


@dataclass
class _FoldTerms:
    """The voxel-dependent, alpha-independent part of one fold for a batch of v voxels.

    Z (k, v) dtype: eigen-coefficients of the centred fit targets; CZ (k, v) dtype:
    ``(EᵀR) ∘ Z``; rr (v,) float64: ``||R||²``; cross (a, v) float64: ``c(alpha)``.
    Mutable: a search may drop CZ once read, to free its memory.
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


@dataclass(frozen=True)
class _BatchTerms:
    """One voxel batch's fold terms with the bases that made them: what a search reads.

    folds (K,) and terms (K,): each fold's _DeviceBasis and _FoldTerms for the batch's v voxels;
    alphas (a,) float64 on the device.
    """

    bk: Backend
    folds: tuple[_DeviceBasis, ...]
    terms: tuple[_FoldTerms, ...]
    alphas: object

    @property
    def n_voxels(self) -> int:
        return int(self.terms[0].Z.shape[1])

    @property
    def n_alphas(self) -> int:
        return int(self.alphas.shape[0])


def _batch_terms(bk: Backend, dd: _DeviceDecomposition, Y, alphas, observer: Observer):
    """Every fold's terms for a batch of responses Y (n, v) float64 on the device, alphas (a,)
    float64 on the device -> (_BatchTerms, the final basis's _FitInput or None for the refit)."""
    v, a = int(Y.shape[1]), int(alphas.shape[0])
    with observer.phase("fold_terms", 2 * v * (0 if dd.centred is None else dd.centred.shape[0] * dd.centred.shape[1])):
        inputs = _fit_inputs(bk, dd, Y)
    terms = []
    for db, inp in zip(dd.folds, inputs):
        with observer.phase("fold_terms", 2 * v * (_basis_flops(db) + db.s_np.size * (db.n_eval + a))):
            terms.append(_fold_terms(bk, db, Y, alphas, inp))
    return _BatchTerms(bk=bk, folds=dd.folds, terms=tuple(terms), alphas=alphas), inputs[-1]


def _predict(bk: Backend, db: _DeviceBasis, Y, alpha, inp: _FitInput | None = None):
    """Refit on the basis's fit rows with one alpha per voxel and predict its evaluation rows.

    Y (n, v) float64, alpha (v,) float64 (device) -> (n_eval, v) float64.
    """
    # The intercept (the training mean) is added in float64: in float32 it would quantise the
    # tiny variations of heavily regularised voxels.
    Z, mean = _to_eigenbasis(bk, db, Y, inp)
    w = bk.astype(1.0 / (db.s[:, None] + alpha[None, :]), db.dtype)
    return bk.astype(db.proj_eval @ (Z * w), bk.float64) + mean
