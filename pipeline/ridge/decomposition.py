"""The voxel-independent half of the engine: each fold's (and the whole training part's)
features in their own eigenbasis, computed once per (feature space, split) and shared by every
voxel chunk.

Shared decompositions. For a training matrix with centred columns ``Xc = U S Vᵀ`` (eigenvalues
``s = S²``), the ridge prediction of evaluation rows ``E = (X_eval - mean) V`` is
``P(alpha) = E diag(1 / (s + alpha)) Z`` with ``Z = (Xc V)ᵀ y``. The decomposition depends on the
features only: it is computed in float64 (float32 eigendecompositions of XᵀX are unreliable on
ill-conditioned features), from the eigendecomposition of XᵀX (or of XXᵀ with fewer rows than
features) where that is exact, and from the SVD of the centred rows where the spectrum runs
into the Gram matrix's round-off (see ``_GRAM_RELIABLE``); the voxels' large products later run
in ``dtype`` (float32 by default).

Two forms in which responses reach each eigenbasis (see :class:`Basis`):
- direct: ``Z = (Xc V)ᵀ y``, a product over the fold's fit rows;
- cross-products: ``Z = Vᵀ (Xcᵀ y)``. With K folds whose validation sets partition the training
  part, the folds' validation cross-products ``X_valᵀ y`` (n_val p each) add up to the training
  ones, every fold's ``Xc_fitᵀ y`` is the total minus its own, and ``Z`` costs p² per fold instead
  of p n_fit (see :func:`_fold_order`, and :func:`neurotask.pipeline.ridge.fold_terms._fit_inputs`
  for the responses' side). The same one pass over the training rows gives every fold's Gram
  matrix (:func:`_fold_grams`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from neurotask.pipeline.ridge.backend import Backend, get_backend
from neurotask.pipeline.ridge.splits import Splits

# Eigen-directions whose eigenvalue is below this fraction of the largest are round-off:
# they carry no signal and would only amplify noise at tiny alphas.
_EIG_RTOL_FACTOR = 10.0

# eigh of a Gram matrix XᵀX resolves its eigenvalues only to an absolute ~p·eps of the largest:
# below ``_GRAM_RELIABLE`` of it they have few correct digits, and below the round-off level
# above real directions and exact null ones look alike. A spectrum with a gap (real eigenvalues
# above this level, null ones at round-off) is exact on the Gram; one that runs continuously
# into round-off (eigenvalues kept but below this level) is decomposed instead by the SVD of the
# centred rows, whose singular values are accurate to ~n·eps of the largest (squared: 1e-26).
_GRAM_RELIABLE = 1e-8

# Features per column block where the kernel form sums its n x n products (and where prepare
# checks the features finite): a block costs n x 2048 float64 (80 MB at n = 4916).
_COLUMN_BLOCK = 2048

# The dtypes the voxels' products can run in.
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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
    from_rows: True where the spectrum was too wide for the Gram matrix's eigh and the basis comes
    from the SVD of the centred rows (see ``_GRAM_RELIABLE``).
    """

    fit_rows: np.ndarray
    eval_rows: np.ndarray
    eigvals: np.ndarray
    proj_fit: np.ndarray | None
    rotation: np.ndarray | None
    fit_shift: np.ndarray | None
    proj_eval: np.ndarray
    whitened_norm: float
    from_rows: bool = False  # decomposed by the SVD of the rows (a spectrum too wide for the Gram)

    @property
    def nbytes(self) -> int:
        arrays = (self.proj_fit, self.rotation, self.fit_shift, self.proj_eval, self.eigvals)
        return sum(a.nbytes for a in arrays if a is not None)


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


class _FitGram(NamedTuple):
    """A training set's mean (p,) and its centred Gram matrix (p, p), float64 on the device."""

    mean: object
    gram: object


