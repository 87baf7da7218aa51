"""Tree checks shared by the analysis tests, made from the functions the analysis uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neurotask.pipeline.stats.similarity import cut_tree


def is_clade(linkage_matrix: np.ndarray, tasks: Sequence[int]) -> bool:
    """Whether ``tasks`` (indices) are exactly the leaves of one branch of the tree.

    The groups of the tree cut into k groups are its branches after t - k merges, and every
    branch is one of them for the k at which it is formed, so a branch is a group for some k.
    """
    wanted = {int(t) for t in tasks}
    for k in range(1, linkage_matrix.shape[0] + 2):
        labels = cut_tree(linkage_matrix, k)
        if any(set(np.flatnonzero(labels == g).tolist()) == wanted for g in np.unique(labels)):
            return True
    return False
