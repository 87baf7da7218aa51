"""The certified search's expansion of the ridge filter factors: pure functions of a fold's
eigenvalues and the alpha grid (no voxels, no I/O).

Notation as in :mod:`neurotask.pipeline.ridge`: ``a`` alphas, ``k`` eigen-directions with
eigenvalues ``s`` (ascending). The filter factors ``F[alpha, k] = s_k / (s_k + alpha)`` are
smooth in both arguments, so F has a low numerical rank, and the columns of directions with
similar eigenvalues a lower one still. :func:`plan_groups` cuts the directions into contiguous
groups with a rank each (a plan: :class:`GroupPlan` entries), chosen to minimise the certified
search's products for a given accuracy; :func:`expand` builds the expansion for a plan (any plan
is valid: the residual it reports is its own, and the search's bounds are computed from it).
How the search uses it: :mod:`neurotask.pipeline.ridge.certified`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import threadpoolctl

# Groups of eigen-directions are at least GROUP_MIN wide; the total rank is at most
# GROUP_MAX_RANK.
GROUP_MIN = 32
GROUP_MAX_RANK = 128
# A Gram matrix entry costs ~2 expansion columns: its batched products run slower.
GRAM_WEIGHT = 2.0
# Tolerance profile: beyond the degrees of freedom where it is tight, the tolerance grows as
# (df / tight_df)^LOOSEN_POWER (measured: 3 to 5 gave the least work at BOLD5000's shape).
LOOSEN_POWER = 4.0


class GroupPlan(NamedTuple):
    """One entry of a plan: the eigen-directions ``start:stop`` (ascending eigenvalues) and the
    rank of their expansion. A plan is a tuple of them tiling ``0:k``."""

    start: int
    stop: int
    rank: int


class Group(NamedTuple):
    """One group of an :class:`Expansion`: its columns ``start:stop`` of F, its rank r_g, and
    ``offset``, its first column in ``Expansion.A`` (its A_g is ``A[:, offset : offset + rank]``)."""

    start: int
    stop: int
    rank: int
    offset: int

    @property
    def width(self) -> int:
        """k_g, the group's number of eigen-directions."""
        return self.stop - self.start


@dataclass(frozen=True)
class Expansion:
    """Block low-rank expansion of one fold's filter factors F (a, k).

    The eigen-directions (ascending eigenvalues) are cut into contiguous groups, and each
    group's columns get their own expansion ``F[:, start:stop] ≈ A_g B_g``: directions of similar
    eigenvalue have similar filter curves, so a group needs a far lower rank than the whole
    spectrum (measured at BOLD5000 shape: 17% of the products of one rank-20 expansion at the
    same accuracy).

    groups: one :class:`Group` per group, in the order of the directions.
    A (a, R) float64: the groups' A_g side by side (R = total rank). B_over_s: one (r_g, k_g)
    float64 array per group (B_g / s_g). residual_sq (a, k) float32: the squared truncation
    error (F - expansion)², computed from A and B themselves.
    """

    groups: tuple[Group, ...]
    A: np.ndarray
    B_over_s: tuple[np.ndarray, ...]
    residual_sq: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def products(self) -> int:
        """Columns of E scaled and multiplied per voxel: Σ_g r_g k_g."""
        return sum(g.width * g.rank for g in self.groups)


def _tolerances(tol, a: int) -> np.ndarray:
    """A scalar or per-alpha tolerance as an (a,) float64 array of positive values."""
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), (a,))
    if not np.all(tol > 0):
        raise ValueError("expansion tolerances must be > 0")
    return np.ascontiguousarray(tol)


