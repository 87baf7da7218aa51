"""Variance partitioning by set-theoretic fits: what each group of feature spaces explains
uniquely and what groups share (Lescroart, Stansbury & Gallant 2015; de Heer et al. 2017).

Pure array code. For ``m`` groups G = {g_1..g_m} a joint model is fitted on every non-empty
union S ⊆ G (``2^m - 1`` sets) with the same split and per-voxel CV alpha; its test-set R² is
``R²(S)``. The variance explained by *exactly* the groups of T (a Venn region) follows by
inclusion-exclusion. With ``c(S) = R²(G) - R²(G minus S)`` (what no model without S explains,
i.e. the regions made only of groups in S):

    region(T) = Σ_{S ⊆ T} (-1)^{|T| - |S|} c(S)

so region({a}) = R²(G) - R²(G minus a) is a's unique variance, and for two groups region({a, b}) =
R²(a) + R²(b) - R²(a ∪ b) is their shared variance.

Negative estimates. Test-set R² is noisy, so regions can come out negative (a group whose
removal *raises* test R²). The stored regions are the raw estimates: they are unbiased up to
the fits' own bias, and averaging them over the voxels of an ROI cancels noise in both
directions, which a floor at zero would turn into a positive bias. Per-voxel classifications
(which group dominates a voxel) use the regions floored at zero (:func:`dominant_region`), and
the significance of a group's unique variance is tested per voxel by :func:`unique_pvalues`.

Sets and regions are named by their groups joined with ``+`` in the groups' order, e.g. ``3D``,
``3D+2D``; :func:`subsets` gives that order (by size, then lexicographic in the groups).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

SEPARATOR = "+"


def subsets(groups: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``groups`` as a tuple in the groups' order, by size then order."""
    groups = list(groups)
    if len(set(groups)) != len(groups) or not groups:
        raise ValueError(f"groups must be distinct and at least one, got {groups}")
    return [c for k in range(1, len(groups) + 1) for c in itertools.combinations(groups, k)]


def set_name(members: Sequence[str]) -> str:
    return SEPARATOR.join(members)


def regions(r2: dict[tuple[str, ...], np.ndarray], groups: Sequence[str]) -> dict[tuple[str, ...], np.ndarray]:
    """Each Venn region's test R² from the fitted unions' test R².

    r2: every non-empty subset S of ``groups`` (tuple in the groups' order) -> R²(S) (v,).
    Returns the same keys -> region(T) (v,) float64: the variance explained by exactly the groups
    of T. The regions of all T sum to R²(G), the full model's R² (an identity, to round-off).
    """
    keys = subsets(groups)
    missing = [set_name(k) for k in keys if k not in r2]
    if missing:
        raise ValueError(f"the partition needs the test R² of every union; missing: {', '.join(missing)}")
    full = tuple(groups)
    whole = np.asarray(r2[full], dtype=np.float64)

    def without(members: tuple[str, ...]) -> np.ndarray:
        rest = tuple(g for g in groups if g not in members)
        return np.asarray(r2[rest], dtype=np.float64) if rest else np.zeros_like(whole)

    c = {S: whole - without(S) for S in keys}
    out = {}
    for T in keys:
        total = np.zeros_like(whole)
        for k in range(1, len(T) + 1):
            for S in itertools.combinations(T, k):
                total += (-1) ** (len(T) - k) * c[S]
        out[T] = total
    return out


def dominant_region(region_values: dict[tuple[str, ...], np.ndarray]) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """The region explaining the most variance per voxel, regions floored at zero.

    -> (the regions in a fixed order, index (v,) int into it; -1 where every region is <= 0).
    """
    keys = list(region_values)
    stack = np.stack([np.maximum(np.asarray(region_values[k], dtype=np.float64), 0.0) for k in keys])
    index = np.argmax(stack, axis=0)
    index[~(stack > 0).any(axis=0)] = -1
    return keys, index


def unique_pvalues(y: np.ndarray, full_pred: np.ndarray, reduced_pred: np.ndarray, *,
                   n_permutations: int = 1000, seed: int = 0) -> np.ndarray:
    """One-sided p-value per voxel that the full model's test error is below the reduced one's
    (the group left out of the reduced model has unique variance), by a sign-flip test.

    y, full_pred, reduced_pred (n, v) test-set arrays. Under the null the two models predict
    each test sample equally well, so each sample's difference of squared errors
    ``d_i = (y_i - reduced_i)² - (y_i - full_i)²`` is as likely positive as negative; the statistic
    is the mean of d (that is, (R²(full) - R²(reduced)) times the voxel's test variance), its null
    distribution the means of d with random signs, the same signs for every voxel. p includes the
    observed statistic (never 0): ``(1 + #{null >= observed}) / (1 + n_permutations)``.
    """
    y = np.asarray(y, dtype=np.float64)
    d = (y - np.asarray(reduced_pred, dtype=np.float64)) ** 2 - (y - np.asarray(full_pred, dtype=np.float64)) ** 2
    n = d.shape[0]
    observed = d.mean(axis=0)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(d.shape[1], dtype=np.int64)
    batch = 256
    for start in range(0, n_permutations, batch):
        k = min(batch, n_permutations - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(k, n))
        exceed += (signs @ d / n >= observed[None, :] - 1e-12 * np.abs(observed[None, :])).sum(axis=0)
    return (1.0 + exceed) / (1.0 + n_permutations)
