"""The paper's protocol before any arithmetic: the alpha grid, the seeded held-out test set and
the cross-validation folds of the training part (row indices only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def paper_alphas(n_features: int, n_alphas: int = 100) -> np.ndarray:
    """The paper's grid of alphas, ``logspace(-8, 0.5 * log10(p) + 8, n_alphas)``.

    Parameters
    ----------
    n_features : int
        p, the number of features (>= 1).
    n_alphas : int
        a, the grid's size (>= 1).

    Returns
    -------
    (a,) float64
    """
    if n_features < 1 or n_alphas < 1:
        raise ValueError(f"need n_features >= 1 and n_alphas >= 1, got {n_features}, {n_alphas}")
    return np.logspace(-8.0, 0.5 * np.log10(n_features) + 8.0, n_alphas)


class Fold(NamedTuple):
    """One CV fold: ``fit`` (n_fit,) and ``validation`` (n_val,) row indices into the full arrays,
    disjoint subsets of the training part."""

    fit: np.ndarray
    validation: np.ndarray


@dataclass(frozen=True)
class Splits:
    """Row indices of a study's split into training/test and of the CV folds.

    ``train`` (n_train,) and ``test`` (n_test,) index the rows of the full (n, ...) arrays;
    ``folds`` is a tuple of :class:`Fold` (fit rows, validation rows), also indexing the full
    arrays, and always subsets of ``train``.
    """

    train: np.ndarray
    test: np.ndarray
    folds: tuple[Fold, ...]


def n_training(n_samples: int, test_fraction: float) -> int:
    """How many of ``n_samples`` images :func:`make_splits` leaves for training (the rest,
    ``round(test_fraction * n_samples)``, are held out for testing)."""
    return n_samples - int(round(test_fraction * n_samples))


def make_splits(
    n_samples: int,
    *,
    test_fraction: float = 0.15,
    cv: str = "kfold",
    n_folds: int = 7,
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
    """Seeded random test set, then K folds or one validation split of the training part.

    Parameters
    ----------
    n_samples : int
        n, the number of rows (images).
    test_fraction : float
        Share of the rows held out as the test set, in (0, 1).
    cv : {"kfold", "single_split"}
        K folds whose validation sets partition the training part, or one validation split
        (the authors' released code).
    n_folds : int
        K, for ``cv="kfold"``: in [2, n_train].
    validation_fraction : float
        Share of the training rows validated on, for ``cv="single_split"``.
    seed : int
        The same ``(n_samples, seed, ...)`` always gives the same indices.

    Returns
    -------
    Splits
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_samples)
    n_test = n_samples - n_training(n_samples, test_fraction)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    shuffled = train[rng.permutation(train.size)]
    if cv == "kfold":
        if not 2 <= n_folds <= train.size:
            raise ValueError(f"n_folds must be in [2, {train.size}], got {n_folds}")
        parts = np.array_split(shuffled, n_folds)
        folds = tuple(
            Fold(np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), np.sort(parts[i]))
            for i in range(n_folds)
        )
    elif cv == "single_split":
        n_val = int(round(validation_fraction * train.size))
        if not 0 < n_val < train.size:
            raise ValueError(f"validation_fraction {validation_fraction} leaves an empty split")
        folds = (Fold(np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])),)
    else:
        raise ValueError(f"cv must be 'kfold' or 'single_split', got {cv!r}")
    return Splits(train=train, test=test, folds=folds)
