"""Test-set statistics of an encoding model, per voxel. Pure array code: no I/O, no Dask.

Conventions: ``n`` test samples, ``v`` voxels. Inputs are float arrays of shape (n, v);
all maths is done in float64 whatever the input dtype, so that heavily regularised voxels
(predictions varying by ~1e-6 around their mean) keep their correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
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


def pearson_pvalue(r: np.ndarray, n: int, alternative: str = "two-sided") -> np.ndarray:
    """p-value of a Pearson r from ``n`` samples, as ``scipy.stats.pearsonr``.

    (v,) -> (v,). Under the null of no correlation between bivariate normal variables,
    (r + 1) / 2 follows Beta(n/2 - 1, n/2 - 1). ``alternative``: "two-sided" (the authors'
    p) or "greater" (one-sided, positive correlation; what ``permutation_test`` estimates).
    NaN r -> p = 1.
    """
    if n < 3:
        raise ValueError(f"a p-value of r needs at least 3 samples, got n={n}")
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    r = np.asarray(r, dtype=np.float64)
    ab = n / 2.0 - 1.0
    with np.errstate(invalid="ignore"):
        if alternative == "two-sided":
            p = 2.0 * special.betainc(ab, ab, 0.5 * (1.0 - np.abs(r)))
        else:  # P(R >= r) = I_{(1-r)/2}(ab, ab) by the symmetry of the Beta null
            p = special.betainc(ab, ab, 0.5 * (1.0 - r))
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


def with_fdr(results: xr.Dataset, alpha: float = 0.05) -> xr.Dataset:
    """``results`` (task, voxel) with ``pvalue`` -> a copy with ``qvalue`` (BH per task across
    its voxels) and ``significant`` (q < alpha), and the attribute ``fdr_alpha``."""
    p = results["pvalue"].transpose("task", "voxel").values
    q = np.empty(p.shape)
    sig = np.empty(p.shape, dtype=bool)
    for i in range(p.shape[0]):
        q[i], sig[i] = fdr_bh(p[i], alpha)
    out = results.assign(qvalue=(("task", "voxel"), q), significant=(("task", "voxel"), sig))
    out.attrs["fdr_alpha"] = alpha
    return out


def test_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """r, r2 and the parametric p of r per voxel. (n, v), (n, v) -> dict of (v,) arrays."""
    r = pearson_r(y_true, y_pred)
    return {
        "r": r,
        "r2": r2_score(y_true, y_pred),
        "pvalue": pearson_pvalue(r, np.asarray(y_true).shape[0]),
    }


test_scores.__test__ = False  # not a pytest test despite the name


# --------------------------------------------------------------------------- permutation test
#
# The null of a voxel's test r is built by re-pairing the test rows of its responses with its
# fixed predictions. Plain i.i.d. shuffles cost one gathered dot product of length n per
# (permutation, voxel): memory-bound, ~5 GFLOP/s here. A *product design* turns the same work
# into one small GEMM per voxel: draw row permutations s_0..s_{A-1} and column permutations
# t_0..t_{C-1} (s_0 = t_0 = identity) and pair y[s_a] with p[t_c]; for each voxel, all A*C
# statistics are the matrix (A, n) @ (n, C). Every pairing s_a o t_c^-1 is a uniform random
# permutation, any two of them are independent (so the Monte Carlo error of p is that of i.i.d.
# shuffles), and the set is invariant in law under re-centring on any of its members, which is
# the condition for the empirical p with the observed pairing counted in to be exact
# (Hemerik & Goeman 2018, "Exact testing with random permutations", TEST 27:811-825): with
# U = S g^-1 for the member g = s_a t_c^-1, the cells of U are (s_a' s_a^-1)(s_a t_c'^-1 t_c s_a^-1):
# again a product design with independent uniform factors, its identity at (a, c). When A*C
# exceeds n_permutations + 1, a uniformly random subset of the non-identity cells is counted,
# which keeps that invariance.

# Null values within this of the observed r count as ties, i.e. as exceedances (conservative).
# It is far above the float32 rounding of a null r (max 6e-8 measured at n = 738, growing like
# sqrt(n)) and shifts p by ~1e-6 at p = 0.001 (n = 738), 0.2% of its Monte Carlo error.
_TIE_ATOL = 1e-5


@dataclass(frozen=True)
class PermutationSet:
    """The permutations of ``n`` test rows that make a voxel's null, as a product design.

    ``rows`` (A, n) and ``cols`` (C, n) are permutations of range(n), row 0 of each the
    identity. Cell (a, c) pairs ``y_true[rows[a]]`` with ``y_pred[cols[c]]``; ``counted``
    (n_permutations,) holds the flat indices ``a * C + c`` of the cells that form the null
    (never 0, the observed pairing). A function of (n_test, n_permutations, seed) only, so
    every voxel chunk of a (subject, task) draws the same set.
    """

    rows: np.ndarray
    cols: np.ndarray
    counted: np.ndarray

    @property
    def n_test(self) -> int:
        return self.rows.shape[1]

    @property
    def n_permutations(self) -> int:
        return self.counted.size

    def explicit(self) -> np.ndarray:
        """The null's permutations as (n_permutations, n) indices ``pi``: null sample k is
        the correlation of ``y_true[pi[k]]`` with ``y_pred`` (for reference checks)."""
        a, c = np.divmod(self.counted, self.cols.shape[0])
        inv_cols = np.argsort(self.cols, axis=1)
        # y[s_a][j] pairs with p[t_c][j]; put p back in order: row i of p meets y[s_a[t_c^-1[i]]]
        return np.take_along_axis(self.rows[a], inv_cols[c], axis=1)


def permutation_set(n_test: int, n_permutations: int = 5000, seed: int = 0) -> PermutationSet:
    """Draw the product-design permutation set (see ``PermutationSet``), seeded.

    A = ceil(sqrt(n_permutations + 1)) row and C = ceil((n_permutations + 1) / A) column
    permutations; of the A*C - 1 non-identity cells, n_permutations are kept at random.
    """
    _check_int("n_test", n_test, 3)
    _check_int("n_permutations", n_permutations, 1)
    _check_int("seed", seed, 0)
    cells = n_permutations + 1
    n_rows = math.isqrt(cells - 1) + 1  # ceil(sqrt(cells)), cells >= 2
    n_cols = -(-cells // n_rows)
    # Permutations as argsorts of the raw PCG64 stream, which numpy keeps stable across
    # versions (Generator methods may change): a study resumed after an upgrade draws the same set.
    bits = np.random.PCG64(seed)
    base = np.arange(n_test, dtype=np.intp)

    def draw(k: int) -> np.ndarray:
        keys = bits.random_raw((k - 1) * n_test).reshape(k - 1, n_test)
        return np.vstack([base, np.argsort(keys, axis=1, kind="stable")]).astype(np.intp)

    rows, cols = draw(n_rows), draw(n_cols)
    order = np.argsort(bits.random_raw(n_rows * n_cols - 1), kind="stable")
    counted = np.sort(order[:n_permutations] + 1)
    return PermutationSet(rows=rows, cols=cols, counted=counted.astype(np.intp))


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of ``permutation_test`` for v voxels.

    r (v,): observed test r (float64; NaN where either column is constant or not finite).
    pvalue (v,): (1 + n_exceed) / (1 + n_permutations); 1 where r is NaN.
    n_exceed (v,) int64: null values >= r (or |null| >= |r| two-sided), ties included.
    null_quantiles (q, v) float64 or None: the requested quantiles of each voxel's null.
    """

    r: np.ndarray
    pvalue: np.ndarray
    n_exceed: np.ndarray
    null_quantiles: np.ndarray | None


