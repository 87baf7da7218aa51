"""The design matrix of one (subject, task): a feature space's rows put in the order of the
subject's images, and standardised. Pure array code."""

from __future__ import annotations

import numpy as np

from neurotask.pipeline.errors import DataError


def align_rows(feature_images: np.ndarray, images: np.ndarray, task: str) -> np.ndarray:
    """Row index into the features for each of the subject's images.

    Parameters
    ----------
    feature_images : (m,) array of names
        The images of the feature space's rows.
    images : (n,) array of names
        The subject's images, in the order of its responses.
    task : str
        The feature space (for the error message).

    Returns
    -------
    (n,) int64

    Raises
    ------
    DataError
        Where some image has no features.
    """
    position = {str(name): i for i, name in enumerate(feature_images)}
    missing = [str(x) for x in images if str(x) not in position]
    if missing:
        raise DataError(
            f"features/{task} lacks {len(missing)} of the subject's {len(images)} images "
            f"(e.g. {', '.join(missing[:3])}); features and responses must cover the same images"
        )
    return np.array([position[str(x)] for x in images], dtype=np.int64)


def standardize(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """z-score each column with the mean and sd of ``rows`` (the training part, so the test set
    does not inform the scaling).

    Parameters
    ----------
    X : (n, p) array
    rows : (n_train,) int
        The rows whose mean and sd are used.

    Returns
    -------
    (n, p) float64
        Constant columns are centred only.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X[rows].mean(axis=0)
    sd = X[rows].std(axis=0)
    return (X - mean) / np.where(sd > 0, sd, 1.0)
