"""One chunk of voxels through the engine: :func:`ridge_cv` checks its arguments, puts the
decomposition on the device, and for each batch of voxels computes the fold terms, lets the
chosen search pick each voxel's alpha, and refits to predict the test set. The arithmetic is in
the modules it calls (:mod:`~neurotask.pipeline.ridge.fold_terms`,
:mod:`~neurotask.pipeline.ridge.exhaustive`, :mod:`~neurotask.pipeline.ridge.certified`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from neurotask.pipeline.ridge.backend import get_backend
from neurotask.pipeline.ridge.certified import _EXPANSION_TOL, _CertifiedSearch
from neurotask.pipeline.ridge.decomposition import Decomposition
from neurotask.pipeline.ridge.exhaustive import _search as _exhaustive_search
from neurotask.pipeline.ridge.fold_terms import _basis_flops, _batch_terms, _on_device, _predict
from neurotask.pipeline.ridge.observer import Observer, _watching

SEARCHES = ("certified", "exhaustive")


@dataclass(frozen=True)
class RidgeCVResult:
    """alpha (v,), alpha_index (v,), cv_error (a, v) float64, test_prediction (n_test, v) float64.

    ``cv_error`` is exact for every alpha with ``search="exhaustive"``; with ``"certified"`` it
    is exact where the search evaluated an alpha exactly (every voxel's near-ties) and elsewhere
    the expansion's estimate, whose deviation is bounded as in
    :mod:`neurotask.pipeline.ridge.certified`: within ~0.2% from the batch's optima up, looser (a
    few %) towards least squares, where the batch's tolerance profile is loose. The estimates
    therefore depend on how voxels are batched; the chosen alphas and predictions do not.
    """

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
    search: str = "certified",
    backend: str = "numpy",
    device: str | None = None,
    rank: int | None = None,
    tolerance: float | None = None,
    observer: Observer | None = None,
) -> RidgeCVResult:
    """Choose each voxel's alpha by CV and predict the test set.

    Parameters
    ----------
    decomposition : Decomposition
        The features' folds, from :func:`neurotask.pipeline.ridge.prepare`.
    Y : (n, v) array
        Responses for all n rows (finite); any array-like with ``shape`` and column slicing.
    alphas : (a,) array
        Positive alphas (the grid, e.g. :func:`neurotask.pipeline.ridge.paper_alphas`).
    voxel_batch : int
        Voxels processed at a time; memory grows linearly with it (see docs/performance.md).
    alpha_batch : int
        Alphas per product of the exhaustive sweep (and of :func:`cv_errors`).
    search : {"certified", "exhaustive"}
        "certified" (the same alphas as "exhaustive", see
        :mod:`neurotask.pipeline.ridge.certified`) or every alpha evaluated.
    backend, device : str
        See :mod:`neurotask.pipeline.ridge.backend`.
    rank : int, optional
        Certified search: one expansion of this rank over the whole spectrum instead of the
        planned groups (for comparisons).
    tolerance : float, optional
        Certified search: the expansion's accuracy (default ``_EXPANSION_TOL``); the groups and
        ranks follow from it, the grid and the spectrum, and the search evaluates every alpha
        when the expansion would cost more than half the exhaustive sweep. Any tolerance or rank
        gives the same alphas; they only move work between the expansion and the exact checks.
    observer : Observer, optional
        Told each phase and its flop counts (:mod:`neurotask.pipeline.ridge.observer`), e.g.
        a benchmark's meter. None: nothing is reported.

    Returns
    -------
    RidgeCVResult
    """
    Y = np.asarray(Y) if not hasattr(Y, "shape") else Y
    alphas = np.asarray(alphas, dtype=np.float64)
    _check_arguments(decomposition, Y, alphas, voxel_batch=voxel_batch, alpha_batch=alpha_batch,
                     search=search, rank=rank, tolerance=tolerance)
    bk = get_backend(backend, device)
    watch = _watching(observer, bk.synchronize)
    dd = _on_device(bk, decomposition)
    al = bk.asarray(alphas)
    if search == "certified":
        tol = _EXPANSION_TOL[dd.final.dtype] if tolerance is None else float(tolerance)
        choose = _CertifiedSearch(bk, dd.folds, alphas, tol=tol, rank=rank, alpha_batch=alpha_batch).search
    else:
        choose = functools.partial(_exhaustive_search, alpha_batch=alpha_batch)
    final, v = dd.final, Y.shape[1]
    errors = np.empty((alphas.size, v))
    index = np.empty(v, dtype=np.int64)
    pred = np.empty((final.n_eval, v))
    for s0 in range(0, v, voxel_batch):
        sl = slice(s0, min(s0 + voxel_batch, v))
        Yb, scale = unit_scale(_batch_responses(Y, sl))
        Yd = bk.asarray(Yb)
        batch, final_input = _batch_terms(bk, dd, Yd, al, watch)
        errors[:, sl], index[sl] = choose(batch, watch)
        del batch  # the fold terms, before the refit's temporaries
        with watch.phase("refit", 2 * (sl.stop - s0) * (_basis_flops(final) + final.s_np.size * final.n_eval)):
            pred[:, sl] = bk.to_numpy(_predict(bk, final, Yd, bk.asarray(alphas[index[sl]]), final_input))
        errors[:, sl] *= scale * scale
        pred[:, sl] *= scale
    return RidgeCVResult(alpha=alphas[index], alpha_index=index, cv_error=errors, test_prediction=pred)


def _check_arguments(decomposition: Decomposition, Y, alphas: np.ndarray, *, voxel_batch: int, alpha_batch: int,
                     search: str, rank: int | None, tolerance: float | None) -> None:
    """ValueError naming the argument that ridge_cv cannot use (responses' values: per batch)."""
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
    if search == "certified":
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")


def unit_scale(Yb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's responses divided by the power of two nearest its standard deviation.

    Yb (n, v) float64 -> (Yb / scale, scale (v,)). Ridge is linear in y, so predictions scale by
    ``scale`` and CV errors by its square and the chosen alphas do not move; dividing by a power
    of two is exact, so responses already near unit variance (z-scored BOLD) are unchanged bit for
    bit, while voxels in large units (sd 1e6-1e8) no longer overflow the float32 products or send
    every alpha to the exact checks. Constant voxels keep scale 1.
    """
    sd = Yb.std(axis=0)
    ok = np.isfinite(sd) & (sd > 0)
    scale = np.ones(Yb.shape[1])
    scale[ok] = np.exp2(np.round(np.log2(sd[ok])))
    return (Yb if not (scale != 1).any() else Yb / scale), scale


def _batch_responses(Y, sl: slice) -> np.ndarray:
    """The columns ``sl`` of Y as (n, v_b) float64, checked finite."""
    Yb = np.asarray(Y[:, sl], dtype=np.float64)
    bad = ~np.isfinite(Yb).all(axis=0)
    if bad.any():
        cols = (np.flatnonzero(bad) + sl.start)[:10].tolist()
        raise ValueError(f"responses of voxel columns {cols} contain NaN or infinite values")
    return Yb
