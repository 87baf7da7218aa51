"""The certified search (``search="certified"``, the default): the exhaustive search's alphas
from a low-rank expansion of the filter factors, with the truncation bounded rigorously.

Notation of :mod:`neurotask.pipeline.ridge` and :mod:`neurotask.pipeline.ridge.fold_terms`:
per fold ``E`` (n, k) the evaluation rows in the eigenbasis, ``s`` (k,) the eigenvalues, ``Z``
(k, v) the eigen-coefficients, ``c(alpha)`` and ``q(alpha) = ||P(alpha)||²`` the cross and
quadratic terms of a validation error ``(||R||² - 2 c + q) / n``; ``a`` alphas, ``r_g``/``R``
the ranks of the expansion.

The filter factors ``F[alpha, k] = s_k / (s_k + alpha)`` form an (a, k) matrix of low numerical
rank, and its columns for directions of similar eigenvalue are lower still. The directions are
cut into contiguous groups g, each with a truncated SVD ``F[:, g] ≈ A_g B_g`` of its own rank r_g
(groups and ranks planned to minimise the products for a given accuracy:
:mod:`neurotask.pipeline.ridge.expansion`). Then ``P(alpha) ≈ Σ_j A[alpha, j] Q_j`` where the
R = Σ r_g products ``Q_j = E_g diag(B_j / s_g) Z_g`` (each over its group's k_g columns only)
replace a full products, and every alpha's ``q`` follows from the R x R Gram matrix of the
``Q_j``. The truncation error is bounded rigorously:
``||P - P̂|| <= τ ||(F - Σ_g A_g B_g)[alpha] ∘ Z / √s||`` with ``τ = ||E diag(s^-1/2)||₂`` (computed
once per fold), which gives every alpha's CV error an interval. An alpha whose lower bound
exceeds the smallest upper bound cannot be the minimum; the few remaining candidates of a voxel
(the minimum and its near-ties) are evaluated exactly, as the exhaustive search would.

The accuracy an alpha needs depends on how close its CV error comes to the voxel's minimum.
Alphas near least squares fit noise: their errors are far above the minimum, yet their filter
factors are the costly ones to expand. So each batch first locates its voxels' optima cheaply
(:func:`_located_optima`, a diagonal approximation of q), and the expansion's tolerance is
tight (``_EXPANSION_TOL``) down to a margin beyond the weakest-regularised located optimum and
loosens towards least squares (:func:`neurotask.pipeline.ridge.expansion.tolerance_profile`).
The profile only moves work between the expansion and the exact checks: the bound is the
expansion's own.

The result equals the exhaustive search's except where two alphas' CV errors differ by less than
the round-off margin ``_MARGIN[dtype] * (2 Σ|c terms| + q) / n`` (a tie at working precision,
which the exhaustive search also decides by round-off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurotask.pipeline.ridge.backend import Backend
from neurotask.pipeline.ridge.exhaustive import _search as _exhaustive_search
from neurotask.pipeline.ridge.exhaustive import _sum_sq
from neurotask.pipeline.ridge.expansion import (Expansion, GroupPlan, degrees_of_freedom, expand, plan_groups,
                                                tolerance_profile)
from neurotask.pipeline.ridge.fold_terms import _BatchTerms, _DeviceBasis, _FoldTerms
from neurotask.pipeline.ridge.observer import Observer

# Relative round-off margin of a computed CV error (times 2|c| + q): float32 errors measured
# against float64 stay below 1.1e-6 of the error itself; 2e-5 leaves a factor >= 10.
_MARGIN = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}

# The filter-factor expansion is planned for a row residual of at most this fraction of each
# alpha's largest filter factor (measured cost optimum, see docs/performance.md;
# :mod:`neurotask.pipeline.ridge.expansion`). The search evaluates every alpha instead when the
# expansion's products would exceed _LOWRANK_MAX_FRACTION of the exhaustive sweep's.
_EXPANSION_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}
_LOWRANK_MAX_FRACTION = 0.5
# The tolerance is tight down to the alphas of this many times the degrees of freedom of the
# batch's smallest located optimum (see _located_optima; 1.5 is ~2 steps of the paper's grid).
_LOCATE_DF_MARGIN = 1.5


@dataclass(frozen=True)
class _FoldExpansion:
    """One fold's Expansion with its scaled evaluation features on the device: per group g,
    ``E_g diag(B_j / s_g)`` for each of its r_g rows j stacked, (r_g n_eval, k_g) dtype.
    Voxel-independent: made once per expansion, they turn a group's Q_j into one product."""

    expansion: Expansion
    blocks: tuple


