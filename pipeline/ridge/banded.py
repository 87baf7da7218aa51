"""Banded ridge: one regularisation per feature space (band), chosen per voxel by CV.

Ridge with a penalty ``alpha / gamma_b`` on band b's coefficients is plain ridge with alpha
``alpha`` on the scaled union ``[sqrt(gamma_1) X_1, ..., sqrt(gamma_B) X_B]`` (substitute
``beta_b = sqrt(gamma_b) w_b``). So the search over band weightings reuses the engine unchanged:
for each candidate weighting gamma on the simplex, :func:`neurotask.pipeline.ridge.prepare` the
scaled union (the engine picks the cross-product / kernel form where p > n itself) and
:func:`neurotask.pipeline.ridge.ridge_cv` chooses each voxel's alpha (certified search by
default: exactly the alphas of the exhaustive search). Each voxel keeps the (candidate, alpha)
with the least CV error (the mean over folds of each fold's MSE, as the engine scores); ties go to
the first candidate, then (inside the engine) to the smallest alpha. Bands with ``gamma_b = 0``
are dropped from that candidate's union (their coefficients are 0; effective alpha infinite).

The search (himalaya's random search on the simplex, made deterministic): the candidates of
:func:`simplex_candidates` x the alpha grid, evaluated per voxel exactly as an exhaustive search
over that finite set would. It guarantees the best of those candidates, not the best weighting
on the simplex. Cost: one decomposition of the union per candidate (K folds + the training part),
plus one voxel pass of the engine per candidate, plus, for each candidate some voxel chose, one
eigendecomposition of the training kernel for the split of the test prediction between bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurotask.pipeline.ridge.decomposition import prepare
from neurotask.pipeline.ridge.solve import ridge_cv, unit_scale
from neurotask.pipeline.ridge.splits import Splits

# Dirichlet concentrations cycled over the random candidates (himalaya's default [0.1, 1]:
# sparse weightings near the corners and uniform ones over the simplex).
_CONCENTRATIONS = (0.1, 1.0)


def simplex_candidates(n_bands: int, n_candidates: int, seed: int = 0) -> np.ndarray:
    """Deterministic candidate band weightings on the simplex.

    The equal weighting first, then the ``n_bands`` corners (one band alone), then seeded
    Dirichlet draws with concentrations cycling over 0.1 and 1 (himalaya's random search),
    truncated to ``n_candidates`` rows. With one band: the single weighting [1].

    Parameters
    ----------
    n_bands : int
        b >= 1.
    n_candidates : int
        c >= 1; with c <= b the list is the equal weighting and the first c - 1 corners.
    seed : int
        The same (b, c, seed) always gives the same candidates.

    Returns
    -------
    (c, b) float64, rows >= 0 summing to 1. Cost of a banded fit: c decompositions of the union.
    """
    if n_bands < 1 or n_candidates < 1:
        raise ValueError(f"need n_bands >= 1 and n_candidates >= 1, got {n_bands}, {n_candidates}")
    if n_bands == 1:
        return np.ones((1, 1))
    rows = [np.full(n_bands, 1.0 / n_bands)] + list(np.eye(n_bands))
    rng = np.random.default_rng(seed)
    i = 0
    while len(rows) < n_candidates:
        g = rng.dirichlet(np.full(n_bands, _CONCENTRATIONS[i % len(_CONCENTRATIONS)]))
        i += 1
        if np.all(np.isfinite(g)) and g.sum() > 0:
            rows.append(g / g.sum())
    return np.asarray(rows[:n_candidates], dtype=np.float64)


@dataclass(frozen=True)
class BandedResult:
    """Per-voxel banded ridge fit. ``b`` bands, ``v`` voxels, ``n_test`` test rows.

    weights (b, v) float64: the chosen candidate's band weighting gamma (columns sum to 1).
    alpha (v,) float64: the chosen alpha (of the scaled union).
    band_alpha (b, v) float64: each band's effective regularisation ``alpha / gamma_b``
      (inf where gamma_b = 0).
    candidate_index (v,) int64: the row of ``candidates`` chosen.
    cv_error (v,) float64: its CV error (mean over folds of the validation MSE).
    test_prediction (n_test, v) float64: the refit's prediction of the test rows (ridge_cv's).
    band_prediction (b, n_test, v) float64: band b's part,
      ``(X_b[test] - mean_train(X_b)) @ w_b`` with ``w_b`` the refit coefficients of band b in the
      unscaled features; ``band_prediction.sum(0) = test_prediction - mean_train(y)`` (the
      intercept part is the training mean of y, since the features are centred on the training
      mean), up to round-off.
    """

    weights: np.ndarray
    alpha: np.ndarray
    band_alpha: np.ndarray
    candidate_index: np.ndarray
    cv_error: np.ndarray
    test_prediction: np.ndarray
    band_prediction: np.ndarray


def banded_ridge_cv(
    blocks: Sequence[np.ndarray],
    splits: Splits,
    Y: np.ndarray,
    alphas: np.ndarray,
    candidates: np.ndarray,
    *,
    dtype=np.float32,
    search: str = "certified",
    backend: str = "numpy",
    device: str | None = None,
    voxel_batch: int = 1000,
) -> BandedResult:
    """Banded ridge: each voxel's (band weighting, alpha) chosen by K-fold CV, then the test set.

    Parameters
    ----------
    blocks : sequence of b arrays (n, p_b)
        The bands' features (standardised as for the fit), rows aligned with Y.
    splits : Splits
        Test set and CV folds (:func:`neurotask.pipeline.ridge.make_splits`).
    Y : (n, v) array
        Responses, finite.
    alphas : (a,) array
        Positive alphas of the scaled union (e.g. ``paper_alphas(sum p_b)``).
    candidates : (c, b) array
        Band weightings, rows on the simplex (:func:`simplex_candidates`).
    dtype, search, backend, device, voxel_batch
        As for :func:`neurotask.pipeline.ridge.prepare` and :func:`~neurotask.pipeline.ridge.ridge_cv`.

    Returns
    -------
    BandedResult

    Memory: peak = one candidate's Decomposition (for the cross-product form, the (n_train, p)
    centred union plus K+1 bases of ~(p or n_fit, k) each, in ``dtype``) + ridge_cv's voxel batch
    temporaries + the split's float64 training kernel and its eigenvectors (2 n_train²) and one
    band's test kernel (n_test n_train) + the outputs (c + a + (b + 1) n_test) v float64. At
    BOLD5000 shape (n_train 4179, p 6144, float64) ~ 0.6 GB + the decomposition.
    """
    blocks = [np.asarray(X, dtype=np.float64) for X in blocks]
    Y = np.asarray(Y)
    alphas = np.asarray(alphas, dtype=np.float64)
    candidates = np.atleast_2d(np.asarray(candidates, dtype=np.float64))
    _check(blocks, Y, candidates)
    v = Y.shape[1]
    best_err = np.full(v, np.inf)
    best_c = np.zeros(v, dtype=np.int64)
    best_alpha = np.ones(v)
    pred = np.zeros((splits.test.size, v))
    for ci, gamma in enumerate(candidates):
        union = _scaled_union(blocks, gamma)
        dec = prepare(union, splits, dtype=dtype, backend=backend, device=device)
        res = ridge_cv(dec, Y, alphas, voxel_batch=voxel_batch, search=search, backend=backend, device=device)
        del dec
        err = res.cv_error[res.alpha_index, np.arange(v)]
        better = err < best_err  # strict: ties keep the earlier candidate
        best_err[better], best_c[better], best_alpha[better] = err[better], ci, res.alpha[better]
        pred[:, better] = res.test_prediction[:, better]
    band_pred = _band_predictions(blocks, splits, Y, candidates, best_c, best_alpha, voxel_batch)
    weights = candidates[best_c].T
    with np.errstate(divide="ignore"):
        band_alpha = np.where(weights > 0, best_alpha[None, :] / np.where(weights > 0, weights, 1.0), np.inf)
    return BandedResult(weights=weights, alpha=best_alpha, band_alpha=band_alpha, candidate_index=best_c,
                        cv_error=best_err, test_prediction=pred, band_prediction=band_pred)


def split_r2(y_test: np.ndarray, band_prediction: np.ndarray, intercept: np.ndarray | None = None) -> np.ndarray:
    """Each band's contribution to a voxel's test R² (himalaya's ``r2_score_split``).

    With ``e = y_test - mean(y_test)`` and ``P = sum_b P_b``, band b's share is
    ``(2 e·P_b - P_b·P) / (e·e)``; the shares sum to ``1 - |e - P|² / |e|²``, the R² of the
    prediction ``mean(y_test) + P`` (himalaya's convention: the split takes zero-mean targets and
    no intercept). It differs from the R² of ``test_prediction`` only through the intercept's
    misfit ``d = mean_train(y) - mean(y_test)``: by ``(2 d·sum(P) + n_test d²) / |e|²``.

    With ``intercept`` (v,) (the model's own, the training mean of y), ``e`` is ``y_test -
    intercept`` instead, |e|² stays the test set's sum of squares: the shares then sum to the
    R² of ``intercept + P`` (the model's test R², as every other R² of the store) less the
    intercept's own share ``-n_test d² / |y_test - mean(y_test)|²`` (<= 0, small), which no
    band owns.

    Parameters
    ----------
    y_test : (n_test, v) array
    band_prediction : (b, n_test, v) array (:attr:`BandedResult.band_prediction`)
    intercept : (v,) array, optional

    Returns
    -------
    (b, v) float64; a constant voxel (|e| = 0) gets NaN.
    """
    y = np.asarray(y_test, dtype=np.float64)
    P = np.asarray(band_prediction, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != y.shape:
        raise ValueError(f"band_prediction must be (b, {y.shape[0]}, {y.shape[1]}), got {P.shape}")
    centred = y - y.mean(axis=0)
    sst = (centred * centred).sum(axis=0)
    e = centred if intercept is None else y - np.asarray(intercept, dtype=np.float64)[None, :]
    total = P.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((2.0 * e[None] * P - P * total[None]).sum(axis=1)) / np.where(sst > 0, sst, np.nan)


def _check(blocks: list[np.ndarray], Y: np.ndarray, candidates: np.ndarray) -> None:
    """ValueError naming what banded_ridge_cv cannot use."""
    if not blocks:
        raise ValueError("blocks must hold at least one (n, p_b) feature array")
    for i, X in enumerate(blocks):
        if X.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(f"block {i} has shape {X.shape}; need ({Y.shape[0]}, p_b) like the responses' rows")
    if candidates.ndim != 2 or candidates.shape[1] != len(blocks):
        raise ValueError(f"candidates must be (c, {len(blocks)}), got {candidates.shape}")
    if np.any(candidates < 0) or not np.allclose(candidates.sum(axis=1), 1.0) or not np.all(candidates.sum(axis=1) > 0):
        raise ValueError("candidates must be non-negative rows summing to 1 (band weightings on the simplex)")


def _scaled_union(blocks: list[np.ndarray], gamma: np.ndarray) -> np.ndarray:
    """(n, sum of p_b with gamma_b > 0): the bands scaled by sqrt(gamma_b), zero-weight bands dropped."""
    return np.concatenate([np.sqrt(g) * X for g, X in zip(gamma, blocks) if g > 0], axis=1)


def _band_predictions(blocks, splits: Splits, Y, candidates: np.ndarray, best_c: np.ndarray,
                      best_alpha: np.ndarray, voxel_batch: int) -> np.ndarray:
    """(b, n_test, v): each band's part of the refit's test prediction, in the dual (kernel) form.

    For the chosen candidate gamma, the training kernel ``K = sum_b gamma_b Xc_b Xc_bᵀ`` (features
    centred on the training mean) gives the dual coefficients ``(K + alpha I)⁻¹ (y - mean_train y)``
    through one eigh of K; band b's test prediction is ``gamma_b (X_b[test] - mean) Xc_bᵀ`` times
    them. float64 throughout (this is the reference split, not the search).
    """
    tr, te = splits.train, splits.test
    out = np.zeros((len(blocks), te.size, Y.shape[1]))
    centred = []
    for X in blocks:
        m = X[tr].mean(axis=0)
        centred.append((X[tr] - m, X[te] - m))
    for ci in np.unique(best_c):
        gamma = candidates[ci]
        K = sum(g * (Xtr @ Xtr.T) for g, (Xtr, _) in zip(gamma, centred) if g > 0)
        s, U = np.linalg.eigh(K)
        del K
        s = np.clip(s, 0.0, None)  # round-off negatives of a PSD kernel
        cols = np.flatnonzero(best_c == ci)
        for s0 in range(0, cols.size, voxel_batch):
            vb = cols[s0:s0 + voxel_batch]
            Yb = np.asarray(Y[:, vb], dtype=np.float64)[tr]
            Yb, scale = unit_scale(Yb - Yb.mean(axis=0))
            dual = U @ ((U.T @ Yb) / (s[:, None] + best_alpha[vb][None, :]))
            for b, (g, (Xtr, Xte)) in enumerate(zip(gamma, centred)):
                if g > 0:
                    out[b][:, vb] = g * (Xte @ (Xtr.T @ dual)) * scale
    return out