def _decompose(bk: Backend, Xd, fit_rows: np.ndarray, eval_rows: np.ndarray, dtype, *,
               train_mean=None, fit_gram: _FitGram | None = None) -> Basis:
    """Eigen-decompose the centred features of ``fit_rows`` in float64 on the backend's device.

    Xd (n, p) float64 backend array. Uses the p x p Gram matrix when n_fit >= p, else the
    n_fit x n_fit kernel. ``train_mean`` (p,) float64 (device): the cross-product form, with
    fit_shift relative to this mean; None: the direct form. ``fit_gram``: the fit rows' mean and
    centred Gram matrix when the caller has them (see :func:`_fold_grams`), else None.
    Eigenvector signs differ between LAPACK and cuSOLVER; every result of the engine is
    invariant to them. The Basis holds numpy arrays, the projections in ``dtype``.
    """
    cross = train_mean is not None
    n_fit, p = int(np.asarray(fit_rows).size), int(Xd.shape[1])
    eps = np.finfo(np.float64).eps
    proj_fit = None
    if fit_gram is not None and n_fit >= p:
        mean, G = fit_gram
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
        wide = _too_wide(s, keep)
        s, V = s[keep], V[:, keep]
    else:
        s, U = bk.eigh(Xf @ Xf.T)
        keep = s > s[-1] * _EIG_RTOL_FACTOR * n_fit * eps
        wide = _too_wide(s, keep)
        s, U = s[keep], U[:, keep]
    if wide:
        if Xf is None:
            Xf = Xd[bk.index(fit_rows)] - mean
        s, V, proj_fit = _row_svd(bk, Xf)
    elif n_fit >= p:
        if not cross:  # the cross-product form never needs the fit rows' projection
            proj_fit = (Xf @ V).T
    else:
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
        from_rows=wide,
    )


def _decompose_kernel(bk: Backend, X: np.ndarray, fit_rows: np.ndarray, eval_rows: np.ndarray,
                      dtype) -> Basis | None:
    """The direct form's Basis of ``fit_rows`` when they are fewer than the features (kernel
    form), from column blocks of X: None where the spectrum is too wide for the kernel's eigh
    (the caller then decomposes the rows, see :func:`_row_svd`).

    X (n, p) any float dtype, on the host. With the fit rows centred, ``Xc = U S Vᵀ`` and
    ``K = Xc Xcᵀ = U S² Uᵀ`` (n_fit, n_fit); the eval rows' projection is
    ``(X_eval - mean) V = K_e U S⁻¹`` with ``K_e = (X_eval - mean) Xcᵀ`` (n_eval, n_fit), so V
    (p, k) is never formed. K and K_e are sums over column blocks of ``_COLUMN_BLOCK`` features,
    each block centred and promoted to float64 on its own: memory is
    ``(n_fit + n_eval) n_fit + n _COLUMN_BLOCK`` float64 besides X, whatever p. The flops are
    those of the Gram form's rows (n_fit² p for K, n_eval n_fit p for K_e, n_fit³ for eigh).

    Peak per worker (GB) in this form, besides the caller's X (n p x its itemsize) and the
    responses: ``8 [3 n _COLUMN_BLOCK + 2 n_fit (n_fit + n_eval)] / 1e9`` for one basis in flight,
    plus the finished bases, ``itemsize (n_fit + n_eval) k`` each (float32: ~0.07 GB per basis at
    n = 4916), independent of p; see docs/performance.md for the measured figures.
    """
    n_fit, p = int(np.asarray(fit_rows).size), int(X.shape[1])
    fit, ev = bk.index(np.asarray(fit_rows)), bk.index(np.asarray(eval_rows))
    K = Ke = None
    for c in range(0, p, _COLUMN_BLOCK):
        block = bk.asarray(np.asarray(X[:, c : c + _COLUMN_BLOCK]), bk.float64)
        Xf = block[fit]
        mean = bk.mean(Xf, 0)
        Xf = Xf - mean
        Xe = block[ev] - mean
        del block
        K = Xf @ Xf.T if K is None else K + Xf @ Xf.T
        Ke = Xe @ Xf.T if Ke is None else Ke + Xe @ Xf.T
        del Xf, Xe
    s, U = bk.eigh(K)
    del K
    keep = s > s[-1] * _EIG_RTOL_FACTOR * n_fit * np.finfo(np.float64).eps
    if _too_wide(s, keep):
        return None
    s, U = s[keep], U[:, keep]
    root = bk.sqrt(s)
    proj_fit = U.T * root[:, None]  # (Xc V)ᵀ = S Uᵀ
    proj_eval = (Ke @ U) / root
    del Ke
    whitened = proj_eval / root
    small = whitened @ whitened.T if whitened.shape[0] <= whitened.shape[1] else whitened.T @ whitened
    top = float(bk.eigvalsh(small)[-1])

    def out(x):
        return np.ascontiguousarray(bk.to_numpy(x), dtype=dtype)

    return Basis(fit_rows=np.asarray(fit_rows), eval_rows=np.asarray(eval_rows), eigvals=bk.to_numpy(s),
                 proj_fit=out(proj_fit), rotation=None, fit_shift=None, proj_eval=out(proj_eval),
                 whitened_norm=float(np.sqrt(max(top, 0.0))), from_rows=False)


