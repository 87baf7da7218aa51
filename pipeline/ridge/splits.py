"""The paper's protocol before any arithmetic: the alpha grid, the seeded held-out test set and
the cross-validation folds of the training part (row indices only)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
    return _with_folds(train, test, train[rng.permutation(train.size)], cv, n_folds, validation_fraction)


def name_keys(names: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random key per name, a function of (seed, name) only. -> (n,) uint64.

    Ranking rows by these keys draws the same images for every subject that saw them, in
    whatever order its rows come (sha256 of ``"<seed>:<name>"``, its first 8 bytes)."""
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
                     for name in names], dtype=np.uint64)


def splits_by_name(
    names: Sequence[str],
    *,
    test: np.ndarray | None = None,
    test_fraction: float = 0.15,
    cv: str = "kfold",
    n_folds: int = 7,
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> Splits:
    """The split by image identity: the test set and the folds depend on the rows' names, not
    on their positions, so subjects that saw the same images get the same test images and the
    same folds whatever their presentation order.

    Parameters
    ----------
    names : sequence of str
        (n,) the rows' image names, unique.
    test : (n,) bool, optional
        The test rows (e.g. NSD's shared images); None: the ``round(test_fraction * n)`` rows
        with the smallest :func:`name_keys`.
    test_fraction, cv, n_folds, validation_fraction, seed
        As :func:`make_splits`; the folds cut the training rows in the order of their keys.

    Returns
    -------
    Splits
    """
    n = len(names)
    if len(set(names)) != n:
        raise ValueError("image names must be unique")
    keys = name_keys(names, seed)
    rank = np.argsort(keys, kind="stable")
    if test is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        mask = np.zeros(n, dtype=bool)
        mask[rank[: n - n_training(n, test_fraction)]] = True
    else:
        mask = np.asarray(test, dtype=bool)
        if mask.shape != (n,):
            raise ValueError(f"test must be a ({n},) boolean mask, got shape {mask.shape}")
        if not 0 < mask.sum() < n:
            raise ValueError(f"the test set must hold some but not all of the {n} images, got {int(mask.sum())}")
    test_rows, train = np.flatnonzero(mask), np.flatnonzero(~mask)
    return _with_folds(train, test_rows, rank[~mask[rank]], cv, n_folds, validation_fraction)


def _with_folds(train: np.ndarray, test: np.ndarray, shuffled: np.ndarray, cv: str, n_folds: int,
                validation_fraction: float) -> Splits:
    """The CV folds of ``train`` (sorted rows), cut from ``shuffled`` (the same rows in a random order)."""
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