def permutation_test(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_permutations: int = 5000,
    seed: int = 0,
    *,
    alternative: str = "greater",
    null_quantiles: Sequence[float] | None = None,
    voxel_batch: int = 16,
) -> PermutationResult:
    """Permutation test of each voxel's test-set correlation.

    y_true (n, v) test responses, y_pred (n, v) their fixed predictions. The null of voxel
    j's r is r(y_true[pi, j], y_pred[:, j]) over the n_permutations re-pairings of
    ``permutation_set(n, n_permutations, seed)``, the same for every voxel and every voxel
    chunk, so a voxel's p never depends on how the voxels are chunked. Empirical
    p = (1 + #{null >= r}) / (1 + n_permutations) ("greater", the default) or with |null| >=
    |r| ("two-sided"); exact (valid at any n_permutations) under exchangeable test rows.
    Apply ``fdr_bh`` to the p of *all* voxels of a (subject, task) afterwards, not per chunk.

    Centring and scaling are done in float64 (predictions of heavily regularised voxels
    vary by ~1e-6 around their mean); the null's products run in float32 as one
    (A, n) @ (n, C) GEMM per voxel, ``voxel_batch`` voxels at a time; only counts (and the
    optional quantiles) leave each batch. Memory ~ voxel_batch * (A + C) * n * 4 bytes.
    """
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if yt.ndim != 2 or yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred must be (n, v) arrays of one shape, "
                         f"got {yt.shape} and {yp.shape}")
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    _check_int("voxel_batch", voxel_batch, 1)
    quantiles = None
    if null_quantiles is not None:
        quantiles = np.asarray(null_quantiles, dtype=np.float64).reshape(-1)
        if not np.all((quantiles >= 0) & (quantiles <= 1)):
            raise ValueError(f"null_quantiles must lie in [0, 1], got {quantiles.tolist()}")
    n, v = yt.shape
    perms = permutation_set(n, n_permutations, seed)
    n_cols = perms.cols.shape[0]
    rows_flat, cols_flat = perms.rows.ravel(), perms.cols.ravel()
    not_counted = np.setdiff1d(np.arange(perms.rows.shape[0] * n_cols), perms.counted)

    r = np.empty(v)
    n_exceed = np.empty(v, dtype=np.int64)
    q_out = None if quantiles is None else np.empty((quantiles.size, v))
    for start in range(0, v, voxel_batch):
        sl = slice(start, min(start + voxel_batch, v))
        zy, bad_y = _standardized_rows(yt[:, sl].T)
        zp, bad_p = _standardized_rows(yp[:, sl].T)
        undefined = bad_y | bad_p
        r_b = np.clip((zy * zp).sum(axis=1), -1.0, 1.0)
        r_b[undefined] = np.nan
        b = zy.shape[0]
        # Gathers along the contiguous last axis; indices are valid, so 'wrap' skips checks.
        ya = np.take(zy.astype(np.float32), rows_flat, axis=1, mode="wrap").reshape(b, -1, n)
        pc = np.take(zp.astype(np.float32), cols_flat, axis=1, mode="wrap").reshape(b, n_cols, n)
        null = np.matmul(ya, pc.transpose(0, 2, 1)).reshape(b, -1)  # (b, A*C) float32
        if alternative == "greater":
            hits = null >= (r_b - _TIE_ATOL).astype(np.float32)[:, None]
        else:
            hits = np.abs(null) >= (np.abs(r_b) - _TIE_ATOL).astype(np.float32)[:, None]
        # Count over all cells, then take back the few that are not in the null: cheaper
        # than selecting the counted ones.
        count = hits.sum(axis=1) - hits[:, not_counted].sum(axis=1)
        count[undefined] = perms.n_permutations
        r[sl], n_exceed[sl] = r_b, count
        if q_out is not None:
            qb = np.quantile(null[:, perms.counted].astype(np.float64), quantiles, axis=1)
            qb[:, undefined] = np.nan
            q_out[:, sl] = qb
    pvalue = (1.0 + n_exceed) / (1.0 + perms.n_permutations)
    return PermutationResult(r=r, pvalue=pvalue, n_exceed=n_exceed, null_quantiles=q_out)


def _standardized_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre rows of ``a`` (b, n) and scale them to unit norm, in float64.

    Returns (z (b, n) float64 C-contiguous, undefined (b,) bool: constant or not finite; its
    rows are zero). Rows are reduced along their contiguous axis, so each row's result is
    the same bit for bit whatever the other rows are (chunking invariance).
    """
    a = np.array(a, dtype=np.float64, order="C")
    n = a.shape[1]
    with np.errstate(invalid="ignore"):  # inf - inf in rows that are flagged below
        c = a - a.sum(axis=1, keepdims=True) / n
        norm = np.sqrt((c * c).sum(axis=1))
        scale = np.abs(a).max(axis=1) * np.sqrt(n)
    undefined = ~np.isfinite(norm) | (norm <= _CONSTANT_RTOL * np.maximum(scale, 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = c / norm[:, None]
    z[undefined] = 0.0
    return z, undefined


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