def _fold_expansion(bk: Backend, db: _DeviceBasis, ex: Expansion) -> _FoldExpansion:
    n = db.proj_eval.shape[0]
    blocks = []
    for g, B in zip(ex.groups, ex.B_over_s):
        B = bk.asarray(B, db.dtype)
        blocks.append((db.proj_eval[None, :, g.start : g.stop] * B[:, None, :]).reshape(B.shape[0] * n, g.width))
    return _FoldExpansion(expansion=ex, blocks=tuple(blocks))


def _certified_bounds(bk: Backend, db: _DeviceBasis, t: _FoldTerms, alphas, fx: _FoldExpansion, work=None):
    """One fold's CV-error estimate and certified interval for every alpha: three (a, v) float64.

    The estimate uses q̂ = ||Σ_j A_j Q_j||² (Σ_g r_g k_g columns of products instead of a k);
    the interval adds the truncation bound and the round-off margin. alphas (a,) float64 on the
    device. ``work``: a flat buffer of at least v R n elements of the products' dtype for the
    Q_j, or None (allocated here).
    """
    ex = fx.expansion
    dtype = db.proj_eval.dtype
    n = db.proj_eval.shape[0]
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
    for g, block in zip(ex.groups, fx.blocks):
        bk.matmul_into(t.Z[g.start : g.stop].T, block.T, Q[:, g.offset * n : g.offset * n + block.shape[0]])
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
    cabs = bk.astype(W32 @ abs(t.CZ), bk.float64)  # Σ_k |C_k Z_k| / (s_k + alpha); abs: squaring overflows float32
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


def _located_optima(batch: _BatchTerms) -> np.ndarray:
    """Each voxel's alpha index under a diagonal approximation of q: (v,) int.

    ``q(alpha) = Zᵀ W EᵀE W Z`` (W = diag(1 / (s + alpha))) with ``EᵀE ≈ (n_eval / n_fit) diag(s)``,
    its expectation for evaluation rows drawn like the fit rows: one (a, k) @ (k, v) product per
    fold. Measured at BOLD5000's shape: within one grid step of the exact optimum for 98% of
    voxels, and rarely above it. It only places the certified search's tolerance profile.
    """
    bk, alphas = batch.bk, batch.alphas
    err = 0.0
    for db, t in zip(batch.folds, batch.terms):
        W = bk.astype(1.0 / (db.s[None, :] + alphas[:, None]), db.dtype)
        q = bk.astype((W * W) @ (bk.astype(db.s, db.dtype)[:, None] * t.Z * t.Z), bk.float64)
        err = err + (t.rr[None, :] - 2.0 * t.cross + q * (db.n_eval / db.n_fit)) / db.n_eval
    return np.argmin(bk.to_numpy(err), axis=0)


