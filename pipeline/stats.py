"""Test-set statistics of an encoding model, per voxel. Pure array code: no I/O, no Dask.

Conventions: ``n`` test samples, ``v`` voxels. Inputs are float arrays of shape (n, v);
all maths is done in float64 whatever the input dtype, so that heavily regularised voxels
(predictions varying by ~1e-6 around their mean) keep their correlation.
"""

from __future__ import annotations

import numpy as np
from scipy import special
from statsmodels.stats.multitest import multipletests

# A column whose spread is below this (relative to its scale) is treated as constant:
# its correlation is undefined.
_CONSTANT_RTOL = 1e-12


def _centred(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre columns of ``a`` (n, v); return (centred (n, v), column norms (v,))."""
    a = np.asarray(a, dtype=np.float64)
    c = a - a.mean(axis=0)
    return c, np.sqrt(np.einsum("ij,ij->j", c, c))


def constant_columns(a: np.ndarray) -> np.ndarray:
    """Boolean (v,): columns of ``a`` (n, v) that are constant (or not finite)."""
    a = np.asarray(a, dtype=np.float64)
    c, norm = _centred(a)
    scale = np.abs(a).max(axis=0) * np.sqrt(a.shape[0])
    return ~np.isfinite(norm) | (norm <= _CONSTANT_RTOL * np.maximum(scale, 1e-300))


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson correlation per column. (n, v), (n, v) -> (v,); NaN where either is constant."""
    yt, nt = _centred(y_true)
    yp, np_ = _centred(y_pred)
    undefined = constant_columns(y_true) | constant_columns(y_pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.einsum("ij,ij->j", yt, yp) / (nt * np_)
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column, as ``sklearn.metrics.r2_score``.

    (n, v), (n, v) -> (v,). NaN where ``y_true`` is constant (sklearn would return 0 or 1
    there; neither is a meaningful score for a voxel with no variance).
    """
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    ss_res = ((yt - yp) ** 2).sum(axis=0)
    ss_tot = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    r2[constant_columns(yt)] = np.nan
    return r2


def pearson_pvalue(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-value of a Pearson r from ``n`` samples, as ``scipy.stats.pearsonr``.

    (v,) -> (v,). Under the null, (r + 1) / 2 follows Beta(n/2 - 1, n/2 - 1); NaN r -> p = 1.
    """
    if n < 3:
        raise ValueError(f"a p-value of r needs at least 3 samples, got n={n}")
    r = np.asarray(r, dtype=np.float64)
    ab = n / 2.0 - 1.0
    with np.errstate(invalid="ignore"):
        p = 2.0 * special.betainc(ab, ab, 0.5 * (1.0 - np.abs(r)))
    p = np.clip(p, 0.0, 1.0)
    p[~np.isfinite(r)] = 1.0
    return p


def fdr_bh(pvalues: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg FDR across voxels. (v,) p -> ((v,) q-values, (v,) significant).

    NaN p-values count as 1 (never significant) and stay part of the family.
    """
    p = np.asarray(pvalues, dtype=np.float64).copy()
    p[~np.isfinite(p)] = 1.0
    if p.size == 0:
        return p, np.zeros(0, dtype=bool)
    reject, q, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
    return q, reject


def test_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """r, r2 and the parametric p of r per voxel. (n, v), (n, v) -> dict of (v,) arrays."""
    r = pearson_r(y_true, y_pred)
    return {
        "r": r,
        "r2": r2_score(y_true, y_pred),
        "pvalue": pearson_pvalue(r, np.asarray(y_true).shape[0]),
    }


test_scores.__test__ = False  # not a pytest test despite the name