def _too_wide(s, keep) -> bool:
    """True if a Gram matrix's spectrum ``s`` (ascending) keeps eigenvalues below
    ``_GRAM_RELIABLE`` of its largest: eigh cannot resolve them (nor those it dropped)."""
    kept = s[keep]
    return bool(kept.shape[0]) and float(kept[0]) < float(s[-1]) * _GRAM_RELIABLE


def _row_svd(bk: Backend, Xf):
    """Eigenvalues (ascending, k), eigenvectors V (p, k) and ``(Xf V)ᵀ`` (k, n_fit) of the centred
    rows Xf (n_fit, p) float64 from their thin SVD, keeping singular values above round-off."""
    U, S, Vh = bk.svd(Xf)
    keep = S > S[0] * _EIG_RTOL_FACTOR * max(Xf.shape) * np.finfo(np.float64).eps
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    U, S, Vh = bk.flip(U, 1), bk.flip(S, 0), bk.flip(Vh, 0)  # ascending, as eigh's
    return S * S, Vh.T, U.T * S[:, None]


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
    over the training rows: yields a :class:`_FitGram` per fold, then the final's.

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
        yield _FitGram(train_mean + d, G)
    d = total / n_train
    H -= n_train * (d[:, None] * d[None, :])
    yield _FitGram(train_mean + d, H)


def prepare(X: np.ndarray, splits: Splits, dtype=np.float32, backend: str = "numpy",
            device: str | None = None, cross_products: bool | None = None) -> Decomposition:
    """Decompose every fold and the full training part.

    Parameters
    ----------
    X : (n, p) array
        The features of all n rows, finite.
    splits : Splits
        The test set and CV folds (:func:`neurotask.pipeline.ridge.make_splits`).
    dtype : float32 or float64
        The dtype of the voxels' products (the decomposition itself runs in float64).
    backend, device : str
        As for :func:`neurotask.pipeline.ridge.ridge_cv`: with torch on CUDA the float64 Gram
        matrices and eigendecompositions run on the GPU (on a GPU node they would otherwise be
        most of a (subject, task)'s time). The result is numpy arrays either way.
    cross_products : bool or None
        The form in which responses reach each eigenbasis (see :class:`Basis`): None picks the
        one with fewer flops (:func:`_fold_order`), except in float32 where a basis comes from
        the rows' SVD (a wide spectrum: the direct form, see ``prepare``'s body); False forces
        the direct form, True the cross-product form (an error where it does not apply).

    Returns
    -------
    Decomposition
        One Basis per fold (k_f eigen-directions each) and one for the training part.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (n, p), got shape {X.shape}")
    if not all(np.isfinite(X[:, c : c + _COLUMN_BLOCK]).all() for c in range(0, X.shape[1], _COLUMN_BLOCK)):
        raise ValueError("features contain NaN or infinite values")  # checked in blocks: no n x p mask
    if np.dtype(dtype) not in DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    bk = get_backend(backend, device)
    order = None if cross_products is False else _fold_order(splits, X.shape[1], force=bool(cross_products))
    pairs = list(splits.folds) + [(splits.train, splits.test)]
    if order is None and all(np.asarray(fit).size < X.shape[1] for fit, _ in pairs):
        # The kernel form: built from column blocks of X, never holding a float64 copy of it nor
        # a (p, k) array (see _decompose_kernel); a wide spectrum falls back to the rows' SVD.
        bases = [_decompose_kernel(bk, X, fit, val, dtype) for fit, val in pairs]
        if all(b is not None for b in bases):
            return Decomposition(folds=tuple(bases[:-1]), final=bases[-1], n_samples=X.shape[0])
    Xd = bk.asarray(X, bk.float64)
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
    bases = [_decompose(bk, Xd, fit, val, dtype, train_mean=train_mean, fit_gram=None if grams is None else next(grams))
             for fit, val in list(splits.folds) + [(splits.train, splits.test)]]
    folds, final = tuple(bases[:-1]), bases[-1]
    if cross_products is None and np.dtype(dtype) == np.float32 and any(b.from_rows for b in bases):
        # Xcᵀy summed in float32 is exact only to ~1e-7 of its largest directions: projected on
        # directions 1e4 and more below them (what a wide spectrum has) it is round-off. The
        # direct form projects the rows themselves and stays accurate there.
        return prepare(X, splits, dtype, backend, device, cross_products=False)
    centred = np.ascontiguousarray(bk.to_numpy(Xc), dtype=dtype)
    return Decomposition(folds=folds, final=final, n_samples=X.shape[0], centred=centred, order=order)