class _CertifiedSearch:
    """The certified search of one ridge_cv call, batch after batch: ``search(batch, observer)``
    -> (CV error (a, v) float64 numpy, chosen alpha index (v,)).

    It keeps what batches share: the expansions, one per fold, for each batch's tolerance
    profile, and the Q_j buffer. A batch's profile is tight down to ``_LOCATE_DF_MARGIN`` times
    the degrees of freedom of its smallest located optimum, rounded to a grid alpha's, so batches
    of one study share a few profiles: each is planned and expanded once (planning costs ~0.3 s,
    an expansion for a plan milliseconds). One plan serves every fold (their spectra barely
    differ). ``rank``: one expansion of that rank over the whole spectrum instead (for
    comparisons). Where the expansion would cost more than ``_LOWRANK_MAX_FRACTION`` of the
    exhaustive sweep, the batch goes to the exhaustive search (``alpha_batch`` alphas per product).
    """

    def __init__(self, bk: Backend, folds: tuple[_DeviceBasis, ...], alphas: np.ndarray, *,
                 tol: float, rank: int | None, alpha_batch: int):
        self.bk, self.folds, self.alphas = bk, folds, alphas
        self.tol, self.rank, self.alpha_batch = tol, rank, alpha_batch
        self.df = degrees_of_freedom(folds[0].s_np, alphas)
        self.made: dict[float | None, tuple[Expansion, ...] | None] = {}
        # (profile key, one _FoldExpansion per fold): ~12 MB per fold, kept for the last profile
        # only (the batches of a study mostly share one)
        self.on_device: tuple[float | None, tuple[_FoldExpansion, ...]] | None = None
        self.work = None  # the Q_j buffer, reused by every fold and batch

    def search(self, batch: _BatchTerms, observer: Observer) -> tuple[np.ndarray, np.ndarray]:
        v, a = batch.n_voxels, batch.n_alphas
        with observer.phase("locate", 2 * v * a * sum(db.s_np.size for db in self.folds)):
            located = _located_optima(batch)
        expansions = self._for_optima(located)
        if expansions is None:
            return _exhaustive_search(batch, observer, self.alpha_batch)
        rank = max(fx.expansion.rank for fx in expansions)
        observer.maximum("rank", rank)
        observer.maximum("groups", max(len(fx.expansion.groups) for fx in expansions))
        work = self._buffer(v * rank * max(db.n_eval for db in self.folds))
        est, low, high = _bounds(batch, expansions, work, observer)
        return _choose(batch, est, low, high, observer)

    def _buffer(self, size: int):
        if self.work is None or self.work.shape[0] < size:
            self.work = None  # release the old buffer before the new one
            self.work = self.bk.empty((size,), self.folds[0].dtype)
        return self.work

    def _for_optima(self, located: np.ndarray) -> tuple[_FoldExpansion, ...] | None:
        """One _FoldExpansion per fold for a batch's located optima (v,), or None (the
        exhaustive sweep is cheaper)."""
        tight = None
        if self.rank is None:
            above = self.df[self.df >= _LOCATE_DF_MARGIN * self.df[located].max()]
            tight = float(above.min()) if above.size else float(self.df.max())
        if tight not in self.made:
            self.made[tight] = self._make(tight)
        expansions = self.made[tight]
        if expansions is None:
            return None
        if self.on_device is None or self.on_device[0] != tight:
            self.on_device = None
            self.on_device = (tight, tuple(_fold_expansion(self.bk, b, ex) for b, ex in zip(self.folds, expansions)))
        return self.on_device[1]

    def _plan(self, eigvals: np.ndarray, tight_df: float | None) -> tuple[tuple[GroupPlan, ...], object]:
        """-> (plan, tolerances (a,) or scalar) of a fold's expansion."""
        if self.rank is not None:
            return (GroupPlan(0, eigvals.size, min(self.rank, eigvals.size, self.alphas.size)),), self.tol
        profile = tolerance_profile(eigvals, self.alphas, self.tol, tight_df)
        return plan_groups(eigvals, self.alphas, profile), profile

    def _make(self, tight_df: float | None) -> tuple[Expansion, ...] | None:
        plans: dict[int, tuple] = {}  # one plan per spectrum size
        for b in self.folds:
            if b.s_np.size not in plans:
                plans[b.s_np.size] = self._plan(b.s_np, tight_df)
        planned = tuple(expand(b.s_np, self.alphas, *plans[b.s_np.size]) for b in self.folds)
        work = max(ex.products + ex.rank**2 for ex in planned)
        if work > _LOWRANK_MAX_FRACTION * self.alphas.size * max(b.s_np.size for b in self.folds):
            return None
        return planned