def _normalised_filter(eigvals: np.ndarray, alphas: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weighted filter factors W (a, k) and the row scales (a, 1) with F = W * scales.

    Each row is divided by its largest filter factor (every alpha's row counts, however strong
    its shrinkage) and by its tolerance relative to the smallest, ``tol / min(tol)``: a residual
    of ``min(tol)`` on W is then one of ``tol[alpha] * max_k F[alpha]`` on F, and the truncated
    SVD spends its rank where the tolerance is tight."""
    F = eigvals[None, :] / (eigvals[None, :] + alphas[:, None])
    scale = F.max(axis=1, keepdims=True) * (tol / tol.min())[:, None]
    return F / scale, scale


def degrees_of_freedom(eigvals: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Effective degrees of freedom of the ridge at each alpha, ``Σ_k F[alpha, k]``.

    Parameters
    ----------
    eigvals : (k,) float64
        A fold's eigenvalues.
    alphas : (a,) float64
        The alpha grid.

    Returns
    -------
    (a,) float64
    """
    return (eigvals[None, :] / (eigvals[None, :] + alphas[:, None])).sum(axis=1)


def tolerance_profile(eigvals: np.ndarray, alphas: np.ndarray, tol: float, tight_df: float) -> np.ndarray:
    """Per-alpha tolerances: ``tol`` for alphas of at most ``tight_df`` degrees of freedom,
    ``tol (df / tight_df)^LOOSEN_POWER`` (at most 1) for the weaker ones.

    Parameters
    ----------
    eigvals, alphas : (k,), (a,) float64
        A fold's eigenvalues and the alpha grid, as in :func:`degrees_of_freedom`.
    tol : float
        The tight tolerance.
    tight_df : float
        Degrees of freedom (see :func:`degrees_of_freedom`) up to which the tolerance is tight.

    Returns
    -------
    (a,) float64

    Notes
    -----
    The filter factors of the small alphas, nearest least squares, are the costly ones to expand:
    their transitions cross the dense low end of the spectrum. Where no voxel's CV optimum is near
    (the caller places ``tight_df`` beyond the optima it expects), a voxel's CV error is far above
    its minimum, and a loose bound excludes those alphas as surely as a tight one. Correctness
    never depends on the profile: an alpha a loose bound leaves in doubt goes to the exact check.
    """
    df = degrees_of_freedom(eigvals, alphas)
    loosen = np.maximum(1.0, df / max(float(tight_df), np.finfo(np.float64).tiny)) ** LOOSEN_POWER
    return np.minimum(tol * loosen, max(tol, 1.0))


def _group_edges(k: int) -> list[int]:
    """Candidate group boundaries: every k/16 directions, finer (down to 32) towards the largest
    eigenvalues, where the filter curves spread most."""
    step = max(GROUP_MIN, -(-k // 16))
    edges = set(range(0, k, step)) | {k}
    width = GROUP_MIN
    while width < k:
        edges.add(k - width)
        width *= 2
    return sorted(e for e in edges if e == 0 or e == k or (e >= GROUP_MIN // 2 and k - e >= GROUP_MIN // 2))


@functools.lru_cache(maxsize=32)
def _plan_cached(eigvals_bytes: bytes, alphas_bytes: bytes, tol_bytes: bytes) -> tuple[GroupPlan, ...]:
    # Cached: a worker calls ridge_cv once per voxel chunk with the same folds and grid.
    # One thread: multithreaded BLAS on these small matrices was 100x slower on a loaded
    # 2-core machine (threads spinning for cores other processes hold).
    with threadpoolctl.threadpool_limits(1):
        return _plan(*(np.frombuffer(b, dtype=np.float64) for b in (eigvals_bytes, alphas_bytes, tol_bytes)))


def _plan(eigvals: np.ndarray, alphas: np.ndarray, tol: np.ndarray) -> tuple[GroupPlan, ...]:
    """The least-cost groups and ranks for the tolerances ``tol`` (a,): candidate groups between
    _group_edges, the rank each needs from the eigen-decomposition of its (a, a) Gram matrix,
    then a dynamic programme over (edge, total rank)."""
    Fn, _ = _normalised_filter(eigvals, alphas, tol)
    tol = float(tol.min())
    a, k = Fn.shape
    edges = _group_edges(k)
    m = len(edges) - 1
    # Gram matrices F_g F_gᵀ (a, a) of every candidate group from prefix sums.
    prefix = np.zeros((m + 1, a, a))
    for j in range(m):
        blk = Fn[:, edges[j] : edges[j + 1]]
        prefix[j + 1] = prefix[j] + blk @ blk.T
    need = np.zeros((m + 1, m + 1), dtype=np.int64)
    for i in range(m):
        for j in range(i + 1, m + 1):
            width = edges[j] - edges[i]
            lam, U = np.linalg.eigh(prefix[j] - prefix[i])
            lam, U = np.clip(lam[::-1], 0.0, None), U[:, ::-1]
            # Row residual² of the rank-r projection: Σ_{m >= r} U[alpha, m]² lam_m.
            tail = np.cumsum((U * U * lam)[:, ::-1], axis=1)[:, ::-1]  # tail[:, r], r < a
            ok = np.flatnonzero((tail <= tol * tol * width / k).all(axis=0))
            need[i, j] = min(int(ok[0]) if ok.size else a, width)
    # Fewest products Σ r_g k_g for each total rank R, then the R that minimises
    # products + GRAM_WEIGHT R² (each voxel's R x R Gram matrix).
    r_max = min(a * m, GROUP_MAX_RANK)
    cost = np.full((m + 1, r_max + 1), np.inf)
    back = np.zeros((m + 1, r_max + 1, 2), dtype=np.int64)
    cost[0, 0] = 0.0
    for j in range(1, m + 1):
        for i in range(j):
            r = need[i, j]
            if r > r_max:
                continue
            cand = cost[i, : r_max + 1 - r] + r * (edges[j] - edges[i])
            better = cand < cost[j, r:]
            cost[j, r:][better] = cand[better]
            back[j, r:][better] = (i, r)
    total = cost[m] + GRAM_WEIGHT * np.arange(r_max + 1) ** 2
    R = int(np.argmin(total))
    if not np.isfinite(total[R]):
        return (GroupPlan(0, k, min(a, k)),)
    groups, j = [], m
    while j > 0:
        i, r = back[j, R]
        groups.append(GroupPlan(edges[i], edges[j], int(r)))
        j, R = int(i), R - int(r)
    return tuple(reversed(groups))


def plan_groups(eigvals: np.ndarray, alphas: np.ndarray, tol) -> tuple[GroupPlan, ...]:
    """The least-cost groups and ranks for a row residual
    ``||(F - expansion)[alpha]|| <= tol[alpha] * max_k F[alpha]``.

    Parameters
    ----------
    eigvals : (k,) float64
        A fold's eigenvalues, ascending.
    alphas : (a,) float64
        The alpha grid.
    tol : float or (a,) float64
        One tolerance, or one per alpha (see :func:`tolerance_profile`).

    Returns
    -------
    tuple of GroupPlan
        Contiguous groups tiling ``0:k`` with their ranks (cached: see ``_plan_cached``).
    """
    eigvals = np.ascontiguousarray(eigvals, dtype=np.float64)
    alphas = np.ascontiguousarray(alphas, dtype=np.float64)
    return _plan_cached(eigvals.tobytes(), alphas.tobytes(), _tolerances(tol, alphas.size).tobytes())


def expand(eigvals: np.ndarray, alphas: np.ndarray, plan: Iterable[tuple[int, int, int]], tol=1.0) -> Expansion:
    """The block expansion of one fold's filter factors for a plan: each group's rank-r truncated
    SVD, of the filter factors weighted by the tolerances.

    Parameters
    ----------
    eigvals, alphas : (k,), (a,) float64
        A fold's eigenvalues (ascending) and the alpha grid, as in :func:`plan_groups`.
    plan : iterable of GroupPlan or (start, stop, rank) triples
        Contiguous groups tiling ``0:k``, e.g. :func:`plan_groups`'s.
    tol : float or (a,) float64
        The tolerances the plan was made for (only their ratios matter).

    Returns
    -------
    Expansion

    Notes
    -----
    Any plan and tolerances give a valid expansion: its residual, hence the certified bound, is
    computed from the expansion itself.
    """
    eigvals = np.asarray(eigvals, dtype=np.float64)
    alphas = np.asarray(alphas, dtype=np.float64)
    Fn, scale = _normalised_filter(eigvals, alphas, _tolerances(tol, alphas.size))
    approx = np.zeros_like(Fn)
    A_parts, B_parts, groups, offset = [], [], [], 0
    # One thread: multithreaded BLAS on these small, skinny matrices was 100x slower on a loaded
    # 2-core machine (threads spinning for cores other processes hold).
    with threadpoolctl.threadpool_limits(1):
        for start, stop, r in plan:
            U = np.linalg.svd(Fn[:, start:stop], full_matrices=False)[0][:, :r]  # (a, r)
            r = U.shape[1]  # at most min(a, k_g)
            B = U.T @ Fn[:, start:stop]  # (r, k_g): A_g B_g is the projection on U's span
            approx[:, start:stop] = U @ B
            A_parts.append(U * scale)
            B_parts.append(B / eigvals[None, start:stop])
            groups.append(Group(start, stop, r, offset))
            offset += r
    residual = (Fn - approx) * scale
    return Expansion(groups=tuple(groups), A=np.concatenate(A_parts, axis=1), B_over_s=tuple(B_parts),
                     residual_sq=(residual**2).astype(np.float32))
