"""The exhaustive search: every alpha's validation error evaluated, ``q(alpha) = ||P(alpha)||²``
by one large product per alpha (the rest of the error is in the fold terms, see
:mod:`neurotask.pipeline.ridge.fold_terms`). The reference the certified search equals, and its
fallback where an expansion would cost more."""

from __future__ import annotations

import numpy as np

from neurotask.pipeline.ridge.backend import Backend, get_backend
from neurotask.pipeline.ridge.decomposition import Decomposition
from neurotask.pipeline.ridge.fold_terms import _BatchTerms, _batch_terms, _DeviceBasis, _on_device
from neurotask.pipeline.ridge.observer import NULL_OBSERVER, Observer


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
    """q(alpha) = ||E diag(1/(s + alpha)) Z||² for every alpha: Z (k, v), alphas (a,) -> (a, v)
    float64.

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


def _search(batch: _BatchTerms, observer: Observer, alpha_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (CV error (a, v) float64 numpy, the chosen alpha index (v,)) of one voxel batch:
    the mean over folds of each fold's validation MSE, the smallest alpha on exact ties."""
    bk, v, a = batch.bk, batch.n_voxels, batch.n_alphas
    err = 0.0
    for db, t in zip(batch.folds, batch.terms):
        with observer.phase("sweep", 2 * v * a * db.n_eval * db.proj_eval.shape[1]):
            q = _exact_q(bk, db, t.Z, batch.alphas, alpha_batch)
            err = err + (t.rr[None, :] - 2.0 * t.cross + q) / db.n_eval
    err = bk.to_numpy(err) / len(batch.folds)
    return err, np.argmin(err, axis=0)


def cv_errors(
    decomposition: Decomposition,
    Y: np.ndarray,
    alphas: np.ndarray,
    alpha_batch: int = 10,
    backend: str = "numpy",
    device: str | None = None,
) -> np.ndarray:
    """Mean over folds of each fold's validation MSE, every alpha evaluated (all voxels at once).

    Parameters
    ----------
    decomposition : Decomposition
        From :func:`neurotask.pipeline.ridge.prepare`.
    Y : (n, v) array
        Responses of all n rows.
    alphas : (a,) array
        Positive alphas.
    alpha_batch : int
        Alphas per product.
    backend, device : str
        See :mod:`neurotask.pipeline.ridge.backend`.

    Returns
    -------
    (a, v) float64
    """
    bk = get_backend(backend, device)
    Yd = bk.asarray(np.asarray(Y), bk.float64)
    al = bk.asarray(np.asarray(alphas, dtype=np.float64))
    batch, _ = _batch_terms(bk, _on_device(bk, decomposition), Yd, al, NULL_OBSERVER)
    return _search(batch, NULL_OBSERVER, alpha_batch)[0]
