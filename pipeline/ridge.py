"""Voxelwise ridge regression with a per-voxel alpha chosen by cross-validation.

Pure array code (no I/O, no Dask), after himalaya's solvers: every function documents its
arrays' shapes, voxels (targets) are processed in batches to bound memory.

Notation: ``n`` samples (images), ``p`` features, ``v`` voxels, ``k`` retained eigen-directions
of a fold's training features, ``a`` alphas.

The protocol is the paper's: a seeded held-out test set; on the training part, each voxel's
alpha is chosen on a log grid by K-fold cross-validation scoring mean squared error (the mean
over folds of each fold's MSE, as scikit-learn's ``cross_val_score``); then a refit on the whole
training part with each voxel's alpha predicts the test set. Every model has an intercept.

Why it is fast: for a training matrix with centred columns ``Xc = U S Vᵀ``, the ridge
prediction of rows ``E`` (centred with the training means) is
``E V diag(1 / (s² + alpha)) (Xc V)ᵀ y``. The decomposition depends on the features only, so it
is computed once per (feature space, split) and shared by every voxel; the voxel-dependent part
``Z = (Xc V)ᵀ Y`` costs one product per fold, and every alpha is one more product of ``E V``
with ``Z`` scaled row-wise. The decomposition is done in float64 (float32 eigendecompositions
of XᵀX are unreliable on ill-conditioned features); the large products run in ``dtype``
(float32 by default). Intercepts are added back in float64 (see ``predict_test``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

# Eigen-directions whose eigenvalue is below this fraction of the largest are round-off:
# they carry no signal and would only amplify noise at tiny alphas.
_EIG_RTOL_FACTOR = 10.0


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
    proj_fit (k, n_fit): ``(Xc V)ᵀ``, maps training responses to the eigenbasis.
    proj_eval (n_eval, k): ``(X_eval - mean) V``, maps eigen-coefficients to predictions.
    """

    fit_rows: np.ndarray
    eval_rows: np.ndarray
    eigvals: np.ndarray
    proj_fit: np.ndarray
    proj_eval: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.proj_fit.nbytes + self.proj_eval.nbytes + self.eigvals.nbytes


def decompose(
    X: np.ndarray, fit_rows: np.ndarray, eval_rows: np.ndarray, dtype=np.float32
) -> Basis:
    """Eigen-decompose the centred features of ``fit_rows`` in float64.

    X (n, p). Uses the p x p Gram matrix when n_fit >= p, else the n_fit x n_fit kernel.
    """
    Xf = np.asarray(X[fit_rows], dtype=np.float64)
    mean = Xf.mean(axis=0)
    Xf -= mean
    n_fit, p = Xf.shape
    if n_fit >= p:
        gram = Xf.T @ Xf
        s, V = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True, check_finite=False)
        keep = s > s[-1] * _EIG_RTOL_FACTOR * p * np.finfo(np.float64).eps
        s, V = s[keep], V[:, keep]
        proj_fit = (Xf @ V).T
    else:
        kernel = Xf @ Xf.T
        s, U = scipy.linalg.eigh(kernel, driver="evd", overwrite_a=True, check_finite=False)
        keep = s > s[-1] * _EIG_RTOL_FACTOR * n_fit * np.finfo(np.float64).eps
        s, U = s[keep], U[:, keep]
        V = (Xf.T @ U) / np.sqrt(s)  # right singular vectors, (p, k)
        proj_fit = U.T * np.sqrt(s)[:, None]  # (Xc V)ᵀ = S Uᵀ
    Xe = np.asarray(X[eval_rows], dtype=np.float64) - mean
    return Basis(
        fit_rows=np.asarray(fit_rows),
        eval_rows=np.asarray(eval_rows),
        eigvals=s,
        proj_fit=np.ascontiguousarray(proj_fit, dtype=dtype),
        proj_eval=np.ascontiguousarray(Xe @ V, dtype=dtype),
    )


@dataclass(frozen=True)
class Decomposition:
    """Everything voxel-independent of one (feature space, split): one Basis per CV fold
    (evaluating the validation rows) and one for the whole training part (evaluating test)."""

    folds: tuple[Basis, ...]
    final: Basis

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.folds) + self.final.nbytes


def prepare(X: np.ndarray, splits: Splits, dtype=np.float32) -> Decomposition:
    """Decompose every fold and the full training part. X (n, p) -> Decomposition."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be 2-D (n, p), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinite values")
    folds = tuple(decompose(X, fit, val, dtype) for fit, val in splits.folds)
    return Decomposition(folds=folds, final=decompose(X, splits.train, splits.test, dtype))


# --------------------------------------------------------------------------- alpha search


def _centred_targets(Y: np.ndarray, basis: Basis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training means (v,) float64, eigen-coefficients Z (k, v), centred eval targets (n_eval, v)."""
    Yf = np.asarray(Y[basis.fit_rows], dtype=np.float64)
    mean = Yf.mean(axis=0)
    Z = basis.proj_fit @ Yf.astype(basis.proj_fit.dtype)  # Xcᵀ(Y - mean) = XcᵀY: Xc is centred
    R = (np.asarray(Y[basis.eval_rows], dtype=np.float64) - mean).astype(basis.proj_eval.dtype)
    return mean, Z, R


