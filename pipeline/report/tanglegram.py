"""Leaf orders of two trees drawn facing each other (a tanglegram, Figure 6).

A dendrogram's leaf order is fixed only up to rotations: swapping the two children of any
merge draws the same tree. Two trees over the same tasks are compared best when their
orders agree, i.e. when few of the lines joining a task's two leaves cross. Finding the
rotations with the fewest crossings is NP-hard in general; :func:`untangle` is the usual
greedy heuristic (dendextend's ``untangle(method="step1side")``, applied to both sides in
turn): try each merge's swap, keep it when the crossings go down, until no swap helps.

Trees are scipy linkage matrices (m - 1, 4); a rotation swaps columns 0 and 1 of a row,
which is how :func:`scipy.cluster.hierarchy.dendrogram` orders children (its default
``count_sort=False, distance_sort=False``), so the result draws with scipy as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.cluster import hierarchy


def leaf_names(z: np.ndarray, names: Sequence[str]) -> list[str]:
    """Leaf names in drawing order (bottom to top for orientation 'left'/'right')."""
    return [names[i] for i in hierarchy.leaves_list(np.asarray(z, dtype=np.float64))]


def crossings(left: Sequence[str], right: Sequence[str]) -> int:
    """Number of crossing pairs of links when each name of ``left`` (in order) is joined to
    the same name in ``right``; names present on one side only have no link."""
    pos_r = {n: i for i, n in enumerate(right)}
    ys = np.array([pos_r[n] for n in left if n in pos_r])
    if ys.size < 2:
        return 0
    # pairs in order on the left and out of order on the right
    return int(np.triu(ys[:, None] > ys[None, :], k=1).sum())


def rotate(z: np.ndarray, merge: int) -> np.ndarray:
    """A copy of linkage ``z`` with the children of row ``merge`` swapped (the same tree)."""
    out = np.array(z, dtype=np.float64, copy=True)
    out[merge, [0, 1]] = out[merge, [1, 0]]
    return out


def _improve(z: np.ndarray, names: Sequence[str], other: Sequence[str], moving_left: bool
             ) -> tuple[np.ndarray, int]:
    """Greedy rotations of ``z`` against the fixed order ``other``. -> (z, crossings)."""
    def cost(candidate: np.ndarray) -> int:
        order = leaf_names(candidate, names)
        return crossings(order, other) if moving_left else crossings(other, order)

    best = cost(z)
    improved = True
    while improved and best > 0:
        improved = False
        for merge in range(z.shape[0] - 1, -1, -1):  # from the root down: big moves first
            candidate = rotate(z, merge)
            c = cost(candidate)
            if c < best:
                z, best, improved = candidate, c, True
    return z, best


def untangle(z_left: np.ndarray, names_left: Sequence[str], z_right: np.ndarray, names_right: Sequence[str],
             max_rounds: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """Rotations of both trees that reduce the link crossings of their tanglegram.

    z_left (m_l - 1, 4), z_right (m_r - 1, 4) linkage matrices over the names given
    (leaves matched by name; a name on one side only is ignored). Alternates greedy
    rotations of the left tree (right fixed) and of the right tree until neither lowers the
    crossings. -> (rotated z_left, rotated z_right, crossings). The trees are unchanged as
    trees (same clusters and heights): only children are swapped.
    """
    z_left = np.asarray(z_left, dtype=np.float64)
    z_right = np.asarray(z_right, dtype=np.float64)
    best = crossings(leaf_names(z_left, names_left), leaf_names(z_right, names_right))
    for _ in range(max_rounds):
        before = best
        z_left, best = _improve(z_left, names_left, leaf_names(z_right, names_right), moving_left=True)
        z_right, best = _improve(z_right, names_right, leaf_names(z_left, names_left), moving_left=False)
        if best == 0 or best >= before:
            break
    return z_left, z_right, best