def _bounds(batch: _BatchTerms, expansions: tuple[_FoldExpansion, ...], work, observer: Observer):
    """Mean over folds of the estimates and intervals of :func:`_certified_bounds`: three (a, v)
    float64 numpy. Each fold's CZ is freed once used."""
    bk = batch.bk
    est = low = high = 0.0
    for db, t, fx in zip(batch.folds, batch.terms, expansions):
        n, k = db.proj_eval.shape
        v, r, a, products = batch.n_voxels, fx.expansion.rank, batch.n_alphas, fx.expansion.products
        with observer.phase("lowrank", 2 * v * (products * n + r * r * n + a * r * r + 2 * a * k)):
            e, lo, hi = _certified_bounds(bk, db, t, batch.alphas, fx, work)
            est, low, high = est + e, low + lo, high + hi
        t.CZ = None  # not needed any more: free it before the next fold's temporaries
    return tuple(bk.to_numpy(x) / len(batch.folds) for x in (est, low, high))


def _choose(batch: _BatchTerms, est, low, high, observer: Observer) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's alpha from the intervals low, high (a, v): the one candidate where there is
    one, else the least exact error among the candidates -> (est with the exact errors put in,
    chosen index (v,))."""
    candidate = low <= high.min(axis=0)[None, :]
    n_cand = candidate.sum(axis=0)
    idx = np.argmax(candidate, axis=0)  # the only candidate where there is one
    tied = np.flatnonzero(n_cand > 1)
    if tied.size:
        # Near-ties, in two rounds. First each tied voxel's best estimate exactly; an exact
        # value lies within its own interval, so a candidate whose lower bound exceeds it cannot
        # win (measured: a fifth fewer exact pairs). Then the candidates that remain.
        exact = np.full((batch.n_alphas, tied.size), np.inf)
        cand = candidate[:, tied]
        first = np.argmin(np.where(cand, est[:, tied], np.inf), axis=0)
        cols = np.arange(tied.size)
        exact[first, cols] = _exact_pairs(batch, first, tied, observer)
        cand[first, cols] = False
        cand &= low[:, tied] <= exact[first, cols][None, :]
        js, cols = np.nonzero(cand)
        if js.size:
            exact[js, cols] = _exact_pairs(batch, js, tied[cols], observer)
        idx[tied] = np.argmin(exact, axis=0)
        js, cols = np.nonzero(np.isfinite(exact))
        block = est[:, tied]
        block[js, cols] = exact[js, cols]
        est[:, tied] = block
    return est, idx


def _exact_pairs(batch: _BatchTerms, js: np.ndarray, voxels: np.ndarray, observer: Observer) -> np.ndarray:
    """Exact CV errors of (alpha index, voxel) pairs js, voxels (m,) -> (m,) numpy float64,
    in blocks of pairs (each one product per fold)."""
    bk = batch.bk
    observer.count("exact_pairs", js.size)
    out = np.empty(js.size)
    step = 2000  # (k, step) gathered coefficients per product: large enough for full speed
    for p0 in range(0, js.size, step):
        j_b, v_b = js[p0 : p0 + step], voxels[p0 : p0 + step]
        j_d, v_d = bk.index(j_b), bk.index(v_b)
        total = 0.0
        for db, t in zip(batch.folds, batch.terms):
            n, k = db.proj_eval.shape
            with observer.phase("ties", 2 * j_b.size * n * k):
                q = _pairs_q(bk, db, t.Z, batch.alphas, j_d, v_d)
                total = total + (t.rr[v_d] - 2.0 * t.cross[j_d, v_d] + q) / db.n_eval
        out[p0 : p0 + step] = bk.to_numpy(total) / len(batch.folds)
    return out