def fold_errors(basis: Basis, Y: np.ndarray, alphas: np.ndarray, alpha_batch: int = 10) -> np.ndarray:
    """Validation MSE of every alpha for every voxel on one fold.

    Y (n, v) responses (all rows; the basis picks its own); alphas (a,) -> (a, v) float64.
    """
    _, Z, R = _centred_targets(Y, basis)
    k, v = Z.shape
    n_eval = R.shape[0]
    out = np.empty((alphas.size, v), dtype=np.float64)
    dtype = basis.proj_eval.dtype
    for start in range(0, alphas.size, alpha_batch):
        batch = alphas[start : start + alpha_batch]
        w = (1.0 / (basis.eigvals[:, None] + batch[None, :])).astype(dtype)  # (k, b)
        Zw = (Z[:, None, :] * w[:, :, None]).reshape(k, batch.size * v)  # (k, b*v)
        P = basis.proj_eval @ Zw  # (n_eval, b*v) predictions of the centred targets
        P = P.reshape(n_eval, batch.size, v)
        np.subtract(R[:, None, :], P, out=P)
        out[start : start + batch.size] = np.einsum("ijk,ijk->jk", P, P) / n_eval
    return out


def cv_errors(
    decomposition: Decomposition, Y: np.ndarray, alphas: np.ndarray, alpha_batch: int = 10
) -> np.ndarray:
    """Mean over folds of each fold's validation MSE. Y (n, v), alphas (a,) -> (a, v)."""
    total = np.zeros((alphas.size, Y.shape[1]), dtype=np.float64)
    for basis in decomposition.folds:
        total += fold_errors(basis, Y, alphas, alpha_batch)
    return total / len(decomposition.folds)


def best_alphas(errors: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the alpha of least CV error (the smallest alpha on exact ties).

    errors (a, v), alphas (a,) -> (alpha (v,), index (v,)).
    """
    index = np.argmin(errors, axis=0)
    return alphas[index], index


def predict_test(basis: Basis, Y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Refit on ``basis.fit_rows`` with one alpha per voxel and predict ``basis.eval_rows``.

    Y (n, v), alpha (v,) -> (n_eval, v) float64. The intercept (the training mean) is added in
    float64: in float32 it would quantise the tiny variations of heavily regularised voxels.
    """
    mean, Z, _ = _centred_targets(Y, basis)
    w = (1.0 / (basis.eigvals[:, None] + np.asarray(alpha, dtype=np.float64)[None, :]))
    centred = basis.proj_eval @ (Z * w.astype(Z.dtype))
    return centred.astype(np.float64) + mean


@dataclass(frozen=True)
class RidgeCVResult:
    """alpha (v,), alpha_index (v,), cv_error (a, v), test_prediction (n_test, v) float64."""

    alpha: np.ndarray
    alpha_index: np.ndarray
    cv_error: np.ndarray
    test_prediction: np.ndarray


def ridge_cv(
    decomposition: Decomposition,
    Y: np.ndarray,
    alphas: np.ndarray,
    *,
    voxel_batch: int = 1000,
    alpha_batch: int = 10,
) -> RidgeCVResult:
    """Choose each voxel's alpha by CV and predict the test set.

    Y (n, v) responses for all n rows (NaN-free); alphas (a,) increasing. Voxels are processed
    ``voxel_batch`` at a time so memory stays ~ n_eval * alpha_batch * voxel_batch floats.
    """
    Y = np.asarray(Y)
    alphas = np.asarray(alphas, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"responses must be 2-D (n, v), got shape {Y.shape}")
    if alphas.ndim != 1 or alphas.size == 0 or np.any(alphas <= 0):
        raise ValueError("alphas must be a non-empty 1-D array of positive values")
    v = Y.shape[1]
    errors = np.empty((alphas.size, v))
    chosen = np.empty(v)
    index = np.empty(v, dtype=np.int64)
    pred = np.empty((decomposition.final.eval_rows.size, v))
    for s in range(0, v, voxel_batch):
        sl = slice(s, min(s + voxel_batch, v))
        errors[:, sl] = cv_errors(decomposition, Y[:, sl], alphas, alpha_batch)
        chosen[sl], index[sl] = best_alphas(errors[:, sl], alphas)
        pred[:, sl] = predict_test(decomposition.final, Y[:, sl], chosen[sl])
    return RidgeCVResult(alpha=chosen, alpha_index=index, cv_error=errors, test_prediction=pred)
